"""Time the mesh export stage by stage on an analytic field that looks like a trained NeRF.

The field is a body (sphere) on a base (rounded box) with a handle (torus), small bumps and a
few floaters, with a softplus-style density (like a NeRF's) and a smooth, varying albedo.

    python scripts/bench_mesh.py                      # 256^3, 2048^2 texture, CPU
    python scripts/bench_mesh.py --resolution 128 --texture_size 1024

Prints a Markdown table of stage times, then the end-to-end ``export_mesh`` time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nerf.mesh import (  # noqa: E402
    bake_texture,
    choose_threshold,
    clean_mesh,
    decimate_mesh,
    export_mesh,
    marching_cubes,
    query_density_grid,
    rasterize_uv,
    unwrap_uv,
    write_glb,
    write_obj,
    write_ply,
)


def scene_sdf(p: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) of a sphere on a box with a torus handle and bumps."""
    x, y, z = p.unbind(-1)
    bumps = 0.015 * torch.sin(14 * x) * torch.sin(14 * y) * torch.sin(14 * z)
    body = (p - p.new_tensor([0.0, 0.15, 0.0])).norm(dim=-1) - 0.45 + bumps
    q = (p - p.new_tensor([0.0, -0.5, 0.0])).abs() - p.new_tensor([0.55, 0.15, 0.4])
    base = q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0) - 0.03
    ring = torch.stack((torch.hypot(x - 0.55, y - 0.15) - 0.2, z), -1).norm(dim=-1) - 0.05
    floaters = (p - p.new_tensor([[-0.7, 0.7, 0.6]]).unsqueeze(1)).norm(dim=-1).min(0).values
    d = torch.minimum(torch.minimum(body, base), torch.minimum(ring, floaters - 0.02))
    return d


def density(p: torch.Tensor) -> torch.Tensor:
    # Softplus of a scaled SDF: about 10 at the surface, like a NeRF's sigma at the threshold.
    return torch.nn.functional.softplus(-60.0 * scene_sdf(p) + 2.3) * 4.6


def albedo(p: torch.Tensor) -> torch.Tensor:
    return torch.stack(
        (
            0.5 + 0.4 * torch.sin(3 * p[:, 0]),
            0.5 + 0.4 * torch.cos(4 * p[:, 1]),
            0.5 + 0.4 * torch.sin(5 * p[:, 2] + p[:, 0]),
        ),
        -1,
    )


def run_once(args: argparse.Namespace, out: Path) -> tuple[dict[str, float], dict[str, str]]:
    """One staged export, as export_mesh runs it -> ({stage: seconds}, {stage: note})."""
    times: dict[str, float] = {}
    notes: dict[str, str] = {}

    def timed(name, fn, note=lambda r: ""):
        t0 = time.perf_counter()
        r = fn()
        times[name] = time.perf_counter() - t0
        notes[name] = note(r)
        return r

    def faces(r):
        return f"{len(r[1])} faces"

    res, size = args.resolution, args.texture_size
    threshold = choose_threshold(args.density_thresh, None)
    t_all = time.perf_counter()
    grid = timed(f"density query ({res}^3)", lambda: query_density_grid(density, resolution=res))
    v, f = timed("marching cubes", lambda: marching_cubes(grid, threshold), faces)
    v, f = timed("clean", lambda: clean_mesh(v, f), faces)
    v, f = timed("decimate", lambda: decimate_mesh(v, f, args.decimate_target), faces)
    vt, ft, uv = timed(
        "uv unwrap (xatlas)",
        lambda: unwrap_uv(v, f, texture_size=size),
        lambda r: f"{len(r[0])} vertices after seam split",
    )
    tex = timed(f"bake texture ({size}^2)", lambda: bake_texture(vt, ft, uv, albedo, size))
    timed("write obj+mtl+png", lambda: write_obj(out, vt, ft, uv, tex))
    timed("write glb", lambda: write_glb(out / "mesh.glb", vt, ft, uv, tex))
    times["total"] = time.perf_counter() - t_all
    # Informational, outside the total: the rasterizer alone (part of the bake) and PLY.
    name = "(rasterizer alone, part of bake)"
    face_id, _ = timed(name, lambda: rasterize_uv(uv, ft, size, margin=1.0))
    notes[name] = f"{float((face_id >= 0).float().mean()):.0%} of texels covered"
    colours = albedo(torch.as_tensor(v)).clamp(0, 1).numpy()
    timed("(write ply, optional)", lambda: write_ply(out / "mesh.ply", v, f, colours))
    return times, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--texture_size", type=int, default=2048)
    ap.add_argument("--decimate_target", type=int, default=50000)
    ap.add_argument("--density_thresh", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=3, help="runs; best and median are shown")
    ap.add_argument("--skip_end_to_end", action="store_true")
    args = ap.parse_args()

    out = Path(tempfile.mkdtemp(prefix="bench_mesh_"))
    runs = [run_once(args, out) for _ in range(args.repeat)]
    notes = runs[-1][1]

    cmd = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
    print(f"`{cmd}`  ")
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), no GPU; "
        f"{args.repeat} run(s), best and median\n"
    )
    print("| stage | best s | median s | note |\n|---|---:|---:|---|")
    for name in runs[0][0]:
        vals = [r[0][name] for r in runs]
        best, med = min(vals), statistics.median(vals)
        label = "**total (obj + glb)**" if name == "total" else name
        print(f"| {label} | {best:.2f} | {med:.2f} | {notes.get(name, '')} |")

    if not args.skip_end_to_end:
        t0 = time.perf_counter()
        export_mesh(
            density,
            albedo,
            out / "e2e",
            resolution=args.resolution,
            density_thresh=args.density_thresh,
            decimate_target=args.decimate_target,
            texture_size=args.texture_size,
            formats=("obj", "glb"),
            progress=False,
        )
        print(f"| export_mesh end to end (obj + glb), once | {time.perf_counter() - t0:.2f} | | |")


if __name__ == "__main__":
    main()
