# Mask R-CNN + FPN on COCO, 3x (36 epochs, lr steps at 27 and 33) with the multi-scale + crop
# augmentation: the NAT/DiNAT and FocalNet 3x recipe (AdamW 1e-4 / wd 0.05, warmup 500 iters
# from 0.001, batch 16).
_base_ = "./mask-rcnn_fpn_ms-crop-1x_coco.py"

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(
        type="MultiStepLR",
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[27, 33],
        gamma=0.1,
    ),
]
