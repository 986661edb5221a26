"""visionattn.mm end to end: every family's detector and segmentor built from configs/mmdet and
configs/mmseg, one training step and one inference on tiny synthetic COCO / ADE20K datasets
written to disk and read by mmdet's / mmseg's own dataset classes, and classification
checkpoints loaded through ``init_cfg`` with every key accounted for.

Needs the `mm` extra (``make setup-mm``). Without it the module is skipped, unless
``VISIONATTN_REQUIRE_MM=1`` (CI sets it), which turns the missing stack into a failure.
"""

from __future__ import annotations

import copy
import functools
import http.server
import json
import os
import pathlib
import threading

import numpy as np
import pytest
import torch

if os.environ.get("VISIONATTN_REQUIRE_MM") == "1":
    import mmdet  # noqa: F401
    import mmseg  # noqa: F401
else:
    pytest.importorskip("mmdet", reason="mm extra not installed (make setup-mm)")
    pytest.importorskip("mmseg", reason="mm extra not installed (make setup-mm)")

import timm  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.dataset import pseudo_collate  # noqa: E402
from mmengine.model import revert_sync_batchnorm  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from PIL import Image  # noqa: E402

import visionattn.mm as vmm  # noqa: E402

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"

# family -> (tiny registered variant, detection config, segmentation config)
FAMILIES = {
    "nat": ("test_nat", "nat/mask-rcnn_nat-mini_fpn_ms-crop-3x_coco.py",
            "nat/upernet_nat-mini_8xb2-160k_ade20k-512x512.py"),
    "dinat": ("test_dinat", "dinat/mask-rcnn_dinat-mini_fpn_ms-crop-3x_coco.py",
              "dinat/upernet_dinat-mini_8xb2-160k_ade20k-512x512.py"),
    "biformer": ("test_biformer", "biformer/mask-rcnn_biformer-s_fpn_1x_coco.py",
                 "biformer/upernet_biformer-s_8xb2-160k_ade20k-512x512.py"),
    "focalnet": ("test_va_focalnet", "focalnet/mask-rcnn_focalnet-t-srf_fpn_ms-crop-1x_coco.py",
                 "focalnet/upernet_focalnet-t-srf_8xb2-160k_ade20k-512x512.py"),
    "maxvit": ("test_va_maxvit", "maxvit/retinanet_maxvit-t_fpn_1x_coco.py",
               "maxvit/fpn_maxvit-t_8xb4-80k_ade20k-512x512.py"),
    "halonet": ("test_va_halonet", "halonet/mask-rcnn_halonet50ts_fpn_1x_coco.py",
                "halonet/fpn_halonet50ts_8xb4-80k_ade20k-512x512.py"),
    "efficientvit": ("test_va_efficientvit", "efficientvit/mask-rcnn_efficientvit-m4_fpn_1x_coco.py",
                     "efficientvit/upernet_efficientvit-m4_8xb2-160k_ade20k-512x512.py"),
    "litv2": ("test_litv2", "litv2/mask-rcnn_litv2-s_fpn_1x_coco.py",
              "litv2/fpn_litv2-s_8xb2-80k_ade20k-512x512.py"),
    "agent_swin": ("test_agent_swin", "agent_swin/mask-rcnn_agent-swin-t_fpn_ms-crop-1x_coco.py",
                   "agent_swin/upernet_agent-swin-t_8xb2-160k_ade20k-512x512.py"),
    "agent_pvt": ("test_agent_pvt", "agent_pvt/retinanet_agent-pvt-t_fpn_1x_coco.py",
                  "agent_pvt/fpn_agent-pvt-t_b2-40k_ade20k-512x512.py"),
    "agent_cswin": ("test_agent_cswin", "agent_cswin/mask-rcnn_agent-cswin-t_fpn_1x_coco.py",
                    "agent_cswin/upernet_agent-cswin-t_8xb2-160k_ade20k-512x512.py"),
}  # fmt: skip

IMG_H, IMG_W = 96, 128  # synthetic image size (a multiple of every family's total stride)


