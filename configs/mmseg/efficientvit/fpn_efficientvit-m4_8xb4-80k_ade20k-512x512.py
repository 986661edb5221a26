# va_efficientvit_m4 with the shared recipe of fpn_80k_ade20k.py (no published
# result for this family/method; same schedule and optimizer as the published ones).
_base_ = ["../_base_/fpn_80k_ade20k.py"]

model = dict(
    backbone=dict(
        model_name="va_efficientvit_m4",
        init_cfg=dict(type="Pretrained", checkpoint="timm:va_efficientvit_m4.r224_in1k"),
    ),
    neck=dict(in_channels=[128, 256, 384]),
    decode_head=dict(feature_strides=[16, 32, 64, 128]),
)
optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            "attention_biases": dict(decay_mult=0.0),
            "attention_bias_idxs": dict(decay_mult=0.0),
        }
    )
)
