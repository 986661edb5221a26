# agent_pvt_tiny -- reproduces the published result: COCO val box AP 40.3 (downstream/detection/README.md).
# Source config: https://github.com/LeapLabTHU/Agent-Attention downstream/detection/configs/agent_pvt/agent_pvt_t_rtn_1x_12-16-28-28.py
# (schedule, optimizer, weight-decay exemptions and drop-path as published).
# downstream="det"|"seg" applies the published downstream_agent_shapes (visionattn.mm.DOWNSTREAM_KWARGS).
_base_ = ["../_base_/retinanet_fpn_1x_coco.py"]

model = dict(
    backbone=dict(
        model_name="agent_pvt_tiny",
        model_kwargs=dict(drop_path_rate=0.1),
        init_cfg=dict(type="Pretrained", checkpoint="timm:agent_pvt_tiny.in1k"),
    ),
    neck=dict(in_channels=[64, 128, 320, 512]),
)
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(_delete_=True, type="AdamW", lr=0.0001, weight_decay=0.0001),
    paramwise_cfg=None,
)
