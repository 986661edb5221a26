# va_focalnet_tiny_srf -- reproduces the published result: COCO val box AP 45.9 / mask AP 41.3 (README.md).
# Source config: https://github.com/microsoft/FocalNet detection/configs/focalnet/mask_rcnn_focalnet_tiny_patch4_mstrain_480-800_adamw_1x_coco_srf.py
# (schedule, optimizer, weight-decay exemptions and drop-path as published).
# 1x schedule with lr steps at 9 and 11 and the multi-scale + crop augmentation.
_base_ = ["../_base_/mask-rcnn_fpn_ms-crop-1x_coco.py"]

model = dict(
    backbone=dict(
        model_name="va_focalnet_tiny_srf",
        model_kwargs=dict(drop_path_rate=0.1),
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
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type="MultiStepLR", begin=0, end=12, by_epoch=True, milestones=[9, 11], gamma=0.1),
]
# the official FocalNet runs used 1 image per GPU
train_dataloader = dict(batch_size=1)
