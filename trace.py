"""Compile the guidance UNet ahead of time for the exact inputs of a real run.

    python trace.py --text "a hamburger" -O [any main.py training options]

Runs ``main.py`` with the given options up to its first UNet call and records that call's
inputs (shapes, dtypes, memory format; no code is edited), exports the UNet with
``torch.export`` for them, compiles it with AOTInductor into a ``.pt2`` package (code only: at
load it is bound to the live UNet's weights), checks that the package loads in a fresh process,
and times it against eager (each with and without a CUDA graph when ``--unet_graph`` is on).
When the compiled UNet loads and is faster it is saved as ``~/.cache/dreamfusion/unet_traced/<key>.pt2`` (+ .json),
keyed by model, dtype, input shapes, torch version and GPU; later runs with the same options
load it automatically (``--unet_traced auto``, the default). Runs whose inputs differ (another
batch size, another model, another dtype) fall back to eager with a one-line warning.

Measured on the H100 with torch 2.11.0+cu130: export 6-10 s and compilation 129-179 s, then
the package crashed its loader (a segmentation fault inside ``aoti_load_package``, also in a
fresh process), so nothing is saved there and runs use ``--unet_graph`` (docs/benchmarks.md).

trace.py's own options: --trace_dir DIR (where to save), --trace_force (save even if slower),
--trace_repeat N (timing repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


class _Captured(BaseException):
    """Stops the run at its first UNet call (BaseException: main's handlers let it through)."""


class UNetCall(torch.nn.Module):
    """The UNet as the SDS step calls it: (x, t, text embeddings) -> predicted noise."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]


def capture_inputs(main_argv: list[str]):
    """Run main.py with these options until the guidance calls its UNet; return (sd, x, t, emb)."""
    import main as entry
    from guidance import sd_utils

    seen: dict = {}
    real = sd_utils.StableDiffusion.predict_noise

    def spy(self, x, t, emb):
        if self.fast.channels_last:  # what the speed layer does before it looks for a traced UNet
            x = x.contiguous(memory_format=torch.channels_last)
        seen.update(sd=self, x=x.detach().clone(), t=t.detach().clone(), emb=emb.detach().clone())
        raise _Captured

    sd_utils.StableDiffusion.predict_noise = spy
    try:
        with tempfile.TemporaryDirectory() as ws:
            argv = main_argv + ["--workspace", ws, "--ckpt", "scratch", "--unet_traced", "off", "--quiet"]
            entry.main(argv)
    except _Captured:
        pass
    finally:
        sd_utils.StableDiffusion.predict_noise = real
    if not seen:
        raise SystemExit("trace.py: the run never called the UNet (is --text given, and not --test?)")
    return seen["sd"], seen["x"], seen["t"], seen["emb"]


def load_check(package: Path) -> str | None:
    """Load an AOTInductor package in a fresh Python process; None if that works, else what
    went wrong. A separate process because a broken package can crash its loader outright
    (it did: a segmentation fault inside aoti_load_package with torch 2.11.0+cu130 on the
    H100, for the SD 2.1 UNet), and that must not take trace.py or a training run with it."""
    code = "import sys, torch; torch._inductor.aoti_load_package(sys.argv[1])"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(package)], capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        return "did not load within 600 s"
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        return f"crashes its loader (signal {-proc.returncode}) in a fresh process"
    last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
    return f"fails to load in a fresh process ({last})"


def time_ms(fn, args: tuple, repeat: int) -> float:
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn(*args)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--trace_dir", default=None)
    ap.add_argument("--trace_force", action="store_true")
    ap.add_argument("--trace_repeat", type=int, default=30)
    own, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        raise SystemExit("trace.py: the traced UNet is for CUDA runs; no CUDA device here")
    from guidance.sd_fast import CudaGraphed, bind_live_weights, default_traced_dir, signature

    sd, x, t, emb = capture_inputs(rest)
    sig = signature(x, t, emb)
    print(f"[trace] UNet inputs of this run: {sig}", flush=True)
    out_dir = Path(own.trace_dir) if own.trace_dir else default_traced_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    key = sd.fast.traced_key_for(sig)
    package = out_dir / f"{key}.pt2"
    tmp_package = out_dir / f".{key}.tmp.pt2"

    call = UNetCall(sd.unet).eval()
    t0 = time.time()
    with torch.no_grad():
        ep = torch.export.export(call, (x, t, emb))
    export_s = time.time() - t0
    t0 = time.time()
    with torch.no_grad():
        # Without the weights: the artifact stays small (code only) and, once loaded, runs on
        # the live UNet's tensors (bind_live_weights) instead of a second 1.7 GB copy.
        torch._inductor.aoti_compile_and_package(
            ep,
            package_path=str(tmp_package),
            inductor_configs={"aot_inductor.package_constants_in_so": False},
        )
    compile_s = time.time() - t0
    print(f"[trace] export {export_s:.0f} s, AOTInductor compile {compile_s:.0f} s", flush=True)
    problem = load_check(tmp_package)
    if problem is not None:
        tmp_package.unlink(missing_ok=True)
        print(
            f"[trace] not saved: the compiled package {problem} (torch {torch.__version__}). "
            "Runs keep the -O default, --unet_graph (the eager UNet replayed from a CUDA graph).",
            flush=True,
        )
        return 1
    runner = torch._inductor.aoti_load_package(str(tmp_package))
    bind_live_weights(runner, call.unet)
    print(f"[trace] loaded {tmp_package.stat().st_size / 2**20:.0f} MiB package", flush=True)

    def traced(a, b, c):
        return runner(a, b, c)

    def eager(a, b, c):
        return call(a, b, c)

    args = (x, t, emb)
    with torch.no_grad(), torch.autocast("cuda", enabled=False):
        ref = eager(*args).double()
        diff = float((traced(*args).double() - ref).norm() / ref.norm())
        rows = {
            "eager": time_ms(eager, args, own.trace_repeat),
            "traced": time_ms(traced, args, own.trace_repeat),
            "eager, CUDA graph": time_ms(CudaGraphed(eager, args), args, own.trace_repeat),
            "traced, CUDA graph": time_ms(CudaGraphed(traced, args), args, own.trace_repeat),
        }
    for name, ms in rows.items():
        print(f"[trace] {name:20s} {ms:7.2f} ms  ({rows['eager'] / ms:.2f}x eager)", flush=True)
    print(f"[trace] traced vs eager output: relative L2 difference {diff:.2e}", flush=True)
    graph = sd.fast.unet_graph
    mine = rows["traced, CUDA graph" if graph else "traced"]
    theirs = rows["eager, CUDA graph" if graph else "eager"]
    ok = diff < 2e-2
    if not ok or (mine >= theirs and not own.trace_force):
        tmp_package.unlink()
        why = (
            f"its output differs by {diff:.1e}"
            if not ok
            else f"{mine:.2f} ms is not faster than {theirs:.2f} ms"
        )
        print(f"[trace] not saved: {why}", flush=True)
        return 1
    tmp_package.replace(package)
    meta = {
        "key": key,
        "package": package.name,
        "format": "aoti",
        "model": sd.key,
        "dtype": str(sd.dtype),
        "inputs": [list(map(str, s)) for s in sig],
        "torch": torch.__version__,
        "device": sd.fast.device_name,
        "timings_ms": rows,
        "relative_l2_vs_eager": diff,
        "constants_in_package": False,
        "compile_s": compile_s,
    }
    package.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(
        f"[trace] saved {package} ({package.stat().st_size / 2**20:.0f} MiB); runs with these options load it"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
