"""Whole training runs: ``main.py`` end to end, timed per epoch, the way the reference was.

The reference's figure (../shared/reference/h100-baseline.md) is the iteration rate of a
real ``-O`` run with a random-weight SD 2.1-base model over iterations 101-500, the RGB
phase after the latent warm-up (the first 20% of a 500-iteration run): 97-106 ms per
iteration on the H100 where this script's ``-O`` took 19.9-21.4 ms (163 ms was the first
measurement, on another machine with a slower host; compare only within one machine).
This script runs ``main.py`` the same way, once per variant, each in its
own process (no compile caches or graphs shared), and reads the per-epoch rates from the
run's log:

* it/s of each epoch (the Trainer's own figure: from the epoch's first step to its end,
  validation and checkpoints excluded, occupancy-grid refreshes and skipped steps included);
* the rate over iterations 101-500 (epochs 2-5 at the default 100 iterations per epoch),
  and over the same epochs less the first RGB epoch (which pays the VAE's compilation);
* the peak GPU memory the Trainer logs, and the run's wall time.

    python scripts/bench_run.py --hf_key /tmp/sd21 [--iters 500] [--variants "-O,eager fp16 (baseline)"]
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Every speed lever off (main.O_SPEED_DEFAULTS and the traced UNet), as bench_sds's baseline.
OFF = (
    "--no-unet_graph --no-vae_graph --no-compile_vae --no-compile_unet --no-channels_last "
    "--no-vae_fused_gn --no-unet_fused_qkv --no-fused_mlp --no-graph_render --unet_traced off"
)
# name -> main.py options besides the prompt, workspace, model and schedule.
VARIANTS = {
    "-O": "-O",
    # --graph_render for every render, however many rows it needs (-O stops at 3M).
    "-O with the graphed render at any size": "-O --graph_render_max_work 0",
    # Every training render eager (the -O default before --graph_render).
    "-O without the graphed render": "-O --no-graph_render",
    # The reference's computation: fp16 autocast and the CUDA ray marcher, no speed lever.
    "eager fp16 (baseline)": f"--fp16 --cuda_ray {OFF}",
}
EPOCH = re.compile(
    r"^\[epoch (\d+)\] step (\d+) loss \S+ \(([\d.]+) it/s, skipped (\d+)(?: \+ (\d+) incomplete)?"
)
PEAK = re.compile(r"peak ([\d.]+) GiB allocated, ([\d.]+) GiB reserved")


def parse_log(text: str) -> list[dict]:
    """The ``[epoch N]`` lines of a Trainer log: epoch, step, it/s, skipped, incomplete, peaks.

    >>> parse_log("[epoch 2] step 200 loss 0.1 (51.20 it/s, skipped 0, peak 2.00 GiB allocated, 3.00 GiB reserved)")
    [{'epoch': 2, 'step': 200, 'its': 51.2, 'skipped': 0, 'incomplete': 0, 'alloc': 2.0, 'reserved': 3.0}]
    """
    rows = []
    for line in text.splitlines():
        m = EPOCH.match(line)
        if not m:
            continue
        p = PEAK.search(line)
        rows.append(
            {
                "epoch": int(m[1]),
                "step": int(m[2]),
                "its": float(m[3]),
                "skipped": int(m[4]),
                "incomplete": int(m[5] or 0),
                "alloc": float(p[1]) if p else float("nan"),
                "reserved": float(p[2]) if p else float("nan"),
            }
        )
    return rows


def window_rate(rows: list[dict], first: int, last: int) -> float:
    """Iterations per second over epochs ``first``..``last`` (total steps over total time).

    >>> window_rate([{"epoch": 1, "step": 100, "its": 10.0}, {"epoch": 2, "step": 200, "its": 50.0}], 1, 2)
    16.666666666666668
    """
    steps = secs = 0.0
    prev = 0
    for r in rows:
        n = r["step"] - prev
        prev = r["step"]
        if first <= r["epoch"] <= last:
            steps += n
            secs += n / r["its"]
    return steps / secs if secs else float("nan")


def first_epoch_from(rows: list[dict], step: int) -> int:
    """The first epoch that starts at or after ``step`` (the rows' epochs run one after another).

    >>> first_epoch_from([{"epoch": 1, "step": 100}, {"epoch": 2, "step": 200}], 100)
    2
    """
    prev = 0
    for r in rows:
        if prev >= step:
            return r["epoch"]
        prev = r["step"]
    return rows[-1]["epoch"]


def run_variant(name: str, options: str, args, ws: Path) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "main.py"),
        "--text",
        args.text,
        "--workspace",
        str(ws),
        "--hf_key",
        args.hf_key,
        "--iters",
        str(args.iters),
        # Validation and the test video at the smallest size: they are not timed, only waited for.
        "--dataset_size_valid",
        "1",
        "--dataset_size_test",
        "4",
        "--W",
        "128",
        "--H",
        "128",
        "--test_interval",
        "1000",
        "--quiet",
        *shlex.split(options),
        *shlex.split(args.extra),
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{name}: main.py exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    logs = sorted(ws.glob("log_*.txt"))
    rows = parse_log(logs[-1].read_text()) if logs else []
    if not rows:
        raise SystemExit(f"{name}: no epoch lines in {ws}")
    # The speed levers' one-line reports (render-graph captures, overflows, fallbacks).
    speed = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("[speed]")]
    return {"name": name, "options": options, "rows": rows, "wall_s": wall, "speed": speed}


def table(results: list[dict], rgb_first: int, last: int) -> str:
    epochs = sorted({r["epoch"] for res in results for r in res["rows"]})
    head = (
        "| variant | "
        + " | ".join(f"epoch {e} it/s" for e in epochs)
        + f" | epochs {rgb_first}-{last} it/s (ms/iter) | epochs {rgb_first + 1}-{last} it/s (ms/iter) "
        "| skipped + incomplete | peak alloc / reserved GiB | wall s |"
    )
    lines = [head, "|---|" + "---|" * (len(epochs) + 5)]
    for res in results:
        by = {r["epoch"]: r for r in res["rows"]}
        a = window_rate(res["rows"], rgb_first, last)
        b = window_rate(res["rows"], rgb_first + 1, last)
        end = res["rows"][-1]
        lines.append(
            f"| {res['name']} | "
            + " | ".join(f"{by[e]['its']:.2f}" if e in by else "" for e in epochs)
            + f" | {a:.2f} ({1e3 / a:.1f}) | {b:.2f} ({1e3 / b:.1f}) | {end['skipped']} + {end['incomplete']} "
            f"| {end['alloc']:.2f} / {end['reserved']:.2f} | {res['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--hf_key", required=True, help="the model folder (guidance/sd_factory.build_sd makes one)"
    )
    ap.add_argument("--text", default="a hamburger")
    ap.add_argument("--iters", type=int, default=500, help="iterations per run (the reference's: 500)")
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated names: " + ", ".join(VARIANTS)
    )
    ap.add_argument("--extra", default="", help="more main.py options for every variant")
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    args = ap.parse_args()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    assert not any("," in n for n in VARIANTS), "variant names are split on commas"
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            res = run_variant(name, VARIANTS[name], args, Path(tmp) / f"ws{i}")
            print(f"{name}: " + ", ".join(f"e{r['epoch']} {r['its']:.2f}" for r in res["rows"]), flush=True)
            print("\n".join(f"  {ln}" for ln in res["speed"]), flush=True)
            results.append(res)
    # The RGB phase starts after --latent_iter_ratio (0.2) of the run: epoch 2 of a 500-step run.
    rgb_first = first_epoch_from(results[0]["rows"], int(0.2 * args.iters))
    last = results[0]["rows"][-1]["epoch"]
    text = table(results, rgb_first, last)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
