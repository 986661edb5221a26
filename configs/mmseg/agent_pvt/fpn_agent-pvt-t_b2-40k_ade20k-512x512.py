# agent_pvt_tiny -- reproduces the published result: ADE20K val mIoU 40.18, 40k iterations (downstream/segmentation/README.md).
# Source config: https://github.com/LeapLabTHU/Agent-Attention downstream/segmentation/configs/agent_pvt/fpn_agent_pvt_t_12-16-28-28.py
# (schedule, optimizer, weight-decay exemptions and drop-path as published).
# downstream="det"|"seg" applies the published downstream_agent_shapes (visionattn.mm.DOWNSTREAM_KWARGS).
_base_ = ["../_base_/fpn_80k_ade20k.py"]

model = dict(
    backbone=dict(
        model_name="agent_pvt_tiny",
        model_kwargs=dict(drop_path_rate=0.1),
        init_cfg=dict(type="Pretrained", checkpoint="timm:agent_pvt_tiny.in1k"),
    ),
    neck=dict(in_channels=[64, 128, 320, 512]),
)
optim_wrapper = dict(optimizer=dict(_delete_=True, type="AdamW", lr=0.0002, weight_decay=0.0001))
param_scheduler = [dict(type="PolyLR", eta_min=0.0, power=0.9, begin=0, end=40000, by_epoch=False)]
train_cfg = dict(max_iters=40000)
train_dataloader = dict(batch_size=2)  # per GPU; the GPU count is not stated in the source config
