# va_efficientvit_m4 with the shared recipe of upernet_160k_ade20k.py (no published
# result for this family/method; same schedule and optimizer as the published ones).
_base_ = ["../_base_/upernet_160k_ade20k.py"]

model = dict(
    backbone=dict(
        model_name="va_efficientvit_m4",
        init_cfg=dict(type="Pretrained", checkpoint="timm:va_efficientvit_m4.r224_in1k"),
    ),
    decode_head=dict(in_channels=[128, 256, 384], in_index=[0, 1, 2]),
    auxiliary_head=dict(in_channels=256, in_index=1),
)
optim_wrapper = dict(
    paramwise_cfg=dict(
        _delete_=True,
        custom_keys={
            "attention_biases": dict(decay_mult=0.0),
            "attention_bias_idxs": dict(decay_mult=0.0),
        },
    )
)