# ----------------------------------------------------------------------------------------------
# synthetic datasets on disk


def _poly(x0: float, y0: float, w: float, h: float) -> list[float]:
    return [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Two images, three boxes with polygon masks, two categories, COCO json layout."""
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    boxes = {1: [(8, 10, 40, 30, 1), (60, 40, 50, 40, 2)], 2: [(20, 20, 70, 50, 1)]}
    for img_id, objs in boxes.items():
        name = f"{img_id:06d}.jpg"
        arr = rng.integers(0, 255, (IMG_H, IMG_W, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "images" / name)
        images.append(dict(id=img_id, file_name=name, height=IMG_H, width=IMG_W))
        for x, y, w, h, cat in objs:
            anns.append(
                dict(id=len(anns) + 1, image_id=img_id, category_id=cat, bbox=[x, y, w, h],
                     area=w * h, iscrowd=0, segmentation=[_poly(x, y, w, h)])
            )  # fmt: skip
    cats = [dict(id=1, name="thing"), dict(id=2, name="stuff")]
    (root / "ann.json").write_text(
        json.dumps(dict(images=images, annotations=anns, categories=cats))
    )
    return root


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Two images with label maps in ADE20K's layout (jpg images, png labels, 0 = ignore)."""
    root = tmp_path_factory.mktemp("ade")
    img_dir = root / "images" / "training"
    ann_dir = root / "annotations" / "training"
    img_dir.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (IMG_H, IMG_W, 3), dtype=np.uint8)).save(
            img_dir / f"ADE_train_{i:08d}.jpg"
        )
        label = np.zeros((IMG_H, IMG_W), dtype=np.uint8)
        label[: IMG_H // 2] = 3 + i
        label[IMG_H // 2 :, : IMG_W // 2] = 150
        Image.fromarray(label).save(ann_dir / f"ADE_train_{i:08d}.png")
    return root


def _coco_dataset(root: pathlib.Path, test_mode: bool) -> dict:
    load = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    ]
    return dict(
        type="CocoDataset",
        data_root=str(root),
        ann_file="ann.json",
        data_prefix=dict(img="images/"),
        metainfo=dict(classes=("thing", "stuff")),
        test_mode=test_mode,
        pipeline=[
            *load,
            dict(type="Resize", scale=(IMG_W, IMG_H), keep_ratio=True),
            dict(type="PackDetInputs"),
        ],
    )


def _ade_dataset(root: pathlib.Path) -> dict:
    return dict(
        type="ADE20KDataset",
        data_root=str(root),
        data_prefix=dict(img_path="images/training", seg_map_path="annotations/training"),
        pipeline=[
            dict(type="LoadImageFromFile"),
            dict(type="LoadAnnotations", reduce_zero_label=True),
            dict(type="PackSegInputs"),
        ],
    )


# ----------------------------------------------------------------------------------------------
# config -> tiny model


@functools.cache
def _tiny_channels(variant: str, kwargs_json: str) -> list[int]:
    return vmm.VisionAttnBackbone(variant, model_kwargs=json.loads(kwargs_json)).out_channels


@functools.cache
def _load_cfg(path: pathlib.Path) -> Config:
    return Config.fromfile(str(path))


def _tiny_cfg(path: str, variant: str) -> Config:
    """The config with its backbone swapped for the family's tiny variant (same adapter
    settings and model kwargs) and the channel counts that depend on it adjusted."""
    cfg = copy.deepcopy(_load_cfg(CONFIGS / path))
    bb = cfg.model.backbone
    assert bb.type == "VisionAttnBackbone"
    assert bb.init_cfg.type == "Pretrained"  # every config starts from a pretrained backbone
    bb.model_name = variant
    bb.init_cfg = None
    kwargs = vmm.downstream_kwargs(variant, bb.downstream)
    kwargs.update(bb.get("model_kwargs") or {})
    ch = _tiny_channels(variant, json.dumps(kwargs, sort_keys=True))
    if "neck" in cfg.model:
        cfg.model.neck.in_channels = ch
    if cfg.model.get("decode_head", {}).get("type") == "UPerHead":
        cfg.model.decode_head.in_channels = ch
        aux = cfg.model.auxiliary_head
        aux.in_channels = ch[aux.in_index]
        # narrower heads keep the CPU step short (their width is not under test)
        cfg.model.decode_head.channels = 64
        aux.channels = 32
    # fp16 AMP needs CUDA: the same optimizer and parameter-wise settings in fp32
    cfg.optim_wrapper.type = "OptimWrapper"
    cfg.optim_wrapper.pop("loss_scale", None)
    return cfg


def _finite_losses(log_vars: dict) -> None:
    assert "loss" in log_vars
    for k, v in log_vars.items():
        assert torch.isfinite(torch.as_tensor(v)).all(), (k, v)


def _train_then_infer(model: torch.nn.Module, cfg: Config, batch: dict) -> list:
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    model.train()
    _finite_losses(model.train_step(batch, optim))
    changed = [n for n, p in model.backbone.named_parameters() if not torch.equal(before[n], p)]
    assert changed, "one optimizer step left every backbone parameter unchanged"
    model.eval()
    with torch.no_grad():
        return model.test_step(batch)


def _check_paramwise(model: torch.nn.Module, cfg: Config) -> None:
    """The published weight-decay exemptions reach the backbone's parameters."""
    pw = cfg.optim_wrapper.get("paramwise_cfg") or {}
    keys = pw.get("custom_keys") or {}
    optim = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    wd = {id(p): g["weight_decay"] for g in optim.param_groups for p in g["params"]}
    base_wd = cfg.optim_wrapper.optimizer.weight_decay
    exempt = {k for k, o in keys.items() if o.get("decay_mult") == 0.0}
    hit = set()
    for name, p in model.backbone.named_parameters():
        key = next((k for k in keys if k in name), None)  # mmengine: first matching key
        if key in exempt:
            assert wd[id(p)] == 0.0, name
            hit.add(key)
    if pw.get("norm_decay_mult") == 0.0:
        norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)
        n = 0
        for m in model.backbone.modules():
            if isinstance(m, norms) and m.weight is not None:
                assert wd[id(m.weight)] == 0.0
                n += 1
        assert n
    # every exemption names parameters this backbone has ("absolute_pos_embed" and
    # "relative_position_bias_table" are kept verbatim from Swin-derived official configs)
    verbatim = {"absolute_pos_embed", "relative_position_bias_table", "attention_bias_idxs"}
    assert exempt - verbatim <= hit, exempt - hit
    assert all(g["weight_decay"] in (0.0, base_wd) for g in optim.param_groups)


