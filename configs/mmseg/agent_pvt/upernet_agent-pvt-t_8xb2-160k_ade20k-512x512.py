# agent_pvt_tiny with the shared recipe of upernet_160k_ade20k.py (no published
# result for this family/method; same schedule and optimizer as the published ones).
_base_ = ["../_base_/upernet_160k_ade20k.py"]

model = dict(
    backbone=dict(
        model_name="agent_pvt_tiny",
        model_kwargs=dict(drop_path_rate=0.1),
        init_cfg=dict(type="Pretrained", checkpoint="timm:agent_pvt_tiny.in1k"),
    ),
    decode_head=dict(in_channels=[64, 128, 320, 512], in_index=[0, 1, 2, 3]),
    auxiliary_head=dict(in_channels=320, in_index=2),
)
optim_wrapper = dict()
