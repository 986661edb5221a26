# agent_swin_tiny with the shared recipe of retinanet_fpn_1x_coco.py (no published
# result for this family/method; same schedule and optimizer as the published ones).
_base_ = ["../_base_/retinanet_fpn_1x_coco.py"]

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