# ----------------------------------------------------------------------------------------------
# end to end per family


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_detector_from_config(family: str, coco_root: pathlib.Path) -> None:
    from mmdet.registry import DATASETS, MODELS

    variant, det_cfg, _ = FAMILIES[family]
    cfg = _tiny_cfg("mmdet/" + det_cfg, variant)
    with DefaultScope.overwrite_default_scope("mmdet"):
        ds = DATASETS.build(_coco_dataset(coco_root, test_mode=False))
        assert len(ds) == 2
        batch = pseudo_collate([ds[0], ds[1]])
        model = MODELS.build(cfg.model)
        model.init_weights()
        assert isinstance(model.backbone, vmm.VisionAttnBackbone)
        assert model.backbone.model_name == variant
        _check_paramwise(model, cfg)
        preds = _train_then_infer(model, cfg, batch)
    assert len(preds) == 2
    for p in preds:
        inst = p.pred_instances
        assert inst.bboxes.shape[-1] == 4 and len(inst.bboxes) == len(inst.scores)
        if "mask" in det_cfg:
            assert inst.masks.shape[-2:] == (IMG_H, IMG_W)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_segmentor_from_config(family: str, ade_root: pathlib.Path) -> None:
    from mmseg.registry import DATASETS, MODELS

    variant, _, seg_cfg = FAMILIES[family]
    cfg = _tiny_cfg("mmseg/" + seg_cfg, variant)
    cfg.model.data_preprocessor.size = (IMG_H, IMG_W)  # not the 512x512 training crop
    with DefaultScope.overwrite_default_scope("mmseg"):
        ds = DATASETS.build(_ade_dataset(ade_root))
        assert len(ds) == 2
        batch = pseudo_collate([ds[0], ds[1]])
        model = revert_sync_batchnorm(MODELS.build(cfg.model))  # SyncBN needs a process group
        model.init_weights()
        assert isinstance(model.backbone, vmm.VisionAttnBackbone)
        _check_paramwise(model, cfg)
        preds = _train_then_infer(model, cfg, batch)
    assert len(preds) == 2
    for p in preds:
        assert p.pred_sem_seg.data.shape == (1, IMG_H, IMG_W)
        assert p.pred_sem_seg.data.max() < 150


