"""The MLP's GEMMs on the GPU: host cost of new row counts, and the last layer's output width.

1. cuBLASLt picks an algorithm for every new GEMM shape. The training render's sample count
   changes at every step, so each GEMM of the MLP meets a new row count: this times 200 calls
   at one fixed row count, at row counts drawn anew for each call (within +-10%), and at the
   drawn counts rounded up to a multiple of 8192 (shapes repeat). Host microseconds per call
   (no sync inside the loop) and wall microseconds (sync at the end).
2. The last layer maps 64 features to 4 outputs; this times it against the same GEMM with the
   weight padded to 8 or 16 output rows.

    python scripts/lab/bench_gemm.py
"""

from __future__ import annotations

import random
import time

import torch


def per_call(fn, sizes) -> tuple[float, float]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for n in sizes:
        fn(n)
    host = (time.perf_counter() - t) / len(sizes) * 1e6
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / len(sizes) * 1e6
    return host, wall


def event_us(fn, n: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n * 1e3


def main() -> None:
    dev = "cuda"
    torch.manual_seed(0)
    rng = random.Random(0)
    h = dict(device=dev, dtype=torch.half)
    nmax = 340_000
    a, g, x = torch.randn(nmax, 64, **h), torch.randn(nmax, 4, **h), torch.randn(nmax, 32, **h)
    w0, b0 = torch.randn(64, 32, **h), torch.randn(64, **h)
    w2, b2 = torch.randn(4, 64, **h), torch.randn(4, **h)
    ops = {
        "hidden layer: addmm + ReLU epilogue (cuBLASLt), 32->64": lambda n: torch._addmm_activation(
            b0, x[:n], w0.t()
        ),
        "last layer: addmm, 64->4": lambda n: torch.addmm(b2, a[:n], w2.t()),
        "weight gradient: g.t() @ a": lambda n: g[:n].t() @ a[:n],
        "input gradient: g @ W": lambda n: g[:n] @ w2,
    }
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| rows | GEMM | fixed rows, host/wall us | new rows each call | rows in multiples of 8192 |")
    print("|---|---|---|---|---|")
    for n0 in (100_000, 330_000):
        for name, fn in ops.items():
            warm = [rng.randint(int(n0 * 0.9), int(n0 * 1.1)) for _ in range(20)]
            for s in ([n0] * 20, warm, [-(-n // 8192) * 8192 for n in warm]):
                per_call(fn, s)
            drawn = [rng.randint(int(n0 * 0.9), int(n0 * 1.1)) for _ in range(200)]
            res = [per_call(fn, s) for s in ([n0] * 200, drawn, [-(-n // 8192) * 8192 for n in drawn])]
            cells = " | ".join(f"{hh:.0f} / {ww:.0f}" for hh, ww in res)
            print(f"| ~{n0} | {name} | {cells} |")
    print("\n| rows | 64->4 | 64->8 (padded) | 64->16 (padded) |  (GPU us, CUDA events)")
    print("|---|---|---|---|")
    for n in (400_000, 100_000):
        act = torch.randn(n, 64, **h).relu()
        cols = []
        for k in (4, 8, 16):
            wk, bk = torch.zeros(k, 64, **h), torch.zeros(k, **h)
            wk[:4], bk[:4] = w2, b2
            cols.append(event_us(lambda wk=wk, bk=bk, act=act: torch.addmm(bk, act, wk.t())))
        print(f"| {n} | " + " | ".join(f"{c:.1f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
