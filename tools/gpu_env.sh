# Source at the start of a command on the lent GPU machine (see README, "GPU"):
#   source tools/gpu_env.sh
# Installs this checkout into the image's python3 (torch/timm/triton are already there;
# nothing can be downloaded), plus any wheels carried in .whl/.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/va_install.log 2>&1 \
  || { echo "visionattn install failed:"; cat /tmp/va_install.log; }
# The machine's copy of .git is not the checkout's: benchmarks read the commit from here
# (written by `tools/gpu_commit.sh` before the call).
if [ -f .gpu/commit.txt ]; then export VISIONATTN_COMMIT=$(cat .gpu/commit.txt); fi
