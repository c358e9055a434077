"""Rendering speed: CUDA kernels vs their PyTorch twin vs plain ``run``.

A grid-backbone NeRF at the ``-O`` defaults (16 levels, 2^19 table, finest 2048, 128^3
occupancy grid, 1024 max steps) is first fitted to an analytic object (a ball on a box, with
colour), so the occupancy grid and the samples per ray look like a trained scene. Then:

* training: a 64x64 render with lambertian shading (normals included) plus backward;
* test: one 800x800 frame (albedo, no gradients), the validation/test video path;

for ``run_cuda`` with the CUDA kernels, ``run_cuda`` with the twin, and ``run``. Median
milliseconds (CUDA events), peak memory, and the occupancy-grid quality of a partial refresh
against full sweeps.

    python scripts/bench_render.py [--device cuda] [--repeat 50] [--out docs/bench_render.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gridencoder  # noqa: E402
import raymarching  # noqa: E402
from main import nerf_configs, parse_args  # noqa: E402
from nerf.fields import build_field  # noqa: E402
from nerf.provider import circle_poses, get_rays, intrinsics_from_fovy  # noqa: E402
from scripts.trace_stats import summary  # noqa: E402

# The grid encoder's CUDA kernel layouts compared by --kernel_variants: (agg_mode, soa), the
# GridEncoder attributes (see gridencoder.grid_encode).
GRID_LAYOUTS = ((0, False), (1, False), (0, True), (1, True))


def grid_layout(model) -> tuple[int, bool]:
    """The (agg_mode, soa) of the model's grid encoder."""
    return model.encoder.agg_mode, model.encoder.soa


def set_grid_layout(model, layout: tuple[int, bool]) -> None:
    model.encoder.agg_mode, model.encoder.soa = layout


# The fitted object: a ball (centre, radius) on a box (centre, half sizes).
BALL_C, BALL_R = (0.0, 0.2, 0.0), 0.35
BOX_C, BOX_H = (0.0, -0.25, 0.0), (0.4, 0.15, 0.3)


