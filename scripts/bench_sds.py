"""SDS training speed: the full ``-O`` iteration for each speed lever, against eager fp16.

Builds a Stable Diffusion 2.1-base model with random weights (the real architecture and
configs, no download), then for each variant runs the real ``Trainer.train_one_step`` of a
default ``-O`` run (64x64 render through ``run_cuda``, SDS through the VAE encoder, the
regularizers, backward, Adan step, EMA) in the RGB phase, and reports

* median ms per iteration and iterations per second (a loop without extra syncs),
* peak GPU memory allocated and reserved (weights, graphs and training together),
* a breakdown: render (forward + backward), VAE encode (forward + backward to the image),
  UNet (CFG batch), optimizer (Adan + EMA), other (the rest of the iteration),
* the relative L2 difference of the SDS image gradient from the baseline's on the same
  image, t, noise and posterior sample.

    python scripts/bench_sds.py [--model sd2.1-base] [--iters 40] [--variants a,b] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guidance.sd_factory import build_sd  # noqa: E402
from guidance.sd_utils import StableDiffusion, unet_eager  # noqa: E402
from main import build_guidance, configs_from, configure_cuda_allocator, parse_args  # noqa: E402
from nerf.fast.graphed import collector_frozen  # noqa: E402
from nerf.fields import build_field  # noqa: E402
from nerf.provider import NeRFDataset  # noqa: E402
from nerf.utils import Trainer  # noqa: E402
from scripts.bench_render import fit  # noqa: E402
from scripts.trace_stats import summary  # noqa: E402

OFF = [
    "--no-unet_graph",
    "--no-vae_graph",
    "--no-compile_vae",
    "--no-channels_last",
    "--no-vae_fused_gn",
    "--no-unet_fused_qkv",
    "--no-fused_mlp",
    "--no-graph_render",
    "--unet_traced",
    "off",
]
# The -O default's levers before the fused VAE GroupNorm (runs 7-10 measured against these).
COMPILED_GRAPHS = [
    "--fp16",
    *OFF,
    "--unet_graph",
    "--compile_unet",
    "--channels_last",
    "--vae_graph",
    "--compile_vae",
]
# The -O default's levers before the fused MLP (run 11's default).
FUSED_GN = [*COMPILED_GRAPHS, "--vae_fused_gn"]
# The -O default's levers before the graphed training render (runs 12-14's default).
FUSED_MLP = [*FUSED_GN, "--fused_mlp"]
# The -O default's levers before the fused q/k/v projections (runs 14-15's default).
GRAPH_RENDER = [*FUSED_MLP, "--graph_render"]
# The -O default's levers (main.O_SPEED_DEFAULTS, with fp16).
O_DEFAULT = [*GRAPH_RENDER, "--unet_fused_qkv"]
# name -> extra command-line options on top of "--cuda_ray" (all levers off unless named).
VARIANTS: dict[str, list[str]] = {
    "eager fp16 (baseline)": ["--fp16", *OFF],
    "UNet graph": ["--fp16", *OFF, "--unet_graph"],
    "UNet graph + channels_last": ["--fp16", *OFF, "--unet_graph", "--channels_last"],
    "UNet graph + CL + VAE graph": ["--fp16", *OFF, "--unet_graph", "--channels_last", "--vae_graph"],
    "UNet graph + CL + compiled VAE graph": [
        "--fp16",
        *OFF,
        "--unet_graph",
        "--channels_last",
        "--vae_graph",
        "--compile_vae",
    ],
    "UNet graph + CL + compiled VAE graph + VAE CL": [
        "--fp16",
        *OFF,
        "--unet_graph",
        "--channels_last",
        "--vae_graph",
        "--compile_vae",
        "--vae_channels_last",
    ],
    "compiled UNet graph + CL + compiled VAE graph": COMPILED_GRAPHS,
    "compiled UNet graph + CL + compiled VAE graph + tetra normals": [
        *COMPILED_GRAPHS,
        "--normal_method",
        "tetra",
    ],
    "compiled UNet graph + CL + compiled VAE graph + fused VAE GroupNorm": FUSED_GN,
    "-O default": O_DEFAULT,
    "-O default without the fused qkv projections": GRAPH_RENDER,
    "-O default without the graphed render": FUSED_MLP,
    # --graph_render beside run 12's default: without a work limit, with more headroom, and
    # with other limits than -O's 3M rows.
    "-O default + graphed training render": [*FUSED_MLP, "--graph_render", "--graph_render_max_work", "0"],
    "-O default + graphed training render with 50% headroom": [
        *FUSED_MLP,
        "--graph_render",
        "--graph_render_headroom",
        "1.5",
        "--graph_render_max_work",
        "0",
    ],
    "-O default + graphed training render up to 1M rows": [
        *FUSED_MLP,
        "--graph_render",
        "--graph_render_max_work",
        str(2**20),
    ],
    "-O default + graphed training render up to 2M rows": [
        *FUSED_MLP,
        "--graph_render",
        "--graph_render_max_work",
        str(2**21),
    ],
    "compiled UNet graph + CL + compiled VAE graph + VAE CL": [*COMPILED_GRAPHS, "--vae_channels_last"],
    "compiled UNet graph + CL + compiled VAE graph + graphed network pass": [
        *COMPILED_GRAPHS,
        "--graph_pass",
    ],
    "compiled UNet graph + CL + compiled VAE graph + graphed network pass (2 buckets per octave)": [
        *COMPILED_GRAPHS,
        "--graph_pass",
        "--graph_buckets",
        "2",
    ],
    # Runs 5-6's -O default without pruning (the name is kept for those runs' commands).
    "-O default without sample pruning": [
        "--fp16",
        *OFF,
        "--unet_graph",
        "--channels_last",
        "--vae_graph",
        "--compile_vae",
        "--no-prune_samples",
    ],
    "bf16: UNet graph + CL + VAE graph": [
        "--precision",
        "bf16",
        *OFF,
        "--unet_graph",
        "--channels_last",
        "--vae_graph",
    ],
    "eager bf16": ["--precision", "bf16", *OFF],
    "compile UNet + CL": ["--fp16", *OFF, "--compile_unet", "--channels_last"],
    "traced UNet graph + CL + compiled VAE graph": [
        "--fp16",
        *OFF[:-2],
        "--unet_traced",
        "auto",
        "--unet_graph",
        "--channels_last",
        "--vae_graph",
        "--compile_vae",
    ],
}
DEFAULT_VARIANTS = list(VARIANTS)[:5]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, model_path: str, extra: list[str], ws: Path, device: torch.device):
    """The objects ``main.main`` builds for a training run, with these options."""
    opt, _ = parse_args(
        ["--text", "a hamburger", "--hf_key", model_path, "--workspace", str(ws), "--quiet", "--cuda_ray"]
        + extra
        + shlex.split(args.extra)
    )
    if device.type != "cuda":
        opt.precision = "fp32"
    cfg = configs_from(opt)
    model = build_field(cfg.field, cfg.renderer, cfg.nerf_speed)
    sd = build_guidance(opt, device)["SD"]
    trainer = Trainer(cfg.trainer, model, {"SD": sd}, device, losses=cfg.losses, cond=cfg.cond)
    train_set = NeRFDataset(cfg.cameras, type="train", device=device)
    return opt, model, sd, trainer, train_set


def sds_image_grad(sd: StableDiffusion, emb: torch.Tensor, device: torch.device) -> torch.Tensor:
    """d SDS / d image for a fixed image, t, noise and posterior sample (seeded)."""
    g = torch.Generator(device="cpu").manual_seed(1234)
    img = torch.rand(1, 3, 64, 64, generator=g).to(device).requires_grad_(True)
    noise = torch.randn(1, 4, sd.latent_size, sd.latent_size, generator=g).to(device)
    t = torch.tensor([500], device=device)
    torch.manual_seed(99)  # the VAE posterior sample
    amp = torch.float16 if sd.dtype == torch.float16 else torch.bfloat16
    with torch.autocast(device.type, dtype=amp, enabled=device.type == "cuda" and sd.dtype != torch.float32):
        loss = sd.sds_step(emb, img, t=t, noise=noise)
    loss.backward()
    return img.grad.detach().float().cpu()


def flops(sd: StableDiffusion, emb: torch.Tensor, device: torch.device) -> dict[str, float]:
    """GFLOP of the UNet CFG call and of the VAE encoder forward + backward (to the input)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 4, sd.latent_size, sd.latent_size, device=device, dtype=sd.dtype)
    t = torch.tensor([500, 500], device=device)
    out = {}
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        unet_eager(sd.unet, x, t, emb.to(sd.dtype))
    out["unet"] = fc.get_total_flops() / 1e9
    img = torch.rand(1, 3, sd.image_size, sd.image_size, device=device, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        sd.encode_imgs(img).sum().backward()
    out["vae"] = fc.get_total_flops() / 1e9
    return out


class Marks:
    """Timestamps inside the real training iteration (CUDA events, no syncs): around the render,
    the VAE encode (forward; its backward through gradient hooks), the UNet call, the optimizer
    step with the EMA update, and the end of backward (GradScaler.unscale_)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ev: dict[str, list] = {}
        self.saved: list[tuple[object, str, object]] = []

    def __call__(self, name: str) -> None:
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
        else:
            e = time.perf_counter()
        self.ev.setdefault(name, []).append(e)

    def clear(self) -> None:
        self.ev = {}

    def _ms(self, a: str, b: str) -> float:
        total = 0.0
        for x, y in zip(self.ev.get(a, []), self.ev.get(b, [])):
            total += x.elapsed_time(y) if self.device.type == "cuda" else (y - x) * 1e3
        return total

    def wrap(self, obj, attr: str, name: str, hooks: bool = False) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **k):
            self(f"{name}0")
            out = fn(*a, **k)
            self(f"{name}1")
            if hooks and a[0].requires_grad:
                out.register_hook(lambda g: self(f"{name}_bwd0"))
                a[0].register_hook(lambda g: self(f"{name}_bwd1"))
            return out

        self.saved.append((obj, attr, obj.__dict__.get(attr)))
        setattr(obj, attr, timed)

    def install(self, model, sd, trainer) -> None:
        self.wrap(model, "render", "render")
        self.wrap(sd, "encode_imgs", "vae", hooks=True)
        self.wrap(sd, "predict_noise", "unet")
        self.wrap(trainer.optimizer, "step", "optim")
        self.wrap(trainer.scaler, "unscale_", "bwd_end")
        if trainer.ema is not None:
            self.wrap(trainer.ema, "update", "ema")

    def uninstall(self) -> None:
        for obj, attr, old in reversed(self.saved):
            if old is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)
        self.saved = []

    def breakdown(self) -> dict[str, float]:
        vae_bwd = self._ms("vae_bwd0", "vae_bwd1")
        out = {
            # render forward, plus the backward after the VAE's (render and regularizers)
            "render": self._ms("render0", "render1") + self._ms("vae_bwd1", "bwd_end0"),
            "vae": self._ms("vae0", "vae1") + vae_bwd,
            "unet": self._ms("unet0", "unet1"),
            "optim": self._ms("optim0", "optim1") + self._ms("ema0", "ema1"),
        }
        out["other"] = self._ms("start", "end") - sum(out.values())
        return out


def run_variant(name: str, extra: list[str], args, model_path: str, device: torch.device, tmp: Path) -> dict:
    """One variant's measurements, its graph captures inside ``collector_frozen`` as in a run
    (``Trainer.train``); its objects are unfrozen, and can go, when it ends."""
    with collector_frozen():
        return measure_variant(name, extra, args, model_path, device, tmp)


def measure_variant(
    name: str, extra: list[str], args, model_path: str, device: torch.device, tmp: Path
) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    opt, model, sd, trainer, train_set = build(args, model_path, extra, tmp / f"ws{len(name)}", device)
    sd.prepare(trainer.cond)  # what the trainer does at the start of a run
    if args.fitted:
        # A formed object (bench_render's ball on a box) instead of the fresh field's fog.
        fit(model, device, args.fitted)
    # The RGB phase (80% of a default run): past the latent warm-up, after a few grid refreshes.
    trainer.global_step = opt.iters // 2
    for _ in range(4):
        model.update_extra_state()
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # includes CUDA-graph capture / compilation
        trainer.train_one_step(train_set.train_batch())
    sync(device)
    warm_s = time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the training steps' own peak, below
    marks = Marks(device)
    marks.install(model, sd, trainer)
    times, parts, refreshed = [], [], []
    for _ in range(args.iters):
        data = train_set.train_batch()
        # Steps that refresh the occupancy grid first (every --update_extra_interval steps).
        refreshed.append(trainer.global_step % opt.update_extra_interval == 0)
        sync(device)
        t = time.perf_counter()
        marks.clear()
        marks("start")
        trainer.train_one_step(data)
        marks("end")
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
        parts.append(marks.breakdown())
    marks.uninstall()
    if device.type == "cuda":
        train_alloc = torch.cuda.max_memory_allocated(device) / 2**30
        train_reserved = torch.cuda.max_memory_reserved(device) / 2**30
    t = time.perf_counter()
    # As in training: cameras drawn a block at a time, no syncs beyond the loop's own.
    for data in train_set.iter_train_batches([None] * args.iters):
        trainer.train_one_step(data)
    sync(device)
    its = args.iters / (time.perf_counter() - t)
    # The same loop drawing each step's cameras on their own (before blocks), on batches drawn
    # beforehand, and the drawing alone: where the gap between the median step and the loop's
    # pace comes from.
    t = time.perf_counter()
    for _ in range(args.iters):
        trainer.train_one_step(train_set.train_batch())
    sync(device)
    its_step_draw = args.iters / (time.perf_counter() - t)
    batches = train_set.train_batches([None] * args.iters)
    sync(device)
    t = time.perf_counter()
    for b in batches:
        trainer.train_one_step(b)
    sync(device)
    its_predrawn = args.iters / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(args.iters):
        train_set.train_batch()
    sync(device)
    batch_ms = (time.perf_counter() - t) / args.iters * 1e3
    t = time.perf_counter()
    train_set.train_batches([None] * args.iters)
    sync(device)
    block_batch_ms = (time.perf_counter() - t) / args.iters * 1e3
    res = {
        "name": name,
        "options": " ".join(extra),
        "ms": statistics.median(times),
        "its": its,
        "its_step_draw": its_step_draw,
        "its_predrawn": its_predrawn,
        "batch_ms": batch_ms,
        "block_batch_ms": block_batch_ms,
        "graph_captures": model.graphs.captures,  # --graph_pass: network-pass graphs captured
        # --graph_render: renders captured, seconds capturing, replays that did not fit
        "render_graphs": (
            model.render_graphs.captures,
            model.render_graphs.capture_s,
            model.render_graphs.overflows,
        ),
        "step_ms_all": sorted(round(x, 1) for x in times),
        "step_ms_refresh": [round(x, 1) for x, r in zip(times, refreshed) if r],
        "refresh_ms": refresh_ms(model, trainer, device),
        "warmup_s": warm_s,
    }
    if device.type == "cuda":
        res["alloc_gib"] = torch.cuda.max_memory_allocated(device) / 2**30  # whole run, start-up included
        res["reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        res["train_alloc_gib"], res["train_reserved_gib"] = train_alloc, train_reserved
    for k in ("render", "vae", "unet", "optim", "other"):
        res[k] = statistics.median(p[k] for p in parts)
    emb = sd.embeddings_for(train_set.train_batch())

    res["grad"] = sds_image_grad(sd, emb[[0, 1]], device)
    if args.flops and not args.flop_counts:
        args.flop_counts = flops(sd, emb, device)
    if args.profile and name == args.profile_variant:
        profile(trainer, train_set, device, Path(args.profile))
    if args.host_profile and name == args.profile_variant:
        host_profile(trainer, train_set, device, Path(args.host_profile))
    return res


def refresh_ms(model, trainer: Trainer, device: torch.device, reps: int = 5) -> float:
    """Median ms of one occupancy-grid refresh alone (``update_extra_state`` under the
    trainer's autocast, synced before and after), at the grid's current refresh count."""
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        with trainer.autocast():
            model.update_extra_state()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def host_profile(
    trainer: Trainer, train_set: NeRFDataset, device: torch.device, out: Path, steps: int = 10
) -> None:
    """Where the host's time goes in ``steps`` training steps: each step's host time (from its
    start to its return, no sync added) against the wall time of all of them (one sync at the
    end), then the top of a cProfile of the same number of steps, by own and by cumulative time.
    A host time per step near the wall time per step means the host sets the pace."""
    import cProfile
    import io
    import pstats

    batches = list(train_set.iter_train_batches([None] * steps))
    sync(device)
    host, t0 = [], time.perf_counter()
    for data in batches:
        t = time.perf_counter()
        trainer.train_one_step(data)
        host.append((time.perf_counter() - t) * 1e3)
    sync(device)
    wall = (time.perf_counter() - t0) * 1e3 / steps
    pr = cProfile.Profile()
    pr.enable()
    for data in train_set.iter_train_batches([None] * steps):
        trainer.train_one_step(data)
    sync(device)
    pr.disable()
    buf = io.StringIO()
    stats = pstats.Stats(pr, stream=buf)
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(60)
    head = (
        f"host ms per step (no sync): median {statistics.median(host):.2f}, all {[round(h, 1) for h in host]}; "
        f"wall ms per step over the {steps} steps: {wall:.2f}"
    )
    out.write_text(f"{head}\n\ncProfile of {steps} steps:\n{buf.getvalue()}")
    print(f"host profile: {head}")


def profile(trainer: Trainer, train_set: NeRFDataset, device: torch.device, out: Path) -> None:
    """Profiler table (and a Chrome trace beside it) of 5 iterations; counts the host syncs (aten::_local_scalar_dense,
    cudaStreamSynchronize, cudaMemcpyAsync device->host)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for data in train_set.iter_train_batches([None] * 5):  # as the trainer draws cameras
            trainer.train_one_step(data)
        sync(device)
    trace = out.with_suffix(".trace.json")
    prof.export_chrome_trace(str(trace))  # for perfetto / chrome://tracing
    busy = summary(trace, steps=5)
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=40)
    table += "\n\n" + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=50)
    ev = {e.key: e.count for e in prof.key_averages()}
    syncs = {
        k: v for k, v in ev.items() if any(s in k for s in ("local_scalar", "Synchronize", "item", "Memcpy"))
    }
    where = sync_sites(trainer, train_set, device) if device.type == "cuda" else {}
    out.write_text(
        f"{busy}\n\nsyncs over 5 iterations: {json.dumps(syncs, indent=1)}\n\n"
        f"synchronising call sites over 3 iterations (torch.cuda sync debug mode): "
        f"{json.dumps(where, indent=1)}\n\n{table}\n"
    )
    print(f"profile: host-sync events over 5 iterations: {syncs}\n{busy}")


