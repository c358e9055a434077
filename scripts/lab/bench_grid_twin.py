"""CPU speed of the PyTorch hash-grid encoder (the twin that CPU runs and CI use).

Times ``gridencoder._torch_impl.grid_encode`` forward + backward (table and input gradients)
and the forward without gradients, on random points and the built-in prior's grid (16 levels
here, 2^14 table, finest 256). Medians over ``--repeat`` calls, alternating the two.

    python scripts/lab/bench_grid_twin.py [--points 60000] [--repeat 9]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gridencoder._torch_impl import grid_encode, level_layout  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=60000)
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    torch.manual_seed(0)
    L, base, finest = 16, 16, 256
    scale = math.exp2(math.log2(finest / base) / (L - 1))
    offsets, points = level_layout(3, L, scale, base, 14)
    emb = (torch.rand(offsets[-1], 2) * 2 - 1).requires_grad_()
    x = torch.rand(args.points, 3).requires_grad_()

    def with_grad():
        grid_encode(x, emb, offsets, points, scale, base, False, "smoothstep").sum().backward()

    def no_grad():
        with torch.no_grad():
            grid_encode(x, emb, offsets, points, scale, base, False, "smoothstep")

    times = {"forward + backward": [], "forward without gradients": []}
    for _ in range(args.repeat):
        for name, fn in zip(times, (with_grad, no_grad)):
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    print(f"{args.points} points, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, ts in times.items():
        print(f"{name}: median {statistics.median(ts):.0f} ms (min {min(ts):.0f}, max {max(ts):.0f})")


if __name__ == "__main__":
    main()
