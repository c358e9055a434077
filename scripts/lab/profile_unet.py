"""GPU time of the compiled SD 2.1-base UNet forward, by kind of kernel, for a few variants.

Random weights, batch 2 (classifier-free guidance), 64x64 latents, fp16, channels_last, compiled
with ``torch.compile`` as ``--compile_unet`` does. For each variant: the compile time, the median
of 50 replays of a CUDA graph of the call (as ``--unet_graph`` replays it), the relative L2
difference of its output from the first variant's (same weights and inputs), and the GPU time per
call by kind of kernel (convolutions, GEMMs, attention, Inductor's GroupNorm kernels, other
element-wise) from 5 profiled calls, with the longest kernels. Needs a GPU:

    python scripts/lab/profile_unet.py [--variants "compiled,compiled + fused qkv"] [--top 25]

Variants (comma-separated names of ``VARIANTS``):
  compiled: the -O UNet (``torch.compile`` defaults).
  compiled + fused qkv: ``guidance.sd_fast.fuse_qkv`` first, as --unet_fused_qkv (one GEMM for q, k and v of
    each self-attention, one for k and v of each cross-attention).
  compiled + autotuned GEMMs: Inductor's ``max_autotune_gemm`` (Triton GEMM templates with
    fused epilogues, timed against cuBLAS per shape); convolutions stay cuDNN's.
  compiled + frozen: Inductor's ``freezing`` (weights folded as constants; inference only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from guidance.sd_factory import CONFIGS  # noqa: E402
from guidance.sd_fast import fuse_qkv  # noqa: E402
from scripts.trace_stats import device_ms, ms_by_kind  # noqa: E402

GEMM_TUNING = {"max_autotune_gemm": True, "max_autotune_conv_backends": "ATEN"}

# name -> (fuse qkv projections, Inductor options)
VARIANTS: dict[str, tuple[bool, dict]] = {
    "compiled": (False, {}),
    "compiled + fused qkv": (True, {}),
    "compiled + autotuned GEMMs": (False, GEMM_TUNING),
    "compiled + fused qkv + autotuned GEMMs": (True, GEMM_TUNING),
    "compiled + frozen": (False, {"freezing": True}),
}


def kind(name: str) -> str:
    """The row of the breakdown a kernel counts in."""
    if "group_norm" in name:
        return "groupnorm (inductor)"
    if name.startswith(("triton_tem", "triton_mm", "triton_bmm")):  # Inductor's GEMM templates
        return "gemm"
    if "triton" in name:
        return "other triton"
    if any(s in name for s in ("fmha", "flash", "attention")):
        return "attention"
    if any(s in name for s in ("xmma", "conv", "implicit")):
        return "conv"
    if any(s in name for s in ("gemm", "nvjet", "cutlass")):
        return "gemm"
    return "other"


def build_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    spec = CONFIGS["sd2.1-base"]
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
    unet = unet.cuda().half().eval().requires_grad_(False)
    return unet.to(memory_format=torch.channels_last)


def graph_ms(fn, repeat: int = 50) -> float:
    """Median ms of ``repeat`` replays of a CUDA graph of ``fn()``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def run_variant(name: str, x, t, emb, ref, top: int):
    from torch.profiler import ProfilerActivity, profile

    fuse, options = VARIANTS[name]
    torch._dynamo.reset()
    unet = build_unet()
    if fuse and not fuse_qkv(unet):  # as --unet_fused_qkv does it
        raise SystemExit(f"profile_unet.py: {name}: diffusers could not fuse the q/k/v projections")
    f = torch.compile(lambda a, b, c: unet(a, b, encoder_hidden_states=c).sample, options=options or None)
    t0 = time.time()
    with torch.no_grad():
        for _ in range(3):
            out = f(x, t, emb)
        torch.cuda.synchronize()
        compile_s = time.time() - t0
        ms = graph_ms(lambda: f(x, t, emb))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                f(x, t, emb)
            torch.cuda.synchronize()
    diff = 0.0 if ref is None else float((out.float() - ref).norm() / ref.norm())
    parts = ms_by_kind(prof, kind, steps=5)
    print(
        f"\n== {name}: compile {compile_s:.0f} s, graph replay {ms:.3f} ms (median of 50), rel. diff {diff:.1e}"
    )
    print(
        "  GPU ms per call:",
        {k: round(v, 3) for k, v in sorted(parts.items())},
        "total",
        round(sum(parts.values()), 3),
    )
    rows = [(device_ms(e) / 5, e.count // 5, e.key[:110]) for e in prof.key_averages() if device_ms(e) > 0]
    for r in sorted(rows, reverse=True)[:top]:
        print(f"  {r[0]:.3f} ms x{r[1]} {r[2]}")
    sys.stdout.flush()
    torch.cuda.empty_cache()
    return out.float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="compiled", help="comma-separated names of VARIANTS")
    ap.add_argument("--top", type=int, default=25, help="longest kernels to list per variant")
    a = ap.parse_args()
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        sys.exit(f"profile_unet.py: unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    ctx = CONFIGS["sd2.1-base"]["unet"]["cross_attention_dim"]
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.half, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    t = torch.tensor([500, 500], device="cuda")
    emb = torch.randn(2, 77, ctx, device="cuda", dtype=torch.half, generator=g)
    ref = None
    for name in names:
        out = run_variant(name, x, t, emb, ref, a.top)
        ref = out if ref is None else ref


if __name__ == "__main__":
    main()
