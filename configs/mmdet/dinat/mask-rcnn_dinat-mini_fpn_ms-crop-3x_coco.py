# dinat_mini -- reproduces the published result: COCO val box AP 47.2 / mask AP 42.5 (detection/DiNAT.md).
# Source config: https://github.com/SHI-Labs/Neighborhood-Attention-Transformer detection/configs/dinat/mask_rcnn_dinat_mini_3x_coco.py
# (schedule, optimizer, weight-decay exemptions and drop-path as published).
_base_ = ["../_base_/mask-rcnn_fpn_ms-crop-3x_coco.py"]

model = dict(
    backbone=dict(
        model_name="dinat_mini",
        model_kwargs=dict(drop_path_rate=0.2),
        init_cfg=dict(type="Pretrained", checkpoint="timm:dinat_mini.in1k"),
    ),
    neck=dict(in_channels=[64, 128, 256, 512]),
)
optim_wrapper = dict(
    paramwise_cfg=dict(
        _delete_=True, custom_keys={"rpb": dict(decay_mult=0.0), "norm": dict(decay_mult=0.0)}
    )
)
