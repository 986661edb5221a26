# va_focalnet_tiny_srf -- reproduces the published result: ADE20K val mIoU 46.5 single-scale / 47.2 multi-scale (README.md).
# Source config: https://github.com/microsoft/FocalNet segmentation/configs/focalnet/upernet_focalnet_tiny_patch4_512x512_160k_ade20k_srf.py
# (schedule, optimizer, weight-decay exemptions and drop-path as published).
_base_ = ["../_base_/upernet_160k_ade20k.py"]

model = dict(
    backbone=dict(
        model_name="va_focalnet_tiny_srf",
        model_kwargs=dict(drop_path_rate=0.3),
        init_cfg=dict(type="Pretrained", checkpoint="timm:va_focalnet_tiny_srf.ms_in1k"),
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
        },
    )
)
