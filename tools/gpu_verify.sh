#!/usr/bin/env bash
# One lent-GPU call that re-verifies the kernels after changes nobody has run on a GPU yet:
#   run(command="bash tools/gpu_verify.sh", carry=[".whl", ".gpu"], timeout_s=420)
# Prints the ops-vs-float64 check table, then the gpu-marked kernel and model-shape tests.
# Parity vectors are used when carried in .gpu/parity (see README, "GPU").
set -u
source tools/gpu_env.sh
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
timeout 150 python3 tools/gpu_check.py 2>&1 | tee "${OUT:-/tmp}/gpu_check.txt" | grep -v -i warn | tail -45
export VISIONATTN_PARITY_DIR=${VISIONATTN_PARITY_DIR:-$PWD/.gpu/parity}
timeout 220 python3 -m pytest -q -m gpu -x tests/kernels tests/backbones 2>&1 | tail -15
