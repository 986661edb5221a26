#!/usr/bin/env bash
# One-command install of the mmdet/mmseg stack for visionattn.mm (README, "Detection and
# segmentation"):   make setup-mm     (or: tools/install_mm.sh [PYTHON])
#
# mmdet 3.3.0 and mmsegmentation 1.2.2 need mmcv >= 2.0.0rc4, < 2.2 with its compiled ops, and
# PyPI has only the mmcv 2.1.0 source archive for current torch. This script builds that archive
# once per (torch, python, CUDA) into a wheel cache and reuses the wheel on every later run.
# Patches applied to the unpacked sdist (nothing else is changed):
#   1. setup.py: -std=c++17 -> -std=c++20. torch >= 2.14's headers need C++20; mmcv's setup.py
#      hard-codes C++17 for torch > 1.12, so the unpatched build fails.
#   2. setup.py: pkg_resources -> importlib.metadata + packaging. setuptools >= 81 no longer
#      ships pkg_resources, which mmcv's setup.py imports.
# and two patches to the installed mmengine 0.10.7 (no newer release exists):
#   3. mmengine/runner/checkpoint.py and utils/dl_utils/hub.py: torch.load(...) gets
#      weights_only=False, the default that
#      mmengine was written for (torch >= 2.6 flipped it to True, so loading mmengine's own
#      checkpoints, which pickle their meta/message hub, fails). Only load checkpoints you trust,
#      as with any mmengine release before torch 2.6.
#   4. mmengine/utils/package_utils.py: importlib.metadata instead of pkg_resources (gone with
#      setuptools >= 81), which `mmdet::` / `mmseg::` base configs need to locate mmdet/mmseg.
#
# Environment:
#   VISIONATTN_CACHE   cache root (default ~/.cache/visionattn); wheels in $VISIONATTN_CACHE/wheels
#   MAX_JOBS           parallel compile jobs (default: number of CPUs)
#   MM_NICE            nice level for the compile (default 0; CI uses 19)
#   FORCE_CUDA=1|0     build the CUDA ops too (needs nvcc matching torch.version.cuda) or not;
#                      default: when nvcc is found and torch sees a GPU
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${1:-.venv/bin/python}
MMCV_VERSION=2.1.0
MMCV_SHA256=d387bcab66b467479b6660310e23746cfc79c6e57acf04094680adb499a5cd3f
MMCV_URL=https://files.pythonhosted.org/packages/a7/19/f97f0fd4d432113a232e75f965335be6b7bb6557ae9faf8051e9a012cadd/mmcv-${MMCV_VERSION}.tar.gz
MMENGINE_VERSION=0.10.7
MMDET_VERSION=3.3.0
MMSEG_VERSION=1.2.2
PATCH_REV=1 # bump when the patches change: invalidates cached wheels
CACHE=${VISIONATTN_CACHE:-$HOME/.cache/visionattn}

PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
read -r TORCH_VER PYTAG TORCH_CUDA HAS_GPU < <("$PY" -c "import sys, torch; print(torch.__version__.replace('+', '_'), f'cp{sys.version_info[0]}{sys.version_info[1]}', torch.version.cuda or 'none', int(torch.cuda.is_available()))")
if [[ -z "${FORCE_CUDA:-}" ]]; then
  # As mmcv's own setup.py decides: CUDA ops only where a GPU is visible (and nvcc exists).
  if command -v nvcc >/dev/null 2>&1 && [[ "$HAS_GPU" == 1 ]]; then FORCE_CUDA=1; else FORCE_CUDA=0; fi
