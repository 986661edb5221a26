# litv2_small with the shared recipe of upernet_160k_ade20k.py (no published
# result for this family/method; same schedule and optimizer as the published ones).
_base_ = ["../_base_/upernet_160k_ade20k.py"]

model = dict(
    backbone=dict(
        model_name="litv2_small",
        model_kwargs=dict(drop_path_rate=0.2),
        init_cfg=dict(type="Pretrained", checkpoint="timm:litv2_small.in1k"),
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768], in_index=[0, 1, 2, 3]),
    auxiliary_head=dict(in_channels=384, in_index=2),
)
optim_wrapper = dict(paramwise_cfg=dict(_delete_=True, custom_keys={"norm": dict(decay_mult=0.0)}))
