# dinat_mini -- reproduces the published result: ADE20K val mIoU 45.8 single-scale / 47.2 multi-scale (segmentation/DiNAT.md).
# Source config: https://github.com/SHI-Labs/Neighborhood-Attention-Transformer segmentation/configs/dinat/upernet_dinat_mini_512x512_160k_ade20k.py
# (schedule, optimizer, weight-decay exemptions and drop-path as published).
_base_ = ["../_base_/upernet_160k_ade20k.py"]

model = dict(
    backbone=dict(
        model_name="dinat_mini",
        model_kwargs=dict(drop_path_rate=0.2),
        init_cfg=dict(type="Pretrained", checkpoint="timm:dinat_mini.in1k"),
    ),
    decode_head=dict(in_channels=[64, 128, 256, 512], in_index=[0, 1, 2, 3]),
    auxiliary_head=dict(in_channels=256, in_index=2),
)
optim_wrapper = dict(
    paramwise_cfg=dict(
        _delete_=True, custom_keys={"rpb": dict(decay_mult=0.0), "norm": dict(decay_mult=0.0)}
    )
)
