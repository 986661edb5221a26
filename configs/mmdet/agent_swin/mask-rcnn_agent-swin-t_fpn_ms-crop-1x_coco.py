# agent_swin_tiny -- reproduces the published result: COCO val box AP 44.6 / mask AP 40.7 (downstream/detection/README.md).
# Source config: https://github.com/LeapLabTHU/Agent-Attention downstream/detection/configs/agent_swin/agent_swin_t_mrcnn_1x_9-12-14-7.py
# (schedule, optimizer, weight-decay exemptions and drop-path as published).
# downstream="det"|"seg" applies the published downstream_agent_shapes (visionattn.mm.DOWNSTREAM_KWARGS).
# 1x schedule with lr steps at 8 and 11 and the multi-scale + crop augmentation.
_base_ = ["../_base_/mask-rcnn_fpn_ms-crop-1x_coco.py"]

model = dict(
    backbone=dict(
        model_name="agent_swin_tiny",
        model_kwargs=dict(drop_path_rate=0.1),
        init_cfg=dict(type="Pretrained", checkpoint="timm:agent_swin_tiny.in1k"),
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
            "an_bias": dict(decay_mult=0.0),
            "na_bias": dict(decay_mult=0.0),
            "ah_bias": dict(decay_mult=0.0),
            "aw_bias": dict(decay_mult=0.0),
            "ha_bias": dict(decay_mult=0.0),
            "wa_bias": dict(decay_mult=0.0),
        },
    )
)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type="MultiStepLR", begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
