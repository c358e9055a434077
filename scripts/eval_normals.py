"""Accuracy of the normal methods (``--normal_method fd | tetra | autograd``) on a fitted field
whose true surface is known.

The grid backbone at the ``-O`` settings is fitted to bench_render's analytic object (a ball on a
box; ``scripts/bench_render.py: target_field``), as a trained scene. Rays of a few views around
it are rendered in training mode (lambertian, so normals are composited per sample as the
shading uses them). Where a ray is opaque (``weights_sum`` > 0.9) its expected hit point is
matched to the nearer analytic surface, whose normal is the truth; the angle between the
composited normal and it is the error, for each method on the same samples.

    python scripts/eval_normals.py [--device cpu] [--fit_steps 300] [--size 48] \
      [--methods "fd,tetra,autograd,tetra:0.005"]

Prints a Markdown table: mean, median and 90th percentile of the angle in degrees, per method
and per surface (ball, box faces away from the edges).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from main import nerf_configs, parse_args  # noqa: E402
from nerf.fields import build_field  # noqa: E402
from scripts.bench_render import BALL_C, BALL_R, BOX_C, BOX_H, fit, rays  # noqa: E402


def true_normals(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Outward normals [N,3] of the analytic surface nearest to points x [N,3], whether that is
    the ball [N] and the distance to it [N]. A box point near an edge (within 0.03 of a second
    face), where the normal is not defined, gets no box distance: its distance is the ball's,
    too large for the evaluation (which keeps points within 0.02 of the surface).

    >>> n, ball, dist = true_normals(torch.tensor([[0.0, 0.55, 0.0], [0.4, -0.25, 0.0]]))
    >>> n.tolist(), ball.tolist()
    ([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], [True, False])
    """
    c = torch.tensor(BALL_C, device=x.device)
    v = x - c
    r = v.norm(dim=-1)
    d_ball = (r - BALL_R).abs()
    q = (x - torch.tensor(BOX_C, device=x.device)) / torch.tensor(BOX_H, device=x.device)
    # The face a box point is on: the coordinate nearest to +-1 in units of the half size.
    gap = (q.abs() - 1).abs() * torch.tensor(BOX_H, device=x.device)
    face = gap.argmin(-1)
    n_box = torch.zeros_like(x).scatter_(1, face[:, None], torch.sign(q.gather(1, face[:, None])))
    d_box = gap.gather(1, face[:, None]).squeeze(1)
    second = gap.scatter(1, face[:, None], float("inf")).min(-1).values
    d_box = torch.where(second < 0.03, torch.full_like(d_box, float("inf")), d_box)
    ball = d_ball <= d_box
    n = torch.where(ball[:, None], v / r.clamp(min=1e-9)[:, None], n_box)
    return n, ball, torch.minimum(d_ball, d_box)


def angles(model, ro, rd, method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Degrees between the composited normal and the true one on opaque rays, and which rays
    hit the ball; also the hit points' distances to the analytic surface."""
    model.normal_method = method
    model.train()
    light = torch.nn.functional.normalize(torch.tensor([[0.3, 0.5, 1.0]], device=ro.device), dim=-1)
    out = model.render(ro, rd, light_d=light, ambient_ratio=0.3, shading="lambertian", perturb=False)
    ws = out["weights_sum"].reshape(-1).detach().float()
    hit = ws > 0.9
    depth = out["depth"].reshape(-1).detach().float()[hit] / ws[hit]
    x = ro.reshape(-1, 3)[hit] + rd.reshape(-1, 3)[hit] * depth[:, None]
    n = torch.nn.functional.normalize(out["normal_image"].reshape(-1, 3).detach().float()[hit], dim=-1)
    n_true, ball, dist = true_normals(x)
    cos = (n * n_true).sum(-1).clamp(-1, 1)
    return torch.rad2deg(torch.acos(cos)), ball, dist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fit_steps", type=int, default=300)
    ap.add_argument("--size", type=int, default=48, help="pixels per side of each view")
    ap.add_argument("--views", type=int, default=6, help="views around the object")
    ap.add_argument(
        "--methods",
        default="fd,tetra,autograd",
        help="comma-separated normal methods, each optionally with its stencil's eps as method:eps "
        "(default eps: the model's, 1e-2)",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    opt, _ = parse_args(["--text", "eval", "-O"])
    model = build_field(*nerf_configs(opt)).to(device)
    fit(model, device, args.fit_steps)
    for _ in range(16):
        model.update_extra_state()
    views = [rays(device, args.size, args.size, azimuth=360.0 * i / args.views) for i in range(args.views)]
    print(
        f"device {device}, fit {args.fit_steps} steps, {args.views} views of {args.size}^2, eps {model.normal_eps}"
    )
    print("\n| method | surface | rays | mean deg | median deg | p90 deg |\n|---|---|---|---|---|---|")
    default_eps = model.normal_eps
    for spec in args.methods.split(","):
        method, _, eps = spec.strip().partition(":")
        model.normal_eps = float(eps) if eps else default_eps
        res = [angles(model, ro, rd, method) for ro, rd in views]
        a = torch.cat([r[0] for r in res])
        ball = torch.cat([r[1] for r in res])
        dist = torch.cat([r[2] for r in res])
        near = dist < 0.02  # hit points on the analytic surface (not at edges or floaters)
        for name, sel in (("ball", near & ball), ("box faces", near & ~ball), ("all opaque rays", near)):
            v = a[sel]
            if v.numel() == 0:
                continue
            q = torch.quantile(v, torch.tensor([0.5, 0.9], device=v.device))
            print(f"| {spec.strip()} | {name} | {v.numel()} | {v.mean():.2f} | {q[0]:.2f} | {q[1]:.2f} |")


if __name__ == "__main__":
    main()
