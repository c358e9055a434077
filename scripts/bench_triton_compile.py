"""First-use compile time of the Triton kernels behind ``--fused_mlp``, from an empty Triton
cache: each variant an -O training run uses is launched once (the head's forward and backward
in fp16, the fd shading's forward and backward per shading) and timed. A second launch of the
same variant shows the cached cost.

    python scripts/bench_triton_compile.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

# Before Triton is imported: a fresh cache folder, so that every variant compiles.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_cold_")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nerf.fast import fused_mlp  # noqa: E402


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    dev = torch.device("cuda")
    torch.ones(1, device=dev).sum().item()  # CUDA context first: only the compiles are timed
    F, H, n = 32, 64, 4096
    params = [(torch.randn(s, device=dev) * 0.1).requires_grad_() for s in fused_mlp.param_shapes(F, H)]
    feat = torch.randn(n, F, device=dev).half().requires_grad_()
    blob = fused_mlp.BlobSpec(torch.rand(n, 3, device=dev), 1.0, 0.5, True)  # as -O's field calls it
    sig = torch.rand(7 * n, device=dev).requires_grad_()
    alb = torch.rand(7 * n, 3, device=dev).half().requires_grad_()
    light = torch.ones(1, 3, device=dev)

    def head():
        with torch.autocast("cuda", dtype=torch.float16):
            s, a = fused_mlp.mlp_head(feat, blob, "exp", params)
        (s.sum() + a.float().sum()).backward()

    def shade(shading):
        out = fused_mlp.fd_shade(sig, alb, light, 0.3, 1e-2, shading, n)
        sum(o.float().sum() for o in out).backward()

    cases = [("MLP head, forward + backward", head)]
    shadings = ("lambertian", "textureless", "albedo", "normal")
    cases += [(f"fd shading ({s}), forward + backward", lambda s=s: shade(s)) for s in shadings]
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, cache {os.environ['TRITON_CACHE_DIR']}"
    )
    print("\n| variant | first launch, s | second launch, ms |\n|---|---|---|")
    total = 0.0
    for name, fn in cases:
        first = timed(fn)
        total += first
        print(f"| {name} | {first:.2f} | {timed(fn) * 1e3:.2f} |", flush=True)
    print(f"| all | {total:.2f} | |")


if __name__ == "__main__":
    main()
