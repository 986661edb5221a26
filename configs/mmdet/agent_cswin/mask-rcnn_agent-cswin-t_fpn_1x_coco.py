# agent_cswin_tiny with the shared recipe of mask-rcnn_fpn_1x_coco.py (no published
# result for this family/method; same schedule and optimizer as the published ones).
_base_ = ["../_base_/mask-rcnn_fpn_1x_coco.py"]

model = dict(
    backbone=dict(
        model_name="agent_cswin_tiny",
        model_kwargs=dict(drop_path_rate=0.2),
        init_cfg=dict(type="Pretrained", checkpoint="timm:agent_cswin_tiny.in1k"),
    ),
    neck=dict(in_channels=[64, 128, 256, 512]),
)
optim_wrapper = dict(paramwise_cfg=dict(_delete_=True, custom_keys={"norm": dict(decay_mult=0.0)}))
