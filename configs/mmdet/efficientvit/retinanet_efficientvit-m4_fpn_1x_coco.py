# va_efficientvit_m4 -- reproduces the published result: COCO val box AP 32.7 (EfficientViT/downstream/README.md).
# Source config: https://github.com/microsoft/Cream/tree/main/EfficientViT/downstream/configs/retinanet_efficientvit_m4_fpn_1x_coco.py
# (schedule, optimizer, weight-decay exemptions and drop-path as published).
_base_ = ["../_base_/retinanet_fpn_1x_coco.py"]

model = dict(
    backbone=dict(
        model_name="va_efficientvit_m4",
        init_cfg=dict(type="Pretrained", checkpoint="timm:va_efficientvit_m4.r224_in1k"),
    ),
    neck=dict(
        _delete_=True,
        type="TransposedFPN",
        in_channels=[128, 256, 384],
        out_channels=256,
        start_level=0,
        num_outs=5,
        num_extra_trans_convs=1,
        add_extra_convs="on_input",
    ),
)
optim_wrapper = dict(
    type="OptimWrapper",
    paramwise_cfg=dict(
        _delete_=True,
        custom_keys={
            "attention_biases": dict(decay_mult=0.0),
            "attention_bias_idxs": dict(decay_mult=0.0),
        },
    ),
)
