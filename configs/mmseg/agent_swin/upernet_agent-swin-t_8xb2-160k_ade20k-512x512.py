# agent_swin_tiny -- reproduces the published result: ADE20K val mIoU 46.68 (downstream/segmentation/README.md).
# Source config: https://github.com/LeapLabTHU/Agent-Attention downstream/segmentation/configs/agent_swin/upernet_agent_swin_t_9-12-14-7.py
# (schedule, optimizer, weight-decay exemptions and drop-path as published).
# downstream="det"|"seg" applies the published downstream_agent_shapes (visionattn.mm.DOWNSTREAM_KWARGS).
_base_ = ["../_base_/upernet_160k_ade20k.py"]

model = dict(
    backbone=dict(
        model_name="agent_swin_tiny",
        model_kwargs=dict(drop_path_rate=0.3),
        init_cfg=dict(type="Pretrained", checkpoint="timm:agent_swin_tiny.in1k"),
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768], in_index=[0, 1, 2, 3]),
    auxiliary_head=dict(in_channels=384, in_index=2),
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
