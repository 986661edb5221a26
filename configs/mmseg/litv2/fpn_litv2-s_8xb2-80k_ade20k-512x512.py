# litv2_small -- reproduces the published result: ADE20K val mIoU 44.3 (segmentation/README.md).
# Source config: https://github.com/ziplab/LITv2 segmentation/configs/litv2/litv2_s_fpn_r50_512x512_80k_ade20k.py
# (schedule, optimizer, weight-decay exemptions and drop-path as published).
_base_ = ["../_base_/fpn_80k_ade20k.py"]

model = dict(
    backbone=dict(
        model_name="litv2_small",
        model_kwargs=dict(drop_path_rate=0.2),
        init_cfg=dict(type="Pretrained", checkpoint="timm:litv2_small.in1k"),
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
optim_wrapper = dict(optimizer=dict(_delete_=True, type="AdamW", lr=0.0001, weight_decay=0.0001))
param_scheduler = [
    dict(type="PolyLR", eta_min=1e-06, power=0.9, begin=0, end=80000, by_epoch=False)
]
train_cfg = dict(max_iters=80000)
train_dataloader = dict(batch_size=2)
