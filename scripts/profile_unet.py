"""GPU time of the compiled SD 2.1-base UNet forward by kind of kernel.

Random weights, batch 2 (classifier-free guidance), 64x64 latents, fp16, channels_last, compiled
with ``torch.compile`` as ``--compile_unet`` does; 5 profiled calls after 3 warm-up calls. Prints
the milliseconds per call of convolutions, GEMMs, attention, Inductor's GroupNorm kernels and
other element-wise kernels, and the 25 longest kernels. Needs a GPU:

    python scripts/profile_unet.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from guidance.sd_factory import CONFIGS  # noqa: E402
from scripts.trace_stats import device_ms, ms_by_kind  # noqa: E402


def kind(name: str) -> str:
    """The row of the breakdown a kernel counts in."""
    if "group_norm" in name:
        return "groupnorm (inductor)"
    if "triton" in name:
        return "other triton"
    if any(s in name for s in ("fmha", "flash", "attention")):
        return "attention"
    if any(s in name for s in ("xmma", "conv", "implicit")):
        return "conv"
    if any(s in name for s in ("gemm", "nvjet", "cutlass")):
        return "gemm"
    return "other"


def main() -> None:
    from diffusers import UNet2DConditionModel
    from torch.profiler import ProfilerActivity, profile

    spec = CONFIGS["sd2.1-base"]
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
    unet = unet.cuda().half().eval().requires_grad_(False)
    unet.to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.half).contiguous(
        memory_format=torch.channels_last
    )
    t = torch.tensor([500, 500], device="cuda")
    emb = torch.randn(2, 77, spec["unet"]["cross_attention_dim"], device="cuda", dtype=torch.half)
    f = torch.compile(lambda a, b, c: unet(a, b, encoder_hidden_states=c).sample)
    t0 = time.time()
    with torch.no_grad():
        for _ in range(3):
            f(x, t, emb)
    torch.cuda.synchronize()
    print("compile", time.time() - t0, flush=True)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            f(x, t, emb)
        torch.cuda.synchronize()
    parts = ms_by_kind(prof, kind, steps=5)
    rows = [(device_ms(e) / 5, e.count // 5, e.key[:110]) for e in prof.key_averages() if device_ms(e) > 0]
    print({k: round(v, 3) for k, v in parts.items()}, "total", round(sum(parts.values()), 3))
    for r in sorted(rows, reverse=True)[:25]:
        print(f"{r[0]:.3f} ms x{r[1]} {r[2]}")


if __name__ == "__main__":
    main()
