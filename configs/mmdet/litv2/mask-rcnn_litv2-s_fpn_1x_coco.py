# litv2_small -- reproduces the published result: COCO val box AP 44.9 / mask AP 40.8 (detection/README.md).
# Source config: https://github.com/ziplab/LITv2 detection/configs/litv2/mask_rcnn_litv2_s_fpn_1x_coco.py
# (schedule, optimizer, weight-decay exemptions and drop-path as published).
_base_ = ["../_base_/mask-rcnn_fpn_1x_coco.py"]

model = dict(
    backbone=dict(
        model_name="litv2_small",
        model_kwargs=dict(drop_path_rate=0.2),
        init_cfg=dict(type="Pretrained", checkpoint="timm:litv2_small.in1k"),
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type="AdamW", lr=0.0002, weight_decay=0.0001),
    paramwise_cfg=dict(_delete_=True, custom_keys={"norm": dict(decay_mult=0.0)}),
)
