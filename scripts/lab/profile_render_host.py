"""Host time by section of bench_render's 64x64 training render + backward (lambertian, albedo).

The host's time per render without syncs between renders, then per section (march, pruning,
field, composite, backward...) with wrappers that time each call on the host (no sync added:
a section that syncs, like the march, also includes waiting for the GPU), then the top of a
cProfile of 30 lambertian renders. Where the eager render's host time goes, on a fitted scene.

    python scripts/lab/profile_render_host.py      (needs a GPU)
"""

import cProfile
import io
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import raymarching  # noqa: E402
from main import nerf_configs, parse_args  # noqa: E402
from nerf.fast import fused_mlp  # noqa: E402
from nerf.fields import build_field  # noqa: E402
from scripts.bench_render import fit, rays, train_render  # noqa: E402


def main() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    opt, _ = parse_args(["--text", "bench", "-O"])
    model = build_field(*nerf_configs(opt)).to(dev)
    fit(model, dev, 500)
    for _ in range(16):
        model.update_extra_state()
    ro, rd = rays(dev, 64, 64)
    light = torch.nn.functional.normalize(torch.tensor([[0.3, 0.5, 1.0]], device=dev), dim=-1)

    def step(shading):
        train_render(model, ro, rd, light, shading)

    for shading in ("lambertian", "albedo"):
        for _ in range(10):
            step(shading)
        torch.cuda.synchronize()
        # host-bound rate: no syncs between renders
        t = time.perf_counter()
        for _ in range(50):
            step(shading)
        torch.cuda.synchronize()
        print(f"{shading}: {(time.perf_counter() - t) / 50 * 1e3:.3f} ms per render (no syncs between)")
        ev = []
        for _ in range(30):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            h = time.perf_counter()
            a.record()
            step(shading)
            b.record()
            hh = time.perf_counter() - h
            torch.cuda.synchronize()
            ev.append((a.elapsed_time(b), hh * 1e3))
        ev.sort()
        print(f"{shading}: median event ms {ev[15][0]:.3f}, host ms of that call {ev[15][1]:.3f}")

    # Section timers (host time, no syncs added)
    acc = defaultdict(float)
    cnt = defaultdict(int)

    def wrap(obj, name, label):
        orig = getattr(obj, name)

        def w(*a, **k):
            t = time.perf_counter()
            r = orig(*a, **k)
            acc[label] += time.perf_counter() - t
            cnt[label] += 1
            return r

        setattr(obj, name, w)

    wrap(raymarching, "near_far_from_aabb", "near_far")
    wrap(raymarching, "march_rays_train", "march")
    wrap(raymarching, "prune_rays_train", "prune kernel")
    wrap(raymarching, "composite_rays_train", "composite")
    wrap(model, "density", "density (pre-pass)")
    wrap(model.encoder, "forward", "encoder fwd")
    wrap(fused_mlp, "mlp_head", "mlp_head fwd")
    wrap(fused_mlp, "fd_shade", "fd_shade fwd")
    wrap(fused_mlp, "supported", "supported")
    wrap(fused_mlp, "supported_fd_shade", "supported_fd_shade")
    wrap(model, "density_blob", "density_blob")
    wrap(model, "_stencil_points", "stencil points")
    wrap(model, "forward", "field forward (all)")
    wrap(model, "run_cuda", "run_cuda (all)")
    wrap(model, "render", "render (all)")
    wrap(model, "network_pass", "network_pass (all)")
    wrap(torch.Tensor, "backward", "backward (all)")
    for shading in ("lambertian", "albedo"):
        acc.clear()
        cnt.clear()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            step(shading)
        torch.cuda.synchronize()
        tot = (time.perf_counter() - t) / 50 * 1e3
        print(f"\n== {shading}: {tot:.3f} ms per render with wrappers")
        for k in sorted(acc, key=lambda k: -acc[k]):
            print(f"  {k:28s} {acc[k] / 50 * 1e3:8.3f} ms/render  {cnt[k] / 50:5.1f} calls")

    # cProfile
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(30):
        step("lambertian")
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(45)
    print(s.getvalue()[:12000])


if __name__ == "__main__":
    main()
