# biformer_small -- reproduces the published result: ADE20K val mIoU 49.8 single-scale / 50.8 multi-scale (semantic_segmentation/README.md).
# Source config: https://github.com/rayleizhu/BiFormer semantic_segmentation/configs/ade20k/upernet.biformer_small.py
# (schedule, optimizer, weight-decay exemptions and drop-path as published).
_base_ = ["../_base_/upernet_160k_ade20k.py"]

model = dict(
    backbone=dict(
        model_name="biformer_small",
        model_kwargs=dict(drop_path_rate=0.3),
        init_cfg=dict(type="Pretrained", checkpoint="timm:biformer_small.in1k"),
    ),
    decode_head=dict(in_channels=[64, 128, 256, 512], in_index=[0, 1, 2, 3]),
    auxiliary_head=dict(in_channels=256, in_index=2),
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
