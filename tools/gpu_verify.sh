#!/usr/bin/env bash
# One lent-GPU call that re-verifies the kernels after changes nobody has run on a GPU yet:
#   run(command="bash tools/gpu_verify.sh", carry=[".whl", ".gpu"], timeout_s=430)
# Runs tools/gpu_check.py and the gpu-marked tests as parallel shards: the time goes into
# Triton compiles (one per specialisation), which use one CPU core each, so shards finish in
# about a quarter of the serial time. Each shard stops with SIGINT at its limit, so pytest
# still prints what passed. Parity vectors are used when carried in .gpu/parity (README, "GPU").
set -u
LIMIT=${GPU_VERIFY_LIMIT:-360}
O=${OUT:-/tmp}
source tools/gpu_env.sh
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
export VISIONATTN_PARITY_DIR=${VISIONATTN_PARITY_DIR:-$PWD/.gpu/parity}
shard() {  # name, command...
  local name=$1
  shift
  timeout -s INT -k 20 "$LIMIT" "$@" >"$O/$name.txt" 2>&1
  echo "$name exit $?" >>"$O/$name.txt"
}
shard check python3 tools/gpu_check.py &
shard na python3 -m pytest -q -m gpu tests/kernels/test_na_triton.py &
shard routed python3 -m pytest -q -m gpu tests/kernels/test_routed_triton.py &
shard models python3 -m pytest -q -m gpu tests/backbones &
wait
for name in na routed models; do
  echo "== $name"
  grep -v -i warn "$O/$name.txt" | tail -8
done
echo "== check"
grep -v -i warn "$O/check.txt" | tail -45
