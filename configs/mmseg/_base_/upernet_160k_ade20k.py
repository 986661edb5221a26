# UPerNet on ADE20K, 512x512 crops, 160k iterations, batch 16 (2 per GPU x 8), AdamW 6e-5 /
# wd 0.01, linear warmup 1500 iters from 1e-6 then poly (power 1.0) to 0: the Swin UPerNet recipe
# that NAT/DiNAT, BiFormer and FocalNet report with, on mmseg 1.x's own base configs. Family
# configs set the backbone, decode/auxiliary in_channels and the published decay exemptions.
_base_ = [
    "mmseg::_base_/models/upernet_swin.py",
    "mmseg::_base_/datasets/ade20k.py",
    "mmseg::_base_/default_runtime.py",
    "mmseg::_base_/schedules/schedule_160k.py",
]
custom_imports = dict(imports=["visionattn.mm"], allow_failed_imports=False)

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(_delete_=True, type="VisionAttnBackbone", downstream="seg"),
    decode_head=dict(in_channels=[64, 128, 256, 512], num_classes=150),
    auxiliary_head=dict(in_channels=256, num_classes=150),
)

train_dataloader = dict(batch_size=2)
optim_wrapper = dict(
    _delete_=True,
    type="AmpOptimWrapper",
    optimizer=dict(type="AdamW", lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={"norm": dict(decay_mult=0.0)}),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type="PolyLR", eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