fi
DEVICE=cpu
[[ "$FORCE_CUDA" == 1 ]] && DEVICE=cu${TORCH_CUDA//./}
KEY=mmcv-${MMCV_VERSION}-torch${TORCH_VER}-${PYTAG}-${DEVICE}-p${PATCH_REV}
WHEEL_DIR=$CACHE/wheels/$KEY

if ! ls "$WHEEL_DIR"/mmcv-*.whl >/dev/null 2>&1; then
  echo "[install_mm] building $KEY (once; measured 18 min on 2 shared cores for the CPU ops)"
  start=$(date +%s)
  mkdir -p "$CACHE/src"
  SDIST=$CACHE/src/mmcv-${MMCV_VERSION}.tar.gz
  if [[ ! -f "$SDIST" ]] || ! echo "$MMCV_SHA256  $SDIST" | sha256sum -c --quiet - 2>/dev/null; then
    "$PY" -c "import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])" \
      "$MMCV_URL" "$SDIST.part"
    echo "$MMCV_SHA256  $SDIST.part" | sha256sum -c --quiet -
    mv "$SDIST.part" "$SDIST"
  fi
  WORK=$(mktemp -d "$CACHE/build.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  tar -xzf "$SDIST" -C "$WORK"
  SRC=$WORK/mmcv-${MMCV_VERSION}
  "$PY" - "$SRC/setup.py" <<'EOF'
import sys
path = sys.argv[1]
text = open(path).read()
old_import = "from pkg_resources import DistributionNotFound, get_distribution, parse_version"
new_import = (
    "from importlib.metadata import PackageNotFoundError as DistributionNotFound\n"
    "from importlib.metadata import distribution as get_distribution\n"
    "from packaging.version import parse as parse_version"
)
assert text.count(old_import) == 1, "mmcv setup.py: pkg_resources import not found"
text = text.replace(old_import, new_import)
assert "-std=c++17" in text, "mmcv setup.py: -std=c++17 not found"
text = text.replace("-std=c++17", "-std=c++20").replace("/std:c++17", "/std:c++20")
open(path, "w").write(text)
EOF
  # ninja compiles MAX_JOBS files at once (without it the extension builds one file at a time).
  "$PY" -m pip install -q ninja packaging "setuptools>=69"
  export PATH="$(dirname "$PY"):$PATH"
  (cd "$SRC" && MMCV_WITH_OPS=1 FORCE_CUDA=$FORCE_CUDA MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    nice -n "${MM_NICE:-0}" "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" .)
  mkdir -p "$CACHE/wheels"
  rm -rf "$WHEEL_DIR.tmp" && mv "$WORK/dist" "$WHEEL_DIR.tmp" && mv "$WHEEL_DIR.tmp" "$WHEEL_DIR"
  echo "[install_mm] built $(ls "$WHEEL_DIR") in $(($(date +%s) - start)) s"
else
  echo "[install_mm] reusing $WHEEL_DIR/$(ls "$WHEEL_DIR")"
fi

"$PY" -m pip install -q "$WHEEL_DIR"/mmcv-*.whl
"$PY" -m pip install -q -e '.[mm]'

# Patch 3: mmengine's checkpoint loaders under torch >= 2.6 (idempotent).
"$PY" - <<'EOF'
import importlib.util
import pathlib
import re

root = pathlib.Path(importlib.util.find_spec("mmengine").origin).parent
for rel in ("runner/checkpoint.py", "utils/dl_utils/hub.py"):
    path = root / rel
    text = path.read_text()
    patched = re.sub(
        r"torch\.load\(((?:(?!weights_only)[^()])*)\)", r"torch.load(\1, weights_only=False)", text
    )
    if patched != text:
        path.write_text(patched)
        print(f"[install_mm] patched {path}: torch.load(..., weights_only=False)")
EOF

# Patch 4: mmengine's package lookup (used by `mmdet::` / `mmseg::` base configs) without
# pkg_resources, which setuptools >= 81 no longer ships (idempotent).
"$PY" - <<'EOF'
import importlib.util
import pathlib

path = pathlib.Path(importlib.util.find_spec("mmengine").origin).parent / "utils/package_utils.py"
text = path.read_text()
if "from pkg_resources" in text or "import pkg_resources" in text:
    swaps = [
        (
            "    import pkg_resources\n    from pkg_resources import get_distribution\n\n"
            "    # refresh the pkg_resources\n"
            "    # more datails at https://github.com/pypa/setuptools/issues/373\n"
            "    importlib.reload(pkg_resources)\n    try:\n        get_distribution(package)\n"
            "        return True\n    except pkg_resources.DistributionNotFound:\n",
            "    from importlib.metadata import PackageNotFoundError, distribution\n\n"
            "    try:\n        distribution(package)\n        return True\n"
            "    except PackageNotFoundError:\n",
        ),
        (
            "    from pkg_resources import DistributionNotFound, get_distribution\n",
            "    from importlib.metadata import PackageNotFoundError as DistributionNotFound\n"
            "    from importlib.metadata import distribution as get_distribution\n",
        ),
        ("osp.join(pkg.location, ", "osp.join(str(pkg.locate_file('')), "),
        (
            "    from pkg_resources import get_distribution\n    pkg = get_distribution(package)\n"
            "    if pkg.has_metadata('top_level.txt'):\n"
            "        module_name = pkg.get_metadata('top_level.txt').split('\\n')[0]\n",
            "    from importlib.metadata import distribution\n    pkg = distribution(package)\n"
            "    top_level = pkg.read_text('top_level.txt')\n    if top_level:\n"
            "        module_name = top_level.split('\\n')[0]\n",
        ),
    ]
    for old, new in swaps:
        assert old in text, f"mmengine package_utils.py: expected text not found: {old[:60]!r}"
        text = text.replace(old, new)
    assert "from pkg_resources" not in text and "import pkg_resources" not in text
    path.write_text(text)
    print(f"[install_mm] patched {path}: importlib.metadata instead of pkg_resources")
EOF

"$PY" -c "import mmcv, mmcv.ops, mmdet, mmseg, mmengine, visionattn.mm; print('[install_mm] ok: mmcv', mmcv.__version__, 'mmengine', mmengine.__version__, 'mmdet', mmdet.__version__, 'mmseg', mmseg.__version__)"
