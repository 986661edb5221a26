# biformer_small -- reproduces the published result: COCO val box AP 47.8 / mask AP 43.2 (object_detection/README.md).
# Source config: https://github.com/rayleizhu/BiFormer object_detection/configs/coco/maskrcnn.1x.biformer_small.py
# (schedule, optimizer, weight-decay exemptions and drop-path as published).
_base_ = ["../_base_/mask-rcnn_fpn_1x_coco.py"]

model = dict(
    backbone=dict(
        model_name="biformer_small",
        model_kwargs=dict(drop_path_rate=0.2),
        init_cfg=dict(type="Pretrained", checkpoint="timm:biformer_small.in1k"),
    ),
    neck=dict(in_channels=[64, 128, 256, 512]),
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