# ----------------------------------------------------------------------------------------------
# configs


def _all_configs() -> list[pathlib.Path]:
    return sorted(p for p in CONFIGS.glob("mm*/*/*.py") if p.parent.name != "_base_")


def test_every_config_parses_with_a_registered_pretrained_backbone() -> None:
    paths = _all_configs()
    assert len(paths) >= 44
    for path in paths:
        cfg = _load_cfg(path)
        bb = cfg.model.backbone
        assert bb.type == "VisionAttnBackbone", path
        assert timm.is_model(bb.model_name), path
        tag = bb.init_cfg.checkpoint.removeprefix("timm:")
        assert tag in timm.list_pretrained(bb.model_name + ".*"), (path, tag)
        assert bb.downstream == ("det" if path.parts[-3] == "mmdet" else "seg"), path
        assert cfg.custom_imports.imports == ["visionattn.mm"], path


def test_downstream_kwargs_match_the_official_settings() -> None:
    det = vmm.downstream_kwargs("dinat_mini", "det")
    assert det["dilations"] == [[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7], [1, 3, 1, 3, 1]]
    assert det["dense_norms"] is True
    assert vmm.downstream_kwargs("dinat_s_tiny", "seg")["dilations"][0] == [1, 16]
    assert vmm.downstream_kwargs("biformer_small", "det") == dict(
        n_win=16, auto_pad=True, dense_norms=True
    )
    assert vmm.downstream_kwargs("biformer_small", "seg")["n_win"] == 8
    assert vmm.downstream_kwargs("va_focalnet_tiny_srf", "det") == dict(focal_windows=(9, 9, 9, 9))
    assert vmm.downstream_kwargs("nat_mini", "seg") == dict(dense_norms=True)
    # LeapLabTHU/Agent-Attention downstream configs (*_9-12-14-7.py, *_12-16-28-28.py)
    swin = vmm.downstream_kwargs("agent_swin_tiny", "det")
    assert swin == dict(
        downstream_agent_shapes=[(9, 9), (12, 12), (14, 14), (7, 7)], downstream_windows=True
    )
    pvt = vmm.downstream_kwargs("agent_pvt_tiny", "seg")
    assert pvt == dict(downstream_agent_shapes=[(12, 12), (16, 16), (28, 28), (28, 28)])
    pvt["downstream_agent_shapes"].append((1, 1))  # a copy: the table stays as it is
    assert len(vmm.downstream_kwargs("agent_pvt_tiny", "seg")["downstream_agent_shapes"]) == 4
    with pytest.raises(ValueError, match="task"):
        vmm.downstream_kwargs("nat_mini", "cls")


