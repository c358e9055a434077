"""VAE encoder forward + backward to the image at 512x512 (the SDS step's VAE part), alone.

Builds the SD 2.1-base VAE with random weights (fp16), compiles its encoder as the -O path
does (Inductor with the channels_last layout forced, replayed from CUDA graphs) and times
forward + backward for:

* the encoder as diffusers builds it (Inductor's GroupNorm kernels; the -O default before
  ``--vae_fused_gn``),
* the same with ``guidance.groupnorm.fuse_group_norms`` (our GroupNorm + SiLU kernels on
  channels_last activations, ``--vae_fused_gn``).

For each: median ms (CUDA events), the input gradient's relative difference from the first,
and the GPU time per step by kind of kernel (convolutions, GroupNorm and element-wise, other)
from a torch.profiler run of 5 steps.

    python scripts/bench_vae.py [--repeat 30]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from guidance.groupnorm import fuse_group_norms  # noqa: E402
from guidance.sd_factory import random_vae  # noqa: E402
from scripts.bench_render import timeit  # noqa: E402
from scripts.trace_stats import ms_by_kind  # noqa: E402


def build_vae():
    """The SD 2.1-base VAE with random weights, fp16 on the GPU, frozen."""
    from diffusers.models.attention_processor import AttnProcessor

    vae = random_vae("sd2.1-base").cuda().half().eval().requires_grad_(False)
    vae.set_attn_processor(AttnProcessor())  # as the guidance's fast encoder path does
    return vae


def kind(name: str) -> str:
    """The row of the breakdown a kernel counts in."""
    if "triton" not in name and any(k in name for k in ("xmma", "gemm", "nvjet", "cutlass", "cudnn")):
        return "convolutions and GEMMs"
    if "triton" in name or "dfk::" in name:
        return "GroupNorm, SiLU and other element-wise"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument(
        "--unroll",
        action="store_true",
        help="also time the fused encoder and its largest GroupNorm with the kernels' pixels per "
        "thread iteration (GroupNormAct.unroll, group_norm_act's unroll) at 1, 2 and 4, alternating",
    )
    args = ap.parse_args()
    dev = torch.device("cuda")
    vae = build_vae()
    torch.manual_seed(0)
    g = torch.randn(1, 8, 64, 64, device=dev, dtype=torch.half)
    x0 = torch.rand(1, 3, 512, 512, device=dev, dtype=torch.half)

    def encoder(x):
        return vae.quant_conv(vae.encoder(x))

    rows, ref = [], None
    for name in ("Inductor GroupNorm (diffusers encoder)", "fused GroupNorm (--vae_fused_gn)"):
        x_in = x0
        if "fused" in name:
            print(f"fused {fuse_group_norms(vae.encoder)} GroupNorms", flush=True)
            vae.encoder.to(memory_format=torch.channels_last)
            vae.quant_conv.to(memory_format=torch.channels_last)
            x_in = x0.contiguous(memory_format=torch.channels_last)
        torch._dynamo.reset()
        t0 = time.time()
        fn_c = torch.compile(encoder, dynamic=False, options={"force_layout_optimization": True})
        fn = torch.cuda.make_graphed_callables(fn_c, (x_in.clone().requires_grad_(True),))
        compile_s = time.time() - t0

        def step(fn=fn, x_in=x_in):
            x = x_in.clone().requires_grad_(True)
            fn(x).backward(g)
            return x.grad

        grad = step().float()
        ref = grad if ref is None else ref
        diff = ((grad - ref).norm() / ref.norm()).item()
        ms, _ = timeit(step, args.repeat, dev)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        parts = ms_by_kind(prof, kind, steps=5)
        rows.append((name, ms, compile_s, diff, parts))
        compiled = fn_c
        print(
            f"{name}: {ms:.2f} ms, compiled in {compile_s:.0f} s, grad rel diff {diff:.2e}, {parts}",
            flush=True,
        )
    extra = unroll_rounds(compiled, vae.encoder, x_in, g, args.repeat) if args.unroll else []
    print(f"\nDevice: {torch.cuda.get_device_name()}; torch {torch.__version__}\n")
    kinds = ["convolutions and GEMMs", "GroupNorm, SiLU and other element-wise", "other"]
    print("| encoder | fwd + bwd ms | " + " | ".join(f"{k}, ms" for k in kinds) + " | grad rel. diff |")
    print("|---|---|" + "---|" * len(kinds) + "---|")
    for name, ms, _, diff, parts in rows:
        print(
            f"| {name} | {ms:.2f} | "
            + " | ".join(f"{parts.get(k, 0):.2f}" for k in kinds)
            + f" | {diff:.1e} |"
        )
    print("\n".join(extra))


def unroll_rounds(compiled, encoder, x_in, g, repeat: int) -> list[str]:
    """The fused encoder (recaptured per setting: the kernels are chosen at capture) and its
    largest GroupNorm + SiLU alone (1x128x512x512, forward + backward), for unroll 1, 2, 4 in
    turn (``GroupNormAct.unroll`` of the encoder's fused norms), three rounds; and the input
    gradient's largest difference between the settings."""
    from guidance import groupnorm

    dev = x_in.device
    values = (1, 2, 4)
    norms = [m for m in encoder.modules() if isinstance(m, groupnorm.GroupNormAct)]
    saved = [m.unroll for m in norms]
    lines = ["", "| case | round | " + " | ".join(f"unroll {u}, ms" for u in values) + " |"]
    lines.append("|---|---|" + "---|" * len(values))
    xs = torch.randn(1, 128, 512, 512, device=dev, dtype=torch.half).contiguous(
        memory_format=torch.channels_last
    )
    w, b = torch.rand(128, device=dev) + 0.5, torch.randn(128, device=dev)
    dy = torch.randn_like(xs)

    def gn_step(unroll: int):
        x = xs.detach().requires_grad_(True)
        groupnorm.group_norm_act(x, w, b, 32, 1e-6, True, unroll)[0].backward(dy)

    grads, again = {}, None
    for r in range(3):
        enc_ms, gn_ms = [], []
        for u in values:
            for m in norms:
                m.unroll = u
            fn = torch.cuda.make_graphed_callables(compiled, (x_in.clone().requires_grad_(True),))

            def step(fn=fn):
                x = x_in.clone().requires_grad_(True)
                fn(x).backward(g)
                return x.grad

            grads[u] = step().float()
            if u == values[0] and again is None:
                again = step().float()  # the same setting twice: the run-to-run difference
            enc_ms.append(timeit(step, repeat, dev)[0])
            gn_ms.append(timeit(lambda u=u: gn_step(u), repeat, dev)[0])
        lines.append(f"| encoder fwd + bwd | {r + 1} | " + " | ".join(f"{m:.2f}" for m in enc_ms) + " |")
        lines.append(
            f"| GroupNorm+SiLU 128x512x512 | {r + 1} | " + " | ".join(f"{m:.3f}" for m in gn_ms) + " |"
        )
    for m, u in zip(norms, saved):
        m.unroll = u
    ref = grads[values[0]]

    def rel(a):
        return ((a - ref).norm() / ref.norm()).item()

    lines.append(
        "input gradient, relative L2 difference from unroll 1: "
        + ", ".join(f"unroll {u} {rel(grads[u]):.1e}" for u in values[1:])
        + f"; unroll 1 run twice: {rel(again):.1e} (atomic adds make runs differ)"
    )
    return lines


if __name__ == "__main__":
    main()
