# va_halonet50ts with the shared recipe of upernet_160k_ade20k.py (no published
# result for this family/method; same schedule and optimizer as the published ones).
_base_ = ["../_base_/upernet_160k_ade20k.py"]

model = dict(
    backbone=dict(
        model_name="va_halonet50ts",
        model_kwargs=dict(drop_path_rate=0.1),
        init_cfg=dict(type="Pretrained", checkpoint="timm:va_halonet50ts.a1h_in1k"),
    ),
    decode_head=dict(in_channels=[256, 512, 1024, 2048], in_index=[0, 1, 2, 3]),
    auxiliary_head=dict(in_channels=1024, in_index=2),
)
optim_wrapper = dict(paramwise_cfg=dict(_delete_=True, norm_decay_mult=0.0))
