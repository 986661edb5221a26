# biformer_small -- reproduces the published result: ADE20K val mIoU 48.9 (semantic_segmentation/README.md).
# Source config: https://github.com/rayleizhu/BiFormer semantic_segmentation/configs/ade20k/sfpn.biformer_small.py
# (schedule, optimizer, weight-decay exemptions and drop-path as published).
_base_ = ["../_base_/fpn_80k_ade20k.py"]

model = dict(
    backbone=dict(
        model_name="biformer_small",
        model_kwargs=dict(drop_path_rate=0.15),
        init_cfg=dict(type="Pretrained", checkpoint="timm:biformer_small.in1k"),
    ),
    neck=dict(in_channels=[64, 128, 256, 512]),
)
