"""The ``--cuda_ray`` training render at fixed sizes with no host sync: what ``--graph_render``
captures (``nerf/fast/graphed.py: GraphedRender``). ``NeRFRenderer.train_render`` is the
reference: the same march, pruning and network pass at the sizes the samples need (two syncs).
"""

from __future__ import annotations

import torch
from torch import nn

import raymarching


def train_render_fixed(
    renderer: nn.Module,
    rays_o: torch.Tensor,
    rays_d: torch.Tensor,
    noise: torch.Tensor | None,
    light_d: torch.Tensor | None,
    ambient_ratio: float | torch.Tensor,
    shading: str,
    need: bool,
    T_thresh: float,
    capacity: tuple[int, int],
) -> dict:
    """``renderer.train_render`` at fixed sizes, with no host sync.

    rays_o, rays_d: [N,3]; noise: [N] jitter or None; light_d: [N,3], [1,3] or None. The march
    fills ``capacity[0]`` rows and the pruning keeps up to ``capacity[1]``; padding rows belong
    to no ray (weight 0, no gradient). Besides the outputs of ``renderer.network_pass``:
    ``n_pruned`` and ``n_padding`` [] (device counts for per-sample means over the padded
    ``weights``), ``complete`` [] bool (every sample fit: the outputs are the eager render's) and
    ``totals`` [2] int32, the samples marched and kept before any clipping.
    """
    cfg = renderer.cfg
    N = rays_o.shape[0]
    nears, fars = raymarching.near_far_from_aabb(rays_o, rays_d, renderer.aabb, renderer.min_near)
    xyzs, dirs, ts, rays, marched = raymarching.march_rays_train_fixed(
        rays_o,
        rays_d,
        renderer.bound,
        renderer.density_bitfield,
        renderer.cascade,
        renderer.grid_size,
        nears,
        fars,
        noise,
        cfg.dt_gamma,
        cfg.max_steps,
        capacity[0],
        warp=renderer.march_warp,
    )
    fit = marched.clamp(max=capacity[0])  # samples in the march's rows
    rows, kept = capacity[0], fit
    if renderer._prunes(need):
        with torch.no_grad():
            sigma_pre = renderer.density(xyzs, live_count=fit)["sigma"].float()
        keep, rays, kept = raymarching.prune_rays_train_fixed(
            sigma_pre, ts, rays, 0.1 * T_thresh, capacity[1]
        )
        xyzs, dirs, ts = xyzs[keep], dirs[keep], ts[keep]
        rows = capacity[1]
    in_rays = kept.clamp(max=rows)
    # The padding rows' field evaluation is skipped by the CUDA and Triton kernels.
    out = renderer.network_pass(
        xyzs, dirs, ts, rays, light_d, ambient_ratio, shading, need, T_thresh, N, live_count=in_rays
    )
    out["n_pruned"] = (fit - in_rays).reshape(())
    out["n_padding"] = (rows - in_rays).reshape(())
    out["complete"] = ((marched <= capacity[0]) & (kept <= rows)).reshape(())
    out["totals"] = torch.cat([marched, kept])
    return out
