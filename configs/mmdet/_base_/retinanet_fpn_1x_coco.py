# RetinaNet + FPN (P3-P7 from stride-8..32 outputs, extra convs on the input) on COCO, 1x,
# batch 16, single-scale 1333x800: mmdet's RetinaNet 1x recipe with AdamW (the BiFormer and
# EfficientViT RetinaNet results). Family configs set the backbone, in_channels, optimizer.
_base_ = [
    "mmdet::_base_/models/retinanet_r50_fpn.py",
    "mmdet::_base_/datasets/coco_detection.py",
    "mmdet::_base_/schedules/schedule_1x.py",
    "mmdet::_base_/default_runtime.py",
]
custom_imports = dict(imports=["visionattn.mm"], allow_failed_imports=False)

model = dict(
    backbone=dict(_delete_=True, type="VisionAttnBackbone", downstream="det"),
    neck=dict(in_channels=[64, 128, 256, 512], start_level=1, add_extra_convs="on_input"),
)

train_dataloader = dict(batch_size=2, num_workers=2)
optim_wrapper = dict(
    _delete_=True,
    type="AmpOptimWrapper",
    optimizer=dict(type="AdamW", lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={"norm": dict(decay_mult=0.0)}),
)
auto_scale_lr = dict(enable=False, base_batch_size=16)
