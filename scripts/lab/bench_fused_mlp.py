"""The field's MLP + density/albedo head: cuBLAS (``_MLPHead``) against the Triton kernels
(``nerf/fast/fused_mlp.py``, ``--fused_mlp``), forward alone and forward plus backward, at row counts
of a fitted scene's 64x64 render (100k), its fd passes (700k) and a fresh field's (2.1M); with
``--sweep``, the kernels' launch settings (rows per tile, warps, backward programs per SM); and
the host's cost per call on 256 rows (launches, Python), for the head and the fd shading.

    python scripts/lab/bench_fused_mlp.py [--sweep] [--repeat 20]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nerf.fast import fused_mlp  # noqa: E402
from nerf.fast.field import _FDShade, _MLPHead, bucket_rows  # noqa: E402
from scripts.bench_render import timeit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="also time other launch settings of the kernels")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    F, H = 32, 64
    params = [
        (torch.randn(s, device=dev) * c).requires_grad_()
        for s, c in zip(fused_mlp.param_shapes(F, H), [0.2, 0.1, 0.15, 0.1, 0.15, 0.1])
    ]
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; MLP {F} -> {H} -> {H} -> 4, fp16"
    )
    print("\n| rows | path | forward ms | forward + backward ms |\n|---|---|---|---|")
    default = (fused_mlp._BM, fused_mlp._WARPS, fused_mlp._PROGRAMS_PER_SM)
    settings = [default]
    if args.sweep:
        settings += [s for s in itertools.product((32, 64, 128), (4, 8), (1, 2, 4, 8)) if s != default]
    for n in (100_000, 700_000, 2_100_000):
        feat = (torch.randn(bucket_rows(n), F, device=dev) * 0.5).half().requires_grad_()
        blob = torch.randn(bucket_rows(n), device=dev)
        gs, ga = torch.randn(n, device=dev), torch.randn(n, 3, device=dev).half()

        def cublas(backward: bool, feat=feat, blob=blob, n=n, gs=gs, ga=ga):
            with torch.autocast("cuda", dtype=torch.float16), torch.set_grad_enabled(backward):
                s, a = _MLPHead.apply(feat, blob, n, "exp", True, *params)
            if backward:
                torch.autograd.backward([s, a], [gs, ga])

        def triton(backward: bool, feat=feat, blob=blob, n=n, gs=gs, ga=ga):
            with torch.autocast("cuda", dtype=torch.float16), torch.set_grad_enabled(backward):
                s, a = fused_mlp.mlp_head(feat[:n], blob[:n], "exp", params)
            if backward:
                torch.autograd.backward([s, a], [gs, ga])

        rows = [("cuBLAS (_MLPHead, rows padded to bucket_rows)", cublas)]
        for bm, warps, per_sm in settings:
            rows.append(
                (f"Triton BM {bm}, {warps} warps, {per_sm} backward programs/SM", (bm, warps, per_sm))
            )
        for name, how in rows:
            if isinstance(how, tuple):
                fused_mlp._BM, fused_mlp._WARPS, fused_mlp._PROGRAMS_PER_SM = how
                fn = triton
            else:
                fn = how
            fwd = timeit(lambda fn=fn: fn(False), args.repeat, dev)[0]
            both = timeit(lambda fn=fn: fn(True), args.repeat, dev)[0]
            print(f"| {n} | {name} | {fwd:.3f} | {both:.3f} |", flush=True)
        fused_mlp._BM, fused_mlp._WARPS, fused_mlp._PROGRAMS_PER_SM = default
    host_times(params, dev)


def host_us(fn, calls: int = 300) -> float:
    """Microseconds per call of ``fn`` in a loop without syncs: on tiny inputs, the host's cost."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


def host_times(params: list[torch.Tensor], dev: torch.device) -> None:
    """Host cost per call (256 rows, where the GPU work is negligible): the head and the fd
    shading, PyTorch path against the Triton kernels, forward and forward + backward."""
    n, F = 256, params[0].shape[1]
    feat = (torch.randn(n, F, device=dev) * 0.5).half().requires_grad_()
    blob = torch.randn(n, device=dev)
    pts = torch.rand(n, 3, device=dev) * 2 - 1
    sig = torch.rand(7 * n, device=dev).requires_grad_()
    alb = torch.rand(7 * n, 3, device=dev).half().requires_grad_()
    light = torch.nn.functional.normalize(torch.ones(1, 3, device=dev), dim=-1)

    def head(fn, backward):
        with torch.autocast("cuda", dtype=torch.float16), torch.set_grad_enabled(backward):
            s, a = fn()
        if backward:
            (s.sum() + a.float().sum()).backward()

    def shade(fn, backward):
        with torch.set_grad_enabled(backward):
            out = fn(sig, alb, light, 0.3, 1e-2, "lambertian", n)
        if backward:
            sum(o.float().sum() for o in out).backward()

    cases = [
        (
            "head, PyTorch (_MLPHead)",
            lambda b: head(lambda: _MLPHead.apply(feat, blob, n, "exp", True, *params), b),
        ),
        ("head, Triton", lambda b: head(lambda: fused_mlp.mlp_head(feat, blob, "exp", params), b)),
        (
            "head + density blob as tensor ops, Triton",
            lambda b: head(
                lambda: fused_mlp.mlp_head(feat, 2.0 * torch.exp(-(pts * pts).sum(-1) / 0.5), "exp", params),
                b,
            ),
        ),
        (
            "head + density blob from the points (BlobSpec), Triton",
            lambda b: head(
                lambda: fused_mlp.mlp_head(feat, fused_mlp.BlobSpec(pts, 2.0, 0.5, True), "exp", params), b
            ),
        ),
        ("fd shading, PyTorch (_FDShade)", lambda b: shade(_FDShade.apply, b)),
        ("fd shading, Triton", lambda b: shade(fused_mlp.fd_shade, b)),
    ]
    print("\n| 256 rows | host us per forward | host us per forward + backward |\n|---|---|---|")
    for name, fn in cases:
        print(
            f"| {name} | {host_us(lambda fn=fn: fn(False)):.1f} | {host_us(lambda fn=fn: fn(True)):.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