# ----------------------------------------------------------------------------------------------
# checkpoints through init_cfg


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_classification_checkpoint_every_key_accounted_for(
    family: str, tmp_path: pathlib.Path
) -> None:
    variant = FAMILIES[family][0]
    torch.manual_seed(0)
    src = timm.create_model(variant)  # a classification model with its head
    sd = src.state_dict()
    torch.save({"state_dict": sd}, tmp_path / "cls.pth")
    bb = vmm.VisionAttnBackbone(
        variant,
        downstream="det",
        init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "cls.pth")),
    )
    bb.init_weights()
    rep = bb.load_report
    own = bb.model.state_dict()
    # every backbone tensor is loaded or new (per-output norms); nothing is both
    assert set(rep["loaded"]) | {k for k in rep["new"] if not k.startswith("out_norms.")} == set(
        own
    )
    assert not set(rep["loaded"]) & set(rep["new"])
    assert all("norm" in k for k in rep["new"])
    # every checkpoint tensor is loaded or dropped as outside the backbone (the classifier
    # head among them; the final norm where per-output norms replace it); none is both
    assert set(rep["loaded"]) | set(rep["dropped"]) == set(sd)
    assert not set(rep["loaded"]) & set(rep["dropped"])
    assert any("head" in k for k in rep["dropped"])
    assert all("head" in k or k.startswith("norm.") for k in rep["dropped"])
    resized = set(rep["resized"])
    if family in ("agent_swin", "agent_pvt"):
        # the official downstream agent grids are in effect; the biases load unresized (they
        # are resized along the agent axis at run time, as officially)
        want = set(vmm.downstream_kwargs(variant, "det")["downstream_agent_shapes"])
        got = {m.agent_shape for m in bb.model.modules() if hasattr(m, "agent_shape")}
        assert got and got <= want
        # downstream windows keep their size where the (tiny) classification map was smaller
        # than a window: only those window tables are resized
        assert all(k.endswith("relative_position_bias_table") for k in resized)
        assert family == "agent_swin" or not resized
    for k in rep["loaded"]:
        if k in sd and k not in resized:
            assert torch.equal(own[k], sd[k]), k
    # the features are the stage outputs of the model with the same (downstream) kwargs
    # holding the checkpoint as is (through any new norms)
    if not rep["new"] and not resized:
        x = torch.randn(1, 3, 64, 64)
        ref_model = timm.create_model(variant, **bb.model_kwargs)
        ref_model.load_state_dict(sd, strict=True)
        bb.eval(), ref_model.eval()
        with torch.no_grad():
            ref = ref_model.forward_intermediates(
                x, indices=list(bb.out_indices), intermediates_only=True
            )
            for a, b in zip(bb(x), ref):
                torch.testing.assert_close(a, b)


def test_focal_kernels_and_rpb_tables_resized(tmp_path: pathlib.Path) -> None:
    # FocalNet: classification kernel 3/5 -> detection 9/11, centred zero padding
    src = timm.create_model("test_va_focalnet")
    torch.save(src.state_dict(), tmp_path / "focal.pth")
    bb = vmm.VisionAttnBackbone(
        "test_va_focalnet",
        downstream="det",
        init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "focal.pth")),
    )
    bb.init_weights()
    assert bb.load_report["resized"]
    assert all(k.startswith("out_norms.") for k in bb.load_report["new"])
    for k in bb.load_report["resized"]:
        w_src, w = src.state_dict()[k], bb.model.state_dict()[k]
        d = (w.shape[-1] - w_src.shape[-1]) // 2
        assert d > 0
        torch.testing.assert_close(w[..., d:-d, d:-d], w_src)
        ring = w.clone()
        ring[..., d:-d, d:-d] = 0
        assert not ring.any()  # zero outside the centred pretrained kernel
    # NAT: a kernel-3 checkpoint into a kernel-5 model resizes every bias table
    src = timm.create_model("test_nat")
    torch.save(src.state_dict(), tmp_path / "nat.pth")
    bb = vmm.VisionAttnBackbone("test_nat", downstream="seg", model_kwargs=dict(kernel_size=5))
    bb.load_pretrained(str(tmp_path / "nat.pth"))
    rpb = [k for k in bb.model.state_dict() if k.endswith(".rpb")]
    assert rpb and all(bb.model.state_dict()[k].shape[-1] == 9 for k in rpb)
    assert sorted(bb.load_report["new"]) == sorted(
        k for k in bb.model.state_dict() if k.startswith("dense_norms.")
    )


