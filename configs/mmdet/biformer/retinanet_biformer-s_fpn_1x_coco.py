# biformer_small -- reproduces the published result: COCO val box AP 45.9 (object_detection/README.md).
# Source config: https://github.com/rayleizhu/BiFormer object_detection/configs/coco/retinanet.1x.biformer_small.py
# (schedule, optimizer, weight-decay exemptions and drop-path as published).
_base_ = ["../_base_/retinanet_fpn_1x_coco.py"]

model = dict(
    backbone=dict(
        model_name="biformer_small",
        model_kwargs=dict(drop_path_rate=0.2),
        init_cfg=dict(type="Pretrained", checkpoint="timm:biformer_small.in1k"),
    ),
    neck=dict(in_channels=[64, 128, 256, 512]),
)
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type="AdamW", lr=0.0001, weight_decay=0.0001),
    loss_scale=512.0,
    paramwise_cfg=None,
)