def target_field(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ball (r 0.35 at y=0.2) on a box (0.8 x 0.3 x 0.6 below y=-0.05): sigma, albedo."""
    ball = (x - torch.tensor(BALL_C, device=x.device)).norm(dim=-1) < BALL_R
    q = (x - torch.tensor(BOX_C, device=x.device)).abs()
    box = (q < torch.tensor(BOX_H, device=x.device)).all(-1)
    sigma = 100.0 * (ball | box).float()
    albedo = torch.where(
        ball[:, None],
        torch.tensor([0.9, 0.2, 0.1], device=x.device),
        torch.tensor([0.2, 0.4, 0.9], device=x.device),
    )
    return sigma, albedo


def fit(model, device, steps: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = (torch.rand(2**16, 3, device=device) * 2 - 1) * 0.8
        sigma_t, albedo_t = target_field(x)
        out = model.density(x)
        loss = (torch.log1p(out["sigma"]) - torch.log1p(sigma_t)).pow(2).mean()
        loss = loss + ((out["albedo"] - albedo_t).pow(2).sum(-1) * (sigma_t > 0)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def timeit(fn, repeat: int, device, warmup: int = 3) -> tuple[float, float]:
    """Median ms and peak MiB of ``fn`` (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(repeat):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        peak = float("nan")
    return statistics.median(times), peak


def train_render(model, ro, rd, light, shading: str) -> None:
    """One training render (fp16 autocast on CUDA, jittered march) plus its backward."""
    model.train()
    device = ro.device
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        out = model.render(
            ro,
            rd,
            light_d=light,
            ambient_ratio=0.3,
            shading=shading,
            bg_color=torch.ones(3, device=device),
            perturb=True,
        )
    (out["image"].float().mean() + out["weights_sum"].float().mean()).backward()


def rays(device, H, W, azimuth=30.0):
    poses = circle_poses(torch.tensor([3.2]), torch.tensor([75.0]), torch.tensor([azimuth]), device)
    return get_rays(poses, intrinsics_from_fovy(torch.tensor([20.0], device=device), H, W), H, W)


def render_frame(model, ro: torch.Tensor, rd: torch.Tensor) -> dict:
    """One test frame (no gradients; fp16 autocast on CUDA), as validation and videos render."""
    model.eval()
    dev = ro.device.type
    with torch.no_grad(), torch.autocast(dev, dtype=torch.float16, enabled=dev == "cuda"):
        return model.render(ro, rd, bg_color=torch.ones(3, device=ro.device), max_ray_batch=4096)


def counted(fn) -> tuple[object, list[tuple[int, int]]]:
    """fn()'s result and the (n_alive, n_step) of every inference-march call it made."""
    calls = []
    orig = raymarching.march_rays

    def counting(n_alive, n_step, *a, **k):
        calls.append((n_alive, n_step))
        return orig(n_alive, n_step, *a, **k)

    raymarching.march_rays = counting
    try:
        return fn(), calls
    finally:
        raymarching.march_rays = orig


def training_samples(model, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One 64x64 training march (jittered) of the fitted scene: samples [M,3] and the indices
    of those kept by sample pruning."""
    ro, rd = rays(device, 64, 64)
    ro, rd = ro.reshape(-1, 3), rd.reshape(-1, 3)
    nears, fars = raymarching.near_far_from_aabb(ro, rd, model.aabb, model.min_near)
    xyzs, _, ts, packed = raymarching.march_rays_train(
        ro,
        rd,
        model.bound,
        model.density_bitfield,
        model.cascade,
        model.grid_size,
        nears,
        fars,
        True,
        model.cfg.dt_gamma,
        model.cfg.max_steps,
    )
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16):
        keep, _ = raymarching.prune_rays_train(model.common_forward(xyzs)[0].float(), ts, packed, 1e-5)
    return xyzs, keep


def profile(model, device, light, test_size: int, path: Path) -> None:
    """Sample counts and torch.profiler tables (CUDA time) of both CUDA-path calls; Chrome
    traces of them beside ``path`` (``*.trace.json``, for perfetto or chrome://tracing)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    lines = []
    model.train()
    ro, rd = rays(device, 64, 64)
    xyzs, keep = training_samples(model, device)
    lines.append(
        f"64x64 training march: {xyzs.shape[0]} samples ({xyzs.shape[0] / 4096:.1f} per ray), "
        f"{keep.numel()} after pruning"
    )
    ro8, rd8 = rays(device, test_size, test_size)

    def frame():
        return render_frame(model, ro8, rd8)

    _, calls = counted(frame)
    lines.append(
        f"{test_size}^2 test frame: {len(calls)} loop iterations, {sum(a * b for a, b in calls)} samples; "
        f"(n_alive, n_step): {calls[:6]} ... {calls[-3:]}"
    )
    # The eager training render, then the same replayed from CUDA graphs (--graph_render): the
    # profiler lists the kernels inside the replays too.
    for shading, graphed in (
        ("lambertian", False),
        ("albedo", False),
        ("lambertian", True),
        ("albedo", True),
    ):
        model.graph_render = graphed

        def step(shading=shading):
            train_render(model, ro, rd, light, shading)

        for _ in range(8 if graphed else 3):  # the graphed render is captured in its first calls
            step()
        torch.cuda.synchronize()
        with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        label = f"{shading}{'_graphed' if graphed else ''}"
        trace = path.with_suffix(f".train_{label}.trace.json")
        prof.export_chrome_trace(str(trace))
        lines += [
            summary(trace, steps=5),
            f"== train {label} x5",
            prof.key_averages().table(sort_by="cuda_time_total", row_limit=30),
        ]
    model.graph_render = False
    for k in (1, 2, 4, 8):
        model.min_infer_step = k
        ms, _ = timeit(frame, 5, device)
        lines.append(
            f"test frame with min_infer_step {k}: {ms:.1f} ms, alpha {frame()['weights_sum'].mean():.4f}"
        )
    model.min_infer_step = type(model).min_infer_step
    for k in (8, 16, 32, 64, 128):
        model.max_infer_step = k
        out, calls = counted(frame)
        ms, _ = timeit(frame, 5, device)
        lines.append(
            f"test frame with max_infer_step {k}: {ms:.1f} ms, {len(calls)} loop iterations, "
            f"{sum(a * b for a, b in calls)} samples, alpha {out['weights_sum'].mean():.4f}"
        )
    model.max_infer_step = type(model).max_infer_step
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        frame()
        torch.cuda.synchronize()
    trace = path.with_suffix(".frame.trace.json")
    prof.export_chrome_trace(str(trace))
    lines += [
        summary(trace),
        "== test frame x1",
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=30),
    ]
    path.write_text("\n".join(lines) + "\n")
    print(*[ln for ln in lines if not ln.startswith(("==", " ", "-"))][:8], sep="\n")


def grid_kernels(model, device) -> list[str]:
    """Hash-grid forward + backward on one lambertian training step's points (the kept samples
    and their six fd offsets, as the network evaluates them) for each kernel layout, and the
    backward's cost per level (by timing the first k levels)."""
    xyzs, keep = training_samples(model, device)
    x = xyzs[keep]
    fd = model._stencil_points(x)  # the six fd offsets of each sample, as the network makes them
    enc = model.encoder
    up = {n: torch.randn(p.shape[0], enc.output_dim, device=device) for n, p in (("main", x), ("fd", fd))}
    lines = [
        "",
        f"Hash grid on one training step: {x.shape[0]} kept samples + {fd.shape[0]} fd points.",
        "",
        "| agg_mode | soa | forward ms (main + fd) | forward + backward ms |",
        "|---|---|---|---|",
    ]
    saved = grid_layout(model)

    def fwd():
        with torch.no_grad():
            enc(x, bound=model.bound), enc(fd, bound=model.bound)

    def fwd_bwd(max_level=None):
        enc.embeddings.grad = None
        ys = [enc(p, bound=model.bound, max_level=max_level) for p in (x, fd)]
        torch.autograd.backward(ys, [up["main"], up["fd"]])

    for agg, soa in GRID_LAYOUTS:
        set_grid_layout(model, (agg, soa))
        f_ms, _ = timeit(fwd, 20, device)
        fb_ms, _ = timeit(fwd_bwd, 20, device)
        lines.append(f"| {agg} | {soa} | {f_ms:.2f} | {fb_ms:.2f} |")
    set_grid_layout(model, saved)
    L = enc.num_levels
    cum = [timeit(lambda k=k: fwd_bwd(k / L), 10, device)[0] for k in range(1, L + 1)]
    per = [cum[0]] + [b - a for a, b in zip(cum, cum[1:])]
    lines += [
        "",
        "Forward + backward by level (ms added by level k, default layout): "
        + ", ".join(f"{k}:{v:.2f}" for k, v in enumerate(per)),
    ]
    return lines


def ab_rounds(model, device, light, repeat: int, attr: str, values, shadings=("lambertian",)) -> list[str]:
    """Training render + backward with ``model.<attr>`` set to each of ``values`` in turn,
    alternating, three rounds per shading (machines drift: compare within a round)."""
    ro, rd = rays(device, 64, 64)
    cases = [
        (shading, lambda s=shading: train_render(model, ro, rd, light, s), repeat) for shading in shadings
    ]
    return alternate(model, device, attr, values, "shading", cases)


def ab_march(model, device, light, repeat: int) -> list[str]:
    """Training renders, eager and replayed from CUDA graphs (--graph_render), with the CUDA
    training march as a thread walking each ray and as a warp per ray (the renderer's
    ``march_warp``, ``NeRFSpeedConfig.march_warp``), alternating, three rounds per case; each
    graphed measurement captures its graphs anew (the march is chosen at capture)."""
    from nerf.fast.graphed import GraphedRender

    ro, rd = rays(device, 64, 64)
    saved = (model.graph_render, model.render_graphs, model.march_warp)
    lines = ["", "| training render | round | thread per ray, ms | warp per ray, ms |", "|---|---|---|---|"]
    for graphed in (False, True):
        model.graph_render = graphed
        for shading in ("albedo", "lambertian"):
            for r in range(3):
                ms = []
                for warp in (False, True):
                    model.render_graphs = GraphedRender(max_work=saved[1].max_work)
                    model.march_warp = warp
                    fn = lambda s=shading: train_render(model, ro, rd, light, s)  # noqa: E731
                    ms.append(timeit(fn, repeat, device, warmup=8)[0])
                label = f"{shading}{', graphed' if graphed else ''}"
                lines.append(f"| {label} | {r + 1} | {ms[0]:.2f} | {ms[1]:.2f} |")
    model.graph_render, model.render_graphs, model.march_warp = saved
    return lines


def ab_frames(model, device, size: int, repeat: int, attr: str, values) -> list[str]:
    """The test frame with ``model.<attr>`` set to each of ``values``, alternating, three rounds."""
    ro8, rd8 = rays(device, size, size)
    cases = [(f"{size}x{size}", lambda: render_frame(model, ro8, rd8), max(3, repeat // 5))]
    return alternate(model, device, attr, values, "frame", cases)


def _owner(model, attr: str) -> tuple[object, str]:
    """The object and name a dotted attribute path of the model ends at (``fused_head.triton``)."""
    *path, name = attr.split(".")
    for part in path:
        model = getattr(model, part)
    return model, name


def alternate(model, device, attr: str, values, what: str, cases) -> list[str]:
    """Markdown rows: each (label, fn, repeat) of ``cases`` timed with ``model.<attr>`` (a dotted
    path) set to each of ``values`` in turn, three rounds; ``what`` heads the label column."""
    owner, name = _owner(model, attr)
    saved = getattr(owner, name)
    lines = ["", f"| {what} | round | " + " | ".join(f"{attr}={v}, ms" for v in values) + " |"]
    lines.append("|---|---|" + "---|" * len(values))
    for label, fn, reps in cases:
        for r in range(3):
            ms = []
            for v in values:
                setattr(owner, name, v)
                ms.append(timeit(fn, reps, device)[0])
            lines.append(f"| {label} | {r + 1} | " + " | ".join(f"{m:.2f}" for m in ms) + " |")
    setattr(owner, name, saved)
    return lines


def infer_thresholds(model, device, size: int) -> list[str]:
    """Test-frame time, samples evaluated and image change for --infer_T_thresh values."""
    ro8, rd8 = rays(device, size, size)

    def frame():
        return render_frame(model, ro8, rd8)

    saved = model.cfg.infer_T_thresh
    lines = [
        "",
        f"| --infer_T_thresh | {size}x{size} frame, ms | samples | loop iterations "
        "| max abs image change | mean abs image change |",
        "|---|---|---|---|---|---|",
    ]
    ref = None
    for t in (1e-4, 1e-3, 1e-2):
        model.cfg = dataclasses.replace(model.cfg, infer_T_thresh=t)
        ms, _ = timeit(frame, 7, device)
        out, calls = counted(frame)
        img = out["image"].float()
        ref = img if ref is None else ref
        d = (img - ref).abs()
        samples = sum(a * b for a, b in calls)
        lines.append(f"| {t:g} | {ms:.1f} | {samples} | {len(calls)} | {d.max():.4f} | {d.mean():.5f} |")
    model.cfg = dataclasses.replace(model.cfg, infer_T_thresh=saved)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--fit_steps", type=int, default=500)
    ap.add_argument("--test_size", type=int, default=800)
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    ap.add_argument("--profile", default=None, help="write torch.profiler tables of the CUDA path here")
    ap.add_argument(
        "--kernel_variants",
        action="store_true",
        help="add rows for the grid encoder's other kernel layouts (GridEncoder agg_mode, soa)",
    )
    ap.add_argument(
        "--stencil_calls",
        action="store_true",
        help="also time the lambertian training render with one field call for samples and fd "
        "points against two (FieldNetwork.merge_stencil_max)",
    )
    ap.add_argument(
        "--fused_head",
        action="store_true",
        help="also time the training renders with the MLP + head as one autograd node "
        "(FieldNetwork.fused_head, nerf/fast/field.py) against the module path",
    )
    ap.add_argument(
        "--fused_mlp",
        action="store_true",
        help="also time the training renders and the test frame with the MLP + head and the fd shading "
        "as Triton kernels (FieldNetwork.fused_head.triton, --fused_mlp) against the PyTorch path "
        "(_MLPHead, _FDShade)",
    )
    ap.add_argument(
        "--graph_render",
        action="store_true",
        help="also time the training renders replayed from CUDA graphs (--graph_render) against the "
        "eager render, alternating",
    )
    ap.add_argument(
        "--ab_march",
        action="store_true",
        help="also time the training renders (eager and graphed) with the CUDA training march as a "
        "thread per ray against a warp per ray (--march_warp), alternating",
    )
    ap.add_argument(
        "--ab",
        action="append",
        default=[],
        metavar="ATTR",
        help="also time the training renders with the model's boolean attribute ATTR off and on, "
        "alternating (a dotted path, e.g. fused_head.blob_in_kernel); repeatable",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    opt, _ = parse_args(["--text", "bench", "-O"])
    model = build_field(*nerf_configs(opt)).to(device)
    t0 = time.time()
    fit(model, device, args.fit_steps)
    for _ in range(16):
        model.update_extra_state()
    fit_s = time.time() - t0
    occ_full = model.occupancy()
    grid_full = model.density_grid.clone()

    rows = []
    # (name, backend, cuda_ray, prune, grid-encoder kernel layout (agg_mode, soa) or None,
    # --graph_pass / --graph_render or None)
    variants = [
        ("run_cuda, CUDA kernels", "auto", True, True, None, None),
        (
            "run_cuda, CUDA kernels, graphed training render (--graph_render)",
            "auto",
            True,
            True,
            None,
            "render",
        ),
        ("run_cuda, CUDA kernels, graphed network pass (--graph_pass)", "auto", True, True, None, "pass"),
        ("run_cuda, CUDA kernels, no sample pruning", "auto", True, False, None, None),
        ("run_cuda, PyTorch twin", "torch", True, True, None, None),
        ("run (PyTorch sampling)", "torch", False, True, None, None),
    ]
    if device.type != "cuda":
        variants = variants[4:]
    elif args.kernel_variants:
        default = grid_layout(model)
        for agg, soa in GRID_LAYOUTS:
            if (agg, soa) != default:
                name = f"run_cuda, CUDA kernels, grid agg_mode {agg}" + (" soa" if soa else "")
                variants.insert(1, (name, "auto", True, True, (agg, soa), None))
    light = torch.nn.functional.normalize(torch.tensor([[0.3, 0.5, 1.0]], device=device), dim=-1)
    for name, backend, cuda_ray, prune, layout, graph in variants:
        saved = grid_layout(model)
        model.graph_pass, model.graph_render = graph == "pass", graph == "render"
        if layout is not None:
            set_grid_layout(model, layout)
        model.cfg = dataclasses.replace(model.cfg, prune_samples=prune)
        raymarching.set_backend(backend)
        gridencoder.set_backend(backend)
        model.cuda_ray = cuda_ray
        ro, rd = rays(device, 64, 64)

        def train_step(ro=ro, rd=rd, shading="lambertian"):
            train_render(model, ro, rd, light, shading)

        train_ms, train_mem = timeit(train_step, args.repeat, device)
        albedo_ms, _ = timeit(lambda: train_step(shading="albedo"), args.repeat, device)
        S = args.test_size
        ro8, rd8 = rays(device, S, S)

        def test_frame(ro8=ro8, rd8=rd8):
            return render_frame(model, ro8, rd8)

        # The twin's inference loop is many small launches: time it fewer times.
        reps = max(3, args.repeat // 5) if backend == "auto" or not cuda_ray else 2
        test_ms, test_mem = timeit(test_frame, reps, device, warmup=1 if reps == 2 else 3)
        alpha = test_frame()["weights_sum"].float().mean().item()
        rows.append((name, train_ms, albedo_ms, train_mem, test_ms, test_mem, alpha))
        if graph == "render":
            g = model.render_graphs
            print(
                f"--graph_render: {g.captures} captures, {g.overflows} overflows, counts {[s.need for s in g.sizes.values()]}"
            )
        set_grid_layout(model, saved)
    raymarching.set_backend("auto")
    gridencoder.set_backend("auto")
    model.cuda_ray = True
    model.cfg = dataclasses.replace(model.cfg, prune_samples=True)
    model.graph_pass = model.graph_render = False
    if args.profile:
        profile(model, device, light, args.test_size, Path(args.profile))
    thresh_lines = infer_thresholds(model, device, args.test_size) if device.type == "cuda" else []
    if device.type == "cuda" and args.kernel_variants:
        thresh_lines += grid_kernels(model, device)
    if args.stencil_calls:
        # One field call for samples and fd points (the default limit) against two (limit 0).
        thresh_lines += ab_rounds(
            model, device, light, args.repeat, "merge_stencil_max", (model.merge_stencil_max, 0)
        )
    if args.fused_head:
        thresh_lines += ab_rounds(
            model,
            device,
            light,
            args.repeat,
            "fused_head",
            (model.fused_head, None),
            ("albedo", "lambertian"),
        )
    if args.ab_march and device.type == "cuda":
        thresh_lines += ab_march(model, device, light, args.repeat)
    for attr in args.ab:
        thresh_lines += ab_rounds(
            model, device, light, args.repeat, attr, (False, True), ("albedo", "lambertian")
        )
    if args.graph_render:
        thresh_lines += ab_rounds(
            model, device, light, args.repeat, "graph_render", (False, True), ("albedo", "lambertian")
        )
    if args.fused_mlp:
        thresh_lines += ab_rounds(
            model, device, light, args.repeat, "fused_head.triton", (False, True), ("albedo", "lambertian")
        )
        thresh_lines += ab_frames(
            model, device, args.test_size, args.repeat, "fused_head.triton", (False, True)
        )

    # Occupancy-grid quality of partial refreshes: start from the full-sweep grid, run 64
    # partial refreshes (the default fraction), compare occupied sets.
    thresh = min(float(model.mean_density), model.density_thresh)
    ref = grid_full > thresh
    for _ in range(64):
        model.update_extra_state()
    part = model.density_grid > min(float(model.mean_density), model.density_thresh)
    agree = (ref == part).float().mean().item()
    missed = (ref & ~part).sum().item() / max(ref.sum().item(), 1)
    t_full, _ = timeit(lambda: model.update_extra_state(full=True), 5, device)
    t_part, _ = timeit(lambda: model.update_extra_state(full=False), 5, device)

    dev = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [
        f"Device: {dev}; torch {torch.__version__}; field fitted in {fit_s:.1f} s; occupancy {occ_full:.3f}.",
        "",
        "| path | 64x64 train render + backward, lambertian, ms | same, albedo, ms | peak MiB (lambertian) "
        f"| {args.test_size}x{args.test_size} test frame, ms | peak MiB | mean alpha |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {n} | {a:.2f} | {a2:.2f} | {b:.0f} | {c:.1f} | {d:.0f} | {e:.3f} |"
        for n, a, a2, b, c, d, e in rows
    ]
    lines += [
        "",
        f"Occupancy refresh: full sweep {t_full:.2f} ms, partial (grid_update_frac {opt.grid_update_frac}) "
        f"{t_part:.2f} ms; after 64 partial refreshes the occupied set agrees with the full sweep on "
        f"{agree * 100:.2f}% of cells and misses {missed * 100:.2f}% of the occupied ones.",
    ]
    lines += thresh_lines
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
