# nat_mini -- reproduces the published result: ADE20K val mIoU 45.1 single-scale / 46.4 multi-scale (segmentation/NAT.md).
# Source config: https://github.com/SHI-Labs/Neighborhood-Attention-Transformer segmentation/configs/nat/upernet_nat_mini_512x512_160k_ade20k.py
# (schedule, optimizer, weight-decay exemptions and drop-path as published).
_base_ = ["../_base_/upernet_160k_ade20k.py"]

model = dict(
    backbone=dict(
        model_name="nat_mini",
        model_kwargs=dict(drop_path_rate=0.2),
        init_cfg=dict(type="Pretrained", checkpoint="timm:nat_mini.in1k"),
    ),
    decode_head=dict(in_channels=[64, 128, 256, 512], in_index=[0, 1, 2, 3]),
    auxiliary_head=dict(in_channels=256, in_index=2),
)
optim_wrapper = dict(
    paramwise_cfg=dict(
        _delete_=True, custom_keys={"rpb": dict(decay_mult=0.0), "norm": dict(decay_mult=0.0)}
    )
)
