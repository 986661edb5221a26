# Mask R-CNN 1x with the DETR / Sparse R-CNN multi-scale + crop training augmentation used by
# the Swin, NAT/DiNAT and FocalNet Mask R-CNN results (official mmdet 2.x `AutoAugment` policies: shorter side one of
# 480..800 step 32, or resize to 400/500/600 -> random crop 384..600 -> resize to 480..800;
# long side <= 1333), written with mmdet 3.x transforms (as mmdet's own
# swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py does).
_base_ = "./mask-rcnn_fpn_1x_coco.py"

_scales = [(1333, s) for s in range(480, 801, 32)]
train_pipeline = [
    dict(type="LoadImageFromFile", backend_args=None),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="RandomFlip", prob=0.5),
    dict(
        type="RandomChoice",
        transforms=[
            [dict(type="RandomChoiceResize", scales=_scales, keep_ratio=True)],
            [
                dict(
                    type="RandomChoiceResize",
                    scales=[(1333, 400), (1333, 500), (1333, 600)],
                    keep_ratio=True,
                ),
                dict(
                    type="RandomCrop",
                    crop_type="absolute_range",
                    crop_size=(384, 600),
                    allow_negative_crop=True,
                ),
                dict(type="RandomChoiceResize", scales=_scales, keep_ratio=True),
            ],
        ],
    ),
    dict(type="PackDetInputs"),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
