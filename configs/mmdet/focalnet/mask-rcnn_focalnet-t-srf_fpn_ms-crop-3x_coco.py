# va_focalnet_tiny_srf -- reproduces the published result: COCO val box AP 47.6 / mask AP 42.6 (README.md).
# Source config: https://github.com/microsoft/FocalNet detection/configs/focalnet/mask_rcnn_focalnet_tiny_patch4_mstrain_480-800_adamw_3x_coco_srf.py
# (schedule, optimizer, weight-decay exemptions and drop-path as published).
_base_ = ["../_base_/mask-rcnn_fpn_ms-crop-3x_coco.py"]

model = dict(
    backbone=dict(
        model_name="va_focalnet_tiny_srf",
        model_kwargs=dict(drop_path_rate=0.3),
        init_cfg=dict(type="Pretrained", checkpoint="timm:va_focalnet_tiny_srf.ms_in1k"),
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
optim_wrapper = dict(
    paramwise_cfg=dict(
        _delete_=True,
        custom_keys={
            "absolute_pos_embed": dict(decay_mult=0.0),
            "relative_position_bias_table": dict(decay_mult=0.0),
            "norm": dict(decay_mult=0.0),
        },
    )
)
# the official FocalNet runs used 1 image per GPU
train_dataloader = dict(batch_size=1)
