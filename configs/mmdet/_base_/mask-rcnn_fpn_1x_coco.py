# Mask R-CNN + FPN on COCO, 1x (12 epochs, lr steps at 8 and 11), AdamW 1e-4 / wd 0.05, batch
# 16 (2 per GPU x 8), single-scale 1333x800: the 1x recipe of the Swin, BiFormer and
# EfficientViT detection results, on mmdet 3.x's own base configs. Family configs set the
# backbone (type VisionAttnBackbone), the neck's in_channels and the published optimizer.
_base_ = [
    "mmdet::_base_/models/mask-rcnn_r50_fpn.py",
    "mmdet::_base_/datasets/coco_instance.py",
    "mmdet::_base_/schedules/schedule_1x.py",
    "mmdet::_base_/default_runtime.py",
]
custom_imports = dict(imports=["visionattn.mm"], allow_failed_imports=False)

model = dict(
    backbone=dict(_delete_=True, type="VisionAttnBackbone", downstream="det"),
    neck=dict(in_channels=[64, 128, 256, 512]),
)

train_dataloader = dict(batch_size=2, num_workers=2)
optim_wrapper = dict(
    _delete_=True,
    # the published runs trained in mixed precision (fp16)
    type="AmpOptimWrapper",
    optimizer=dict(type="AdamW", lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={"norm": dict(decay_mult=0.0)}),
)
# lr 1e-4 is for a total batch of 16; `--auto-scale-lr` rescales it for other batch sizes
auto_scale_lr = dict(enable=False, base_batch_size=16)