def test_checkpoint_sources_url_and_pretrained_tag(tmp_path: pathlib.Path) -> None:
    src = timm.create_model("test_biformer")
    torch.save({"model": src.state_dict()}, tmp_path / "bif.pth")
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path)
    )  # a real HTTP download of the file
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        torch.hub.set_dir(str(tmp_path / "hub"))
        url = f"http://127.0.0.1:{server.server_address[1]}/bif.pth"
        bb = vmm.VisionAttnBackbone("test_biformer", downstream="seg")
        bb.load_pretrained(url)
    finally:
        server.shutdown()
    own = bb.model.state_dict()
    for k in bb.load_report["loaded"]:
        assert torch.equal(own[k], src.state_dict()[k]), k
    assert bb.load_report["new"] and all(
        k.startswith("dense_norms.") for k in bb.load_report["new"]
    )
    # a timm pretrained tag, pointed at a local file (no network in tests)
    src = timm.create_model("test_nat")
    torch.save(src.state_dict(), tmp_path / "nat.pth")
    bb = vmm.VisionAttnBackbone(
        "test_nat",
        init_cfg=dict(
            type="Pretrained",
            checkpoint="timm:test_nat.untrained",
            pretrained_cfg_overlay=dict(file=str(tmp_path / "nat.pth")),
        ),
    )
    bb.init_weights()
    assert bb.load_report["loaded"] and not bb.load_report["new"]
    torch.testing.assert_close(
        bb.model.state_dict()["stem.conv1.weight"], src.state_dict()["stem.conv1.weight"]
    )


def test_unaccounted_keys_raise(tmp_path: pathlib.Path) -> None:
    sd = timm.create_model("test_va_halonet").state_dict()
    bad = dict(sd, **{"stages.0.bogus.weight": torch.zeros(3)})
    torch.save(bad, tmp_path / "extra.pth")
    bb = vmm.VisionAttnBackbone("test_va_halonet")
    with pytest.raises(ValueError, match="bogus"):
        bb.load_pretrained(str(tmp_path / "extra.pth"))
    short = {k: v for k, v in sd.items() if "stages.1." not in k}
    torch.save(short, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="stages.1"):
        bb.load_pretrained(str(tmp_path / "short.pth"))
    shape = copy.copy(sd)
    k = next(k for k in sd if k.endswith("conv.weight"))
    shape[k] = torch.zeros(1, 1, 1, 1)
    torch.save(shape, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="cannot be adapted"):
        bb.load_pretrained(str(tmp_path / "shape.pth"))
    with pytest.raises(ValueError, match="not a file"):
        bb.load_pretrained(str(tmp_path / "missing.pth"))


# ----------------------------------------------------------------------------------------------
# adapter options


def test_out_indices_frozen_stages_with_cp_norm_eval() -> None:
    bb = vmm.VisionAttnBackbone("test_va_maxvit", out_indices=(2, 4), frozen_stages=2)
    assert bb.out_indices == (2, 4) and bb.strides == [8, 32]
    x = torch.randn(2, 3, 64, 96)
    outs = bb(x)
    assert [tuple(o.shape[-2:]) for o in outs] == [(8, 12), (2, 3)]
    frozen = {n for n, p in bb.model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("stem.") for n in frozen)
    assert any(n.startswith("stages.1.") for n in frozen)
    assert not any(n.startswith("stages.2.") for n in frozen)
    bb.train()
    assert not bb.model.stem.training and not bb.model.stages[1].training
    assert bb.model.stages[2].training
    # the default levels are those at stride >= 4; the stem's stride-2 map is not among them
    assert vmm.VisionAttnBackbone("test_va_maxvit").out_indices == (1, 2, 3, 4)
    # gradient checkpointing gives the same gradients
    torch.manual_seed(0)
    a = vmm.VisionAttnBackbone("test_nat", downstream="det")
    b = vmm.VisionAttnBackbone("test_nat", downstream="det", with_cp=True)
    b.load_state_dict(a.state_dict())
    a.train(), b.train()
    sa = sum(o.square().mean() for o in a(x))
    sb = sum(o.square().mean() for o in b(x))
    sa.backward(), sb.backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)
    bn = vmm.VisionAttnBackbone("test_va_efficientvit", norm_eval=True).train()
    assert not any(
        m.training for m in bn.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    )
    with pytest.raises(ValueError, match="out_indices"):
        vmm.VisionAttnBackbone("test_nat", out_indices=(0, 4))
    with pytest.raises(ValueError, match="model_name"):
        vmm.VisionAttnBackbone("no_such_model")
    with pytest.raises(ValueError, match="model_kwargs"):
        vmm.VisionAttnBackbone("test_nat", model_kwargs=dict(pretrained=True))


