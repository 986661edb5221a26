"""Versions and the two ceilings (HBM copy bandwidth, bf16 matmul rate) of the current GPU."""

import json
import os

import timm
import torch
import triton
from triton.testing import do_bench

import visionattn

dev = torch.cuda.get_device_properties(0)
n = 1 << 30  # 1 GiB per buffer, well past L2
a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
b = torch.empty_like(a)
ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
bw = 2 * n / ms / 1e9  # TB/s: bytes read + written
m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
mm = do_bench(lambda: m @ m, warmup=50, rep=300, return_mode="median")
res = dict(
    gpu=dev.name,
    sms=dev.multi_processor_count,
    torch=torch.__version__,
    triton=triton.__version__,
    timm=timm.__version__,
    visionattn=visionattn.__version__,
    copy_tb_s=round(bw, 3),
    bf16_tflops=round(2 * 8192**3 / mm / 1e9, 1),
    models=len(visionattn.list_models()),
)
print(json.dumps(res))
os.makedirs(os.environ.get("OUT", "."), exist_ok=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "probe.json"), "w"))
