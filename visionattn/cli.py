"""The ``visionattn`` command: list | train | validate | bench | convert | export | card.

``train``, ``validate`` and ``bench`` parse their own arguments (``visionattn train -h``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence

__all__ = ["main"]

# command -> "module:function" taking argv; imported lazily so `visionattn list` stays fast
_DELEGATED: dict[str, str] = {
    "train": "visionattn.train.cli:train_main",
    "validate": "visionattn.train.cli:validate_main",
    "bench models": "visionattn.train.cli:bench_models_main",
    "bench kernels": "visionattn.kernels.bench:main",
}


def _resolve(target: str) -> Callable[[list[str]], int | None]:
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)


def _count_params(name: str) -> int | None:
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name)
    except Exception:  # a model whose construction needs real tensors
        try:
            model = timm.create_model(name)
        except Exception:
            return None
    return sum(p.numel() for p in model.parameters())


def cmd_list(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="visionattn list", description="Every model visionattn registers with timm."
    )
    p.add_argument("filter", nargs="?", default="*", help="wildcard on the name, e.g. 'dinat_*'")
    p.add_argument("--family", default=None, help="only this family (see --families)")
    p.add_argument("--families", action="store_true", help="list the families and exit")
    p.add_argument("--no-params", action="store_true", help="skip counting parameters (faster)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)

    import visionattn
    from visionattn.registry import default_input_size, pretrained_tags

    if args.families:
        print("\n".join(visionattn.list_families()))
        return 0
    try:
        names = visionattn.list_models(args.filter, family=args.family)
    except ValueError as e:
        p.error(str(e))
    rows = []
    for n in names:
        params = None if args.no_params else _count_params(n)
        rows.append(
            {
                "model": n,
                "family": visionattn.model_family(n),
                "params_m": None if params is None else round(params / 1e6, 2),
                "input_size": default_input_size(n),
                "pretrained": pretrained_tags(n),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(
            f"no model matches {args.filter!r}"
            + (f" in family {args.family!r}" if args.family else "")
        )
        return 1
    header = ("model", "family", "params (M)", "input", "pretrained tags")
    table = [
        (
            r["model"],
            r["family"],
            "-" if r["params_m"] is None else f"{r['params_m']:.2f}",
            "x".join(map(str, r["input_size"][1:])) if r["input_size"] else "-",
            ",".join(r["pretrained"]) or "-",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header))
    print(fmt.format(*("-" * w for w in widths)))
    for t in table:
        print(fmt.format(*t))
    print(f"\n{len(rows)} models")
    return 0


def cmd_convert(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="visionattn convert",
        description="Convert an official or timm checkpoint into a timm Hub-format folder "
        "(config.json + model.safetensors) that timm.create_model('local-dir:<out>') loads.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    from visionattn.convert import OFFICIAL_FAMILIES

    src.add_argument(
        "--family",
        choices=sorted(OFFICIAL_FAMILIES),
        help="official family whose checkpoint this is",
    )
    src.add_argument("--timm-model", help="timm model name whose checkpoint this is")
    p.add_argument("checkpoint", help="checkpoint file (.pth/.pt/.bin/.safetensors)")
    p.add_argument("out", help="output folder")
    p.add_argument("--variant", help="official variant name (e.g. dinat_mini)")
    p.add_argument("--kwargs", help="official constructor kwargs as JSON (or @file.json)")
    args = p.parse_args(argv)

    from visionattn import convert, hub

    ckpt = _load_checkpoint_file(args.checkpoint, p)
    if args.family:
        kwargs = None
        if args.kwargs:
            text = open(args.kwargs[1:]).read() if args.kwargs.startswith("@") else args.kwargs
            kwargs = json.loads(text)
            kwargs = kwargs.get("constructor_kwargs", kwargs)
        if kwargs is None and args.variant is None:
            p.error("--family needs --variant or --kwargs")
        model = convert.from_official(args.family, ckpt, kwargs, variant=args.variant)
    else:
        model = convert.from_timm(args.timm_model, ckpt)
    out = hub.save_hub_folder(model, args.out, model_args=getattr(model, "model_args", None))
    print(
        f"wrote {out}/config.json and {out}/model.safetensors ({model.pretrained_cfg['architecture']})"
    )
    return 0


def _load_checkpoint_file(path: str, p: argparse.ArgumentParser) -> dict:
    from pathlib import Path

    import torch

    f = Path(path)
    if not f.is_file():
        p.error(f"checkpoint: {f} does not exist")
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(f))
    return torch.load(str(f), map_location="cpu", weights_only=False)


def cmd_export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="visionattn export",
        description="Write a registered model (with its pretrained or given weights) as a Hub folder.",
    )
    p.add_argument("model", help="registered model name, optionally with a tag (name.tag)")
    p.add_argument("out", help="output folder")
    p.add_argument("--weights", help="a .safetensors/.pth file of ours to load first")
    p.add_argument("--num-classes", type=int, default=None)
    args = p.parse_args(argv)

    import timm

    import visionattn
    from visionattn import hub

    base = args.model.split(".", 1)[0]
    if base not in visionattn.list_models():
        p.error(f"model: {base!r} is not a visionattn model (see `visionattn list`)")
    kw = {} if args.num_classes is None else {"num_classes": args.num_classes}
    model = timm.create_model(
        args.model, pretrained=args.weights is None and "." in args.model, **kw
    )
    if args.weights:
        hub.load_weights(model, args.weights)
    hub.save_hub_folder(model, args.out, model_args=kw or None)
    print(f"wrote {args.out}")
    return 0


def cmd_card(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="visionattn card", description="Write model cards (markdown).")
    p.add_argument("pattern", nargs="?", default="*", help="wildcard on model names")
    p.add_argument("--out", default="model_cards", help="output folder (default: model_cards)")
    p.add_argument("--include-tiny", action="store_true", help="also the test_* variants")
    args = p.parse_args(argv)

    from visionattn.cards import write_cards

    paths = write_cards(args.out, args.pattern, include_tiny=args.include_tiny)
    if not paths:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    print(f"wrote {len(paths)} cards to {args.out}")
    return 0


_COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "list": cmd_list,
    "convert": cmd_convert,
    "export": cmd_export,
    "card": cmd_card,
}

_USAGE = """usage: visionattn <command> [args]

commands:
  list            models visionattn registers (family, params, input size, pretrained tags)
  train           train or fine-tune a model (no arguments: the embedded digits demo)
  validate        top-1/top-5 of a checkpoint or pretrained tag on an image folder
  bench models    training/inference img/s and memory for models, ours and timm's
  bench kernels   the attention-kernel benchmark table (needs a CUDA GPU)
  convert         official/timm checkpoint -> timm Hub folder
  export          registered model -> timm Hub folder
  card            write model cards (markdown) for registered models

`visionattn <command> -h` for a command's options."""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE)
        return 0
    cmd, rest = args[0], args[1:]
    if cmd == "bench":
        if not rest or rest[0] not in ("models", "kernels"):
            print("usage: visionattn bench {models,kernels} [args]", file=sys.stderr)
            return 2
        cmd, rest = f"bench {rest[0]}", rest[1:]
    if cmd in _COMMANDS:
        return _COMMANDS[cmd](rest) or 0
    if cmd in _DELEGATED:
        return _resolve(_DELEGATED[cmd])(rest) or 0
    print(f"visionattn: unknown command {cmd!r}\n\n{_USAGE}", file=sys.stderr)
    return 2