def test_registered_in_both_registries() -> None:
    from mmdet.registry import MODELS as DET
    from mmseg.registry import MODELS as SEG

    assert vmm.REGISTERED_IN == ["mmdet", "mmseg"]
    assert DET.get("VisionAttnBackbone") is vmm.VisionAttnBackbone
    assert SEG.get("VisionAttnBackbone") is vmm.VisionAttnBackbone
    assert DET.get("TransposedFPN") is vmm.TransposedFPN


def test_transposed_fpn_levels() -> None:
    neck = vmm.TransposedFPN([16, 24, 32], 8, num_outs=5, num_extra_trans_convs=2)
    feats = [torch.randn(1, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate([16, 24, 32])]
    outs = neck(tuple(feats))
    assert [o.shape[-1] for o in outs] == [64, 32, 16, 8, 4]
    neck = vmm.TransposedFPN(
        [16, 24, 32], 8, num_outs=5, num_extra_trans_convs=1, add_extra_convs="on_input"
    )
    assert [o.shape[-1] for o in neck(tuple(feats))] == [32, 16, 8, 4, 2]


# ----------------------------------------------------------------------------------------------
# official checkpoints (parity vectors: official state dicts, inputs and stage features)


@pytest.mark.parametrize(
    "stem, family", [("nat_mini_reduced", "nat"), ("dinat_mini_reduced", "dinat"),
                     ("biformer_tiny_reduced", "biformer")],
)  # fmt: skip
def test_official_checkpoint_through_init_cfg(
    parity_path: pathlib.Path, tmp_path: pathlib.Path, stem: str, family: str
) -> None:
    """An official classification checkpoint (official key names, wrapped as the official
    training scripts save it) loads through init_cfg into the detection layout: every official
    tensor is loaded or dropped (classifier, final norm), the per-output norms are new, and the
    outputs are the official stage features through those fresh norms."""
    from safetensors.torch import load_file

    from visionattn.backbones import biformer, nat

    st = parity_path / f"{stem}.safetensors"
    if not st.is_file():
        pytest.skip(f"parity vector {st} not found")
    t = load_file(str(st))
    meta = json.loads((parity_path / f"{stem}.json").read_text())
    sd = {k[len("state_dict.") :]: v for k, v in t.items() if k.startswith("state_dict.")}
    mod = biformer if family == "biformer" else nat
    name, args = mod.official_model_args(sd, meta["constructor_kwargs"])
    args.pop("num_classes")
    torch.save({"model": sd}, tmp_path / "official.pth")
    bb = vmm.VisionAttnBackbone(
        name, model_kwargs=args, downstream="det",
        init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "official.pth")),
    )  # fmt: skip
    bb.init_weights()
    rep = bb.load_report
    own = bb.model.state_dict()
    assert set(rep["loaded"]) | set(rep["new"]) == set(own)
    assert rep["new"] and all(k.startswith("dense_norms.") for k in rep["new"])
    # every official tensor is loaded or dropped (one-to-one renames), head and final norm dropped
    assert len(rep["loaded"]) + len(rep["dropped"]) == len(sd)
    assert {k.split(".")[0] for k in rep["dropped"]} == {"head", "norm"}
    assert any(k.startswith("head.") for k in rep["dropped"])
    bb.eval()
    with torch.no_grad():
        feats = bb(t["input"])
    assert len(feats) == len(meta["features"])
    for f, fm in zip(feats, meta["features"]):
        ref = t[fm["key"]]
        if fm["layout"] == "NHWC":
            ref = ref.permute(0, 3, 1, 2)
        eps = bb.model.dense_norms[int(fm["key"].split(".")[1])].eps
        ref = torch.nn.functional.layer_norm(ref.permute(0, 2, 3, 1), ref.shape[1:2], eps=eps)
        ref = ref.permute(0, 3, 1, 2)
        assert (f - ref).abs().max().item() <= 1e-4, fm["module"]


