"""Same-machine A/B of checkouts: the 64x64 training render + backward (lambertian, albedo)
and an 800x800 test frame of ``bench_render``'s fitted scene, timed in alternating processes.

Machines lent as the same GPU differ by 20% and more in host speed, and the training render is
bound by the host, so two commits are compared by taking turns on one machine:

    git worktree add /tmp/old <commit>
    python scripts/bench_ab.py /tmp/old . --rounds 3

Each checkout builds its kernels into its own cache folder (``DREAMFUSION_KERNEL_CACHE``).
Prints median milliseconds per checkout and round (CUDA events, as ``bench_render``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def worker(root: str, repeat: int) -> None:
    """Time one checkout (its own modules, imported from ``root``) and print one JSON line."""
    sys.path.insert(0, str(Path(root).resolve()))
    import torch

    from scripts import bench_render as br

    torch.manual_seed(0)
    dev = torch.device("cuda")
    opt, _ = br.parse_args(["--text", "bench", "-O"])
    model = br.build_field(*br.nerf_configs(opt)).to(dev)
    br.fit(model, dev, 500)
    for _ in range(16):
        model.update_extra_state()
    light = torch.nn.functional.normalize(torch.tensor([[0.3, 0.5, 1.0]], device=dev), dim=-1)
    ro, rd = br.rays(dev, 64, 64)
    ro8, rd8 = br.rays(dev, 800, 800)

    def frame():
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            return model.render(ro8, rd8, bg_color=torch.ones(3, device=dev))

    res = {
        "lambertian": br.timeit(lambda: br.train_render(model, ro, rd, light, "lambertian"), repeat, dev)[0],
        "albedo": br.timeit(lambda: br.train_render(model, ro, rd, light, "albedo"), repeat, dev)[0],
        "frame": br.timeit(frame, max(3, repeat // 3), dev)[0],
    }
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("roots", nargs="+", help="checkout folders to compare")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=30, help="timed training renders per process")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.roots[0], args.repeat)
        return
    cache = Path(tempfile.gettempdir()) / "dreamfusion_ab_kernels"
    keys = ("lambertian", "albedo", "frame")
    results: dict[str, list[dict]] = {r: [] for r in args.roots}
    for rnd in range(args.rounds):
        for i, root in enumerate(args.roots):
            env = dict(os.environ, DREAMFUSION_KERNEL_CACHE=str(cache / str(i)))
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                root,
                "--worker",
                "--repeat",
                str(args.repeat),
            ]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                sys.exit(f"bench_ab: the run of {root} failed:\n{out.stderr[-2000:]}")
            res = json.loads(line[-1][len("RESULT ") :])
            results[root].append(res)
            print(f"round {rnd + 1} {root}: " + ", ".join(f"{k} {res[k]:.2f} ms" for k in keys), flush=True)
    print("\n| checkout | " + " | ".join(f"{k}, ms (median of rounds; each round)" for k in keys) + " |")
    print("|---|" + "---|" * len(keys))
    for root, rows in results.items():
        cells = []
        for k in keys:
            vals = [r[k] for r in rows]
            cells.append(f"{statistics.median(vals):.2f} ({', '.join(f'{v:.2f}' for v in vals)})")
        print(f"| {root} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
