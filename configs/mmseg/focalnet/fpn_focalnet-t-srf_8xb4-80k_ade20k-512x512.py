# va_focalnet_tiny_srf with the shared recipe of fpn_80k_ade20k.py (no published
# result for this family/method; same schedule and optimizer as the published ones).
_base_ = ["../_base_/fpn_80k_ade20k.py"]

model = dict(
    backbone=dict(
        model_name="va_focalnet_tiny_srf",
        model_kwargs=dict(drop_path_rate=0.2),
        init_cfg=dict(type="Pretrained", checkpoint="timm:va_focalnet_tiny_srf.ms_in1k"),
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            "absolute_pos_embed": dict(decay_mult=0.0),
            "relative_position_bias_table": dict(decay_mult=0.0),
            "norm": dict(decay_mult=0.0),
        }
    )
)