def test_adapter_checkpoint_round_trip(tmp_path: pathlib.Path) -> None:
    """A trained model's checkpoint (``backbone.model.*`` and the adapter's
    ``backbone.out_norms.*``, as mmdet saves it) loads back into the backbone completely."""
    a = vmm.VisionAttnBackbone("test_va_focalnet", downstream="det")
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ckpt = {"meta": {}, "state_dict": {f"backbone.{k}": v for k, v in a.state_dict().items()}}
    ckpt["state_dict"]["neck.lateral_convs.0.conv.weight"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "det.pth")
    b = vmm.VisionAttnBackbone("test_va_focalnet", downstream="det")
    b.load_pretrained(str(tmp_path / "det.pth"))
    assert not b.load_report["new"] and not b.load_report["resized"]
    assert set(b.load_report["loaded"]) == {
        k.removeprefix("model.") for k in a.state_dict() if k.startswith("model.")
    } | {k for k in a.state_dict() if k.startswith("out_norms.")}
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k


def test_install_patches_in_effect(tmp_path: pathlib.Path) -> None:
    """tools/install_mm.sh's mmengine patches: its checkpoints (meta with non-tensor objects)
    load under torch >= 2.6, and `mmdet::` base configs resolve without pkg_resources."""
    from mmengine.runner import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 2)
    meta = dict(epoch=3, hist=np.arange(4), cfg=Config(dict(a=1)))
    save_checkpoint(dict(meta=meta, state_dict=model.state_dict()), str(tmp_path / "m.pth"))
    other = torch.nn.Linear(3, 2)
    ckpt = load_checkpoint(other, str(tmp_path / "m.pth"))
    assert ckpt["meta"]["epoch"] == 3 and (ckpt["meta"]["hist"] == np.arange(4)).all()
    assert torch.equal(other.weight, model.weight)
    from mmengine.utils import get_installed_path, is_installed

    assert is_installed("mmdet") and os.path.isdir(get_installed_path("mmdet"))


def test_relative_tables_resize_in_both_layouts() -> None:
    # ours [heads, 2w-1, 2w-1] and Swin's [(2w-1)^2, heads] (row-major over dy, dx) resize alike
    torch.manual_seed(3)
    grid = torch.randn(4, 3, 3)
    swin = grid.reshape(4, 9).t().contiguous()
    sd = {"a.rpb": grid.clone(), "b.relative_position_bias_table": swin.clone()}
    target = {
        "a.rpb": torch.empty(4, 13, 13),
        "b.relative_position_bias_table": torch.empty(169, 4),
    }
    out = vmm._fit_shapes(sd, target)
    assert out["a.rpb"].shape == (4, 13, 13)
    torch.testing.assert_close(out["b.relative_position_bias_table"].t().reshape(4, 13, 13),
                               out["a.rpb"])  # fmt: skip
    # a constant table stays constant (bicubic weights sum to one)
    const = vmm._fit_shapes({"c.rpb": torch.full((2, 3, 3), 0.5)}, {"c.rpb": torch.empty(2, 5, 5)})
    torch.testing.assert_close(const["c.rpb"], torch.full((2, 5, 5), 0.5))
    with pytest.raises(ValueError, match="cannot be adapted"):
        vmm._fit_shapes({"d.rpb": torch.zeros(8, 4)}, {"d.rpb": torch.empty(169, 4)})
