# Semantic FPN on ADE20K, 512x512 crops, 80k iterations, batch 32 (4 per GPU x 8), AdamW 2e-4 /
# wd 1e-4, linear warmup 1000 iters from 0.1 then cosine to 0: the BiFormer S-FPN recipe
# (rayleizhu/BiFormer semantic_segmentation/configs/ade20k/sfpn.biformer_small.py, itself the
# PVT/UniFormer recipe on 8 GPUs: lr x2, iterations / 2), on mmseg 1.x's base configs.
_base_ = [
    "mmseg::_base_/models/fpn_r50.py",
    "mmseg::_base_/datasets/ade20k.py",
    "mmseg::_base_/default_runtime.py",
    "mmseg::_base_/schedules/schedule_80k.py",
]
custom_imports = dict(imports=["visionattn.mm"], allow_failed_imports=False)

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(_delete_=True, type="VisionAttnBackbone", downstream="seg"),
    neck=dict(in_channels=[64, 128, 256, 512]),
    decode_head=dict(num_classes=150),
)

train_dataloader = dict(batch_size=4)
optim_wrapper = dict(
    _delete_=True,
    type="AmpOptimWrapper",
    optimizer=dict(type="AdamW", lr=0.0002, weight_decay=0.0001),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=1000),
    dict(type="CosineAnnealingLR", eta_min=0.0, by_epoch=False, begin=1000, end=80000),
]