def sync_sites(trainer: Trainer, train_set: NeRFDataset, device: torch.device) -> dict[str, int]:
    """Where the training step synchronises with the GPU: torch's sync debug mode warns at each
    synchronising call; the innermost frame of this repository is counted (3 iterations)."""
    import traceback
    import warnings

    root = str(Path(__file__).resolve().parent.parent)
    sites: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(root)]
        key = (
            f"{frames[-1].filename[len(root) + 1 :]}:{frames[-1].lineno}"
            if frames
            else f"{filename}:{lineno}"
        )
        sites[key] = sites.get(key, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        old = warnings.showwarning
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for data in train_set.iter_train_batches([None] * 3):
                trainer.train_one_step(data)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = old
    return dict(sorted(sites.items(), key=lambda kv: -kv[1]))


def table(results: list[dict], device: torch.device) -> str:
    base = results[0]
    lines = [
        "| variant | ms/iter | it/s | speed-up | peak alloc GiB (run / steps) | peak reserved GiB (run / steps) "
        "| render | VAE enc+bwd "
        "| UNet | optimizer | other | SDS grad rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        diff = float((r["grad"] - base["grad"]).norm() / base["grad"].norm().clamp(min=1e-30))
        nan = float("nan")
        mem = (
            f"{r.get('alloc_gib', nan):.2f} / {r.get('train_alloc_gib', nan):.2f} | "
            f"{r.get('reserved_gib', nan):.2f} / {r.get('train_reserved_gib', nan):.2f}"
        )
        lines.append(
            f"| {r['name']} | {r['ms']:.1f} | {r['its']:.2f} | {base['ms'] / r['ms']:.2f}x | {mem} | "
            f"{r['render']:.1f} | {r['vae']:.1f} | {r['unet']:.1f} | {r['optim']:.1f} | {r['other']:.1f} "
            f"| {diff:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    configure_cuda_allocator()  # as main.py does, before CUDA starts
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="sd2.1-base", help="sd_factory config (random weights)")
    ap.add_argument("--hf_key", default=None, help="use this model folder instead of building one")
    ap.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help="comma-separated of " + str(list(VARIANTS)).replace("%", "%%"),
    )
    ap.add_argument("--extra", default="", help="more main.py options for every variant (e.g. a small grid)")
    ap.add_argument("--iters", type=int, default=40, help="timed iterations per variant")
    ap.add_argument("--warmup", type=int, default=8, help="untimed iterations first (graph capture)")
    ap.add_argument(
        "--fitted",
        type=int,
        default=0,
        help="first fit the field to bench_render's ball on a box in this many Adam steps (500 there): "
        "the render of a formed object, as in most of a run, instead of a fresh field's fog (0: fresh)",
    )
    ap.add_argument("--part_repeat", type=int, default=15, help="repeats of each breakdown part")
    ap.add_argument("--flops", action="store_true", help="count the UNet and VAE FLOPs (first variant)")
    ap.add_argument("--profile", default=None, help="write a profiler table of one variant here")
    ap.add_argument("--profile_variant", default="-O default")
    ap.add_argument(
        "--host_profile",
        default=None,
        help="write the host time per step and a cProfile of 10 steps of --profile_variant here",
    )
    ap.add_argument("--out", default=None, help="also write the Markdown table (and JSON beside it)")
    args = ap.parse_args()
    args.flop_counts = None
    device = torch.device(args.device)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_path = args.hf_key or str(build_sd(tmp / "sd", args.model))
        results = []
        for n in names:
            r = run_variant(n, VARIANTS[n], args, model_path, device, tmp)
            print(
                f"{n}: {r['ms']:.1f} ms/iter, {r['its']:.2f} it/s, warm-up {r['warmup_s']:.1f} s, "
                f"alloc {r.get('alloc_gib', 0):.2f} GiB, reserved {r.get('reserved_gib', 0):.2f} GiB; "
                f"cameras drawn per step {r['its_step_draw']:.2f} it/s, predrawn {r['its_predrawn']:.2f} it/s; "
                f"one batch {r['batch_ms']:.2f} ms, in a block {r['block_batch_ms']:.3f} ms per batch; "
                f"network-pass graphs captured {r['graph_captures']}; render graphs captured {r['render_graphs'][0]} "
                f"in {r['render_graphs'][1]:.2f} s, {r['render_graphs'][2]} did not fit; "
                f"step times {r['step_ms_all']}; steps with a grid refresh {r['step_ms_refresh']}; "
                f"one refresh alone {r['refresh_ms']:.1f} ms",
                flush=True,
            )
            results.append(r)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    field = f"fitted ball on a box ({args.fitted} steps)" if args.fitted else "fresh"
    md = f"device: {name}, torch {torch.__version__}, model {args.model}, field {field}\n\n{table(results, device)}\n"
    if args.flop_counts:
        md += f"\nGFLOP: UNet CFG call {args.flop_counts['unet']:.0f}, VAE encode fwd+bwd {args.flop_counts['vae']:.0f}\n"
    print(md)
    if args.out:
        Path(args.out).write_text(md)
        rows = [{k: v for k, v in r.items() if k != "grad"} for r in results]
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
