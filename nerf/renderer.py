"""Volume rendering of a NeRF field: ``run`` (pure PyTorch sampling) and ``run_cuda``
(occupancy-grid ray marching through ``raymarching``, CUDA on GPUs, its PyTorch twin on CPU).

Both paths composite front to back with ``alpha_i = 1 - exp(-sigma_i dt_i)``,
``w_i = alpha_i prod_{j<i}(1 - alpha_j)``, ``depth = sum w_i t_i`` and
``image = sum w_i c_i + (1 - sum w_i) * background``. Their orientation loss is the same:
``sum_i stopgrad(w_i) max(0, n_i . d)^2`` summed over samples and averaged over rays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import raymarching
from common.config import option
from raymarching._torch_impl import _ray_ids

from .fast import NeRFSpeedConfig
from .fast.graphed import training_graphs


@dataclass(frozen=True)
class RendererConfig:
    """How a field is rendered: the scene box, the sampling, the occupancy grid."""

    bound: float = option(1.0, "the scene is [-bound, bound]^3")
    cuda_ray: bool = option(
        False, "occupancy-grid ray marching (CUDA kernels on a GPU, their PyTorch twin on a CPU)"
    )
    max_steps: int = option(1024, "lattice points per ray (--cuda_ray)")
    num_steps: int = option(64, "stratified samples per ray (without --cuda_ray)")
    upsample_steps: int = option(32, "importance samples per ray (without --cuda_ray)")
    update_extra_interval: int = option(16, "occupancy-grid refresh period (steps)")
    grid_size: int = option(128, "occupancy-grid cells per axis")
    grid_update_frac: float = option(
        0.25,
        "fraction of cells re-evaluated per refresh after the first 16 (plus as many occupied ones); "
        "1 = every cell, as the reference",
    )
    density_thresh: float = option(10.0, "occupancy and mesh threshold (x25 for softplus)")
    dt_gamma: float = option(0.0, "adaptive step: dt = t * dt_gamma (0 = fixed)")
    min_near: float = option(0.01, "near plane")
    prune_samples: bool = option(
        True,
        "--cuda_ray training with normals: a density pass without gradients, then the full pass only "
        "on samples before transmittance falls below 1e-5 (same image and gradients)",
        tristate=True,
    )
    infer_T_thresh: float = option(
        1e-3,
        "--cuda_ray frames (validation, videos): a ray stops once its transmittance falls below this "
        "(the reference: 1e-4; docs/benchmarks.md)",
    )
    max_ray_batch: int = option(4096, "rays per chunk when rendering frames")


def sample_pdf(bins: torch.Tensor, weights: torch.Tensor, n_samples: int, det: bool = False) -> torch.Tensor:
    """Inverse-CDF sampling of ``n_samples`` per ray from piecewise-constant weights.

    Args:
        bins: [N, K+1] bin edges; weights: [N, K] non-negative.

    Returns:
        [N, n_samples] samples inside the bins.

    >>> s = sample_pdf(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[0.0, 1.0]]), 4, det=True)
    >>> bool(((s >= 1) & (s <= 2)).all())
    True
    """
    weights = weights + 1e-5
    pdf = weights / weights.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1)  # [N, K+1]
    if det:
        u = torch.linspace(0.5 / n_samples, 1 - 0.5 / n_samples, n_samples, device=bins.device)
        u = u.expand(cdf.shape[0], n_samples).contiguous()
    else:
        u = torch.rand(cdf.shape[0], n_samples, device=bins.device)
    idx = torch.searchsorted(cdf, u, right=True)
    below = (idx - 1).clamp(min=0)
    above = idx.clamp(max=cdf.shape[-1] - 1)
    cdf_b, cdf_a = cdf.gather(1, below), cdf.gather(1, above)
    bin_b, bin_a = bins.gather(1, below), bins.gather(1, above)
    denom = torch.where(cdf_a - cdf_b < 1e-5, torch.ones_like(cdf_a), cdf_a - cdf_b)
    return bin_b + (u - cdf_b) / denom * (bin_a - bin_b)


def composite(sigmas: torch.Tensor, colors: torch.Tensor, z: torch.Tensor, deltas: torch.Tensor):
    """Dense front-to-back compositing.

    Args:
        sigmas: [N,S]; colors: [N,S,C]; z: [N,S] sample distances; deltas: [N,S] step lengths.

    Returns:
        weights [N,S], weights_sum [N], depth [N], image [N,C].

    >>> w, ws, d, img = composite(torch.tensor([[0.0, 1e9]]), torch.ones(1, 2, 3),
    ...                           torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 1.0]]))
    >>> w.tolist(), d.tolist()
    ([[0.0, 1.0]], [2.0])
    """
    alphas = 1 - torch.exp(-deltas * sigmas)
    trans = torch.cumprod(torch.cat([torch.ones_like(alphas[:, :1]), 1 - alphas + 1e-15], -1), -1)[:, :-1]
    weights = alphas * trans
    return weights, weights.sum(-1), (weights * z).sum(-1), (weights[..., None] * colors).sum(-2)


def expand_light(
    light_d: torch.Tensor | None, n_per_image: int, B: int, device: torch.device | str
) -> torch.Tensor | None:
    """A light direction per image ([B,3] or [3]) as ``run``/``run_cuda`` take it: [1,3] when
    every ray shares one light (no per-sample gather needed), else [B*n_per_image,3].

    >>> expand_light(torch.ones(2, 3), 4, 2, "cpu").shape, expand_light(torch.ones(3), 4, 2, "cpu").shape
    (torch.Size([8, 3]), torch.Size([1, 3]))
    """
    if light_d is None:
        return None
    light_d = light_d.to(device).reshape(-1, 3)
    if light_d.shape[0] == 1 or B == 1:
        return light_d[:1]
    return light_d.repeat_interleave(n_per_image, 0)


class NeRFRenderer(nn.Module):
    """Renders a field. Subclasses provide ``forward``, ``density``, ``normal``, ``background``.

    With ``cfg.cuda_ray`` it keeps an occupancy grid: ``C = 1 + ceil(log2(bound))`` cascades
    of ``grid_size^3`` cells (Morton order), the densities' decayed maximum, its mean, and a
    packed bitfield of the cells above ``min(mean_density, density_thresh)``.
    """

    lr_decay = False
    # Inference marching takes max(min(N // n_alive, max_infer_step), min_infer_step) samples
    # per alive ray per iteration: fewer iterations (each one a host sync and a dozen launches)
    # against a few samples evaluated past a ray's termination. N // n_alive keeps every
    # iteration at most N samples; the reference caps it at 8, which leaves a tail of small
    # iterations for the last few (semi-transparent) rays.
    min_infer_step = 4  # 800x800 frame on the H100: 38.4 ms at 1 (the reference's rule), 29.9 at 4
    max_infer_step = 64

    def __init__(
        self,
        cfg: RendererConfig = RendererConfig(),
        speed: NeRFSpeedConfig = NeRFSpeedConfig(),
        density_thresh_scale: float = 1.0,
    ):
        super().__init__()
        self.cfg = cfg
        self.bound = float(cfg.bound)
        self.cascade = 1 + math.ceil(math.log2(max(self.bound, 1.0)))
        self.grid_size = int(cfg.grid_size)
        self.density_thresh = float(cfg.density_thresh) * density_thresh_scale
        self.min_near = float(cfg.min_near)
        self.cuda_ray = bool(cfg.cuda_ray)
        # The speed layer (nerf/fast/graphed.py): the training network pass (--graph_pass, in
        # train_render) or the whole training render (--graph_render, in run_cuda) from CUDA graphs.
        self.graph_pass, self.graph_render = bool(speed.graph_pass), bool(speed.graph_render)
        self.graphs, self.render_graphs = training_graphs(speed)
        self.march_warp = bool(speed.march_warp)  # the CUDA training march: a warp per ray
        b = self.bound
        self.register_buffer("aabb", torch.tensor([-b, -b, -b, b, b, b], dtype=torch.float32))
        if self.cuda_ray:
            G3 = self.grid_size**3
            self.register_buffer("density_grid", torch.zeros(self.cascade, G3))
            self.register_buffer("density_bitfield", torch.zeros(self.cascade * G3 // 8, dtype=torch.uint8))
            self.register_buffer("mean_density", torch.zeros(()))
            self.register_buffer("grid_updates", torch.zeros((), dtype=torch.long))

    def run(
        self,
        rays_o,
        rays_d,
        light_d=None,
        ambient_ratio=1.0,
        shading="albedo",
        perturb=False,
        need_normal=False,
        **_,
    ) -> dict:
        """Stratified (``--num_steps``) plus importance (``--upsample_steps``) sampling.

        rays_o, rays_d: [N,3]; light_d: [N,3] per ray, [1,3] for all rays, or None.
        """
        cfg = self.cfg
        N, device = rays_o.shape[0], rays_o.device
        nears, fars = raymarching.near_far_from_aabb(rays_o, rays_d, self.aabb, self.min_near)
        miss = nears >= 1e9
        nears = torch.where(miss, torch.full_like(nears, self.min_near), nears)
        fars = torch.where(miss, nears, fars)
        S = cfg.num_steps
        span = (fars - nears)[:, None]
        z = nears[:, None] + span * torch.linspace(0, 1, S, device=device)[None]
        if perturb:
            z = z + (torch.rand_like(z) - 0.5) * span / S
        z = torch.maximum(torch.minimum(z, fars[:, None]), nears[:, None])
        need = need_normal or shading != "albedo"

        def evaluate(zz):
            xyz = rays_o[:, None] + rays_d[:, None] * zz[..., None]
            xyz = torch.clamp(xyz, -self.bound, self.bound).reshape(-1, 3)
            k = zz.shape[1]
            dirs = rays_d[:, None].expand(-1, k, -1).reshape(-1, 3)
            light = light_d
            if light_d is not None and light_d.shape[0] > 1:
                light = light_d[:, None].expand(-1, k, -1).reshape(-1, 3)
            sigma, color, normal = self(xyz, dirs, light, ambient_ratio, shading, need_normal=need)
            sigma = sigma.reshape(N, k).float()
            color = color.reshape(N, k, -1).float()
            normal = None if normal is None else normal.reshape(N, k, 3).float()
            return sigma, color, normal

        sigma, color, normal = evaluate(z)
        if cfg.upsample_steps > 0:
            with torch.no_grad():
                deltas = torch.cat([z[:, 1:] - z[:, :-1], span / S], -1)
                w = composite(sigma.detach(), color.detach()[..., :1], z, deltas)[0]
                mids = 0.5 * (z[:, 1:] + z[:, :-1])
                new_z = sample_pdf(mids, w[:, 1:-1], cfg.upsample_steps, det=not perturb).detach()
            s2, c2, n2 = evaluate(new_z)
            z = torch.cat([z, new_z], 1)
            z, order = torch.sort(z, 1)
            sigma = torch.cat([sigma, s2], 1).gather(1, order)
            color = torch.cat([color, c2], 1).gather(1, order[..., None].expand(-1, -1, color.shape[-1]))
            if normal is not None:
                normal = torch.cat([normal, n2], 1).gather(1, order[..., None].expand(-1, -1, 3))
        deltas = torch.cat([z[:, 1:] - z[:, :-1], span / S], -1)
        weights, weights_sum, depth, image = composite(sigma, color, z, deltas)
        out = {"image": image, "depth": depth, "weights_sum": weights_sum, "weights": weights}
        if normal is not None:
            # Detached weights, as run_cuda composites normals with detached densities.
            out["normal_image"] = (weights.detach()[..., None] * normal).sum(-2)
            nd = (normal * rays_d[:, None]).sum(-1).clamp(min=0)
            out["loss_orient"] = (weights.detach() * nd**2).sum() / N
        return out

    def network_pass(
        self,
        xyzs: torch.Tensor,
        dirs: torch.Tensor,
        ts: torch.Tensor,
        rays: torch.Tensor,
        light_d: torch.Tensor | None,
        ambient_ratio: float | torch.Tensor,
        shading: str,
        need: bool,
        T_thresh: float,
        N: int,
        live_count: torch.Tensor | None = None,
    ) -> dict:
        """The field on packed training samples and their composite (``run_cuda``'s training
        step after marching): xyzs, dirs [M,3], ts [M,2], rays [N,2] (offset, count; rows in no
        ray, such as padding, get weight 0 and zero gradient); light_d [1,3] or [N,3];
        live_count [1] int32: the rows from it on are padding the field's kernels may skip."""
        M = xyzs.shape[0]
        light = light_d
        if light_d is not None and light_d.shape[0] > 1:
            light = light_d[_ray_ids(rays, M).clamp(min=0)]
        live = {} if live_count is None else {"live_count": live_count}
        sigma, color, normal = self(xyzs, dirs, light, ambient_ratio, shading, need_normal=need, **live)
        weights, weights_sum, depth, image = raymarching.composite_rays_train(
            sigma.float(), color.float(), ts, rays, T_thresh
        )
        out = {"image": image, "depth": depth, "weights_sum": weights_sum, "weights": weights}
        if normal is not None:
            out["normal_image"] = raymarching.composite_rays_train(
                sigma.detach().float(), normal.float(), ts, rays, T_thresh
            )[3]
            nd = (normal * dirs).sum(-1).clamp(min=0)
            out["loss_orient"] = (weights.detach() * nd**2).sum() / N
        return out

    def train_render(
        self,
        rays_o: torch.Tensor,
        rays_d: torch.Tensor,
        light_d: torch.Tensor | None,
        ambient_ratio: float,
        shading: str,
        perturb: bool,
        need: bool,
        T_thresh: float,
    ) -> tuple[dict, int, int]:
        """``run_cuda``'s training render: march, prune (``--prune_samples``), the network pass.

        rays_o, rays_d: [N,3]; light_d: [N,3], [1,3] or None. Returns the outputs and the sample
        counts marched and kept (host numbers: the march and the pruning each sync once).
        """
        cfg = self.cfg
        N = rays_o.shape[0]
        nears, fars = raymarching.near_far_from_aabb(rays_o, rays_d, self.aabb, self.min_near)
        xyzs, dirs, ts, rays = raymarching.march_rays_train(
            rays_o,
            rays_d,
            *self._grid(),
            nears,
            fars,
            perturb,
            cfg.dt_gamma,
            cfg.max_steps,
            warp=self.march_warp,
        )
        marched = xyzs.shape[0]
        if self._prunes(need) and marched > 0:
            # A cheap density-only pass without gradients finds where each ray's transmittance
            # is spent; samples behind that point would get weight 0 (and no gradient) in the
            # composite, so the costly pass (gradients, six fd-normal offsets) skips them.
            # Without normals the extra pass costs more than it saves (albedo: 6.0 -> 7.1 ms on
            # the H100, the CPU demo 10% slower).
            with torch.no_grad():
                sigma_pre = self.density(xyzs)["sigma"].float()
            keep, rays = raymarching.prune_rays_train(sigma_pre, ts, rays, 0.1 * T_thresh)
            xyzs, dirs, ts = xyzs[keep], dirs[keep], ts[keep]
        args = (xyzs, dirs, ts, rays, light_d, ambient_ratio, shading, need, T_thresh, N)
        if self.graph_pass and xyzs.is_cuda and torch.is_grad_enabled():
            out = self.graphs.run(self, *args)
        else:
            out = self.network_pass(*args)
        out["n_pruned"] = marched - xyzs.shape[0]  # samples dropped with weight 0 (per-sample means)
        return out, marched, xyzs.shape[0]

    def _grid(self) -> tuple[float, torch.Tensor, int, int]:
        """The occupancy grid as the marchers take it: bound, bitfield, cascades, cells per axis."""
        return self.bound, self.density_bitfield, self.cascade, self.grid_size

    def _prunes(self, need: bool) -> bool:
        return bool(self.cfg.prune_samples) and need

    def run_cuda(
        self,
        rays_o,
        rays_d,
        light_d=None,
        ambient_ratio=1.0,
        shading="albedo",
        perturb=False,
        need_normal=False,
        T_thresh=1e-4,
        **_,
    ) -> dict:
        """Occupancy-grid ray marching (``raymarching``): packed samples in training, an
        alive-ray loop with early termination at inference.

        rays_o, rays_d: [N,3]; light_d: [N,3] per ray, [1,3] for all rays, or None.
        """
        need = need_normal or shading != "albedo"
        if self.training:
            args = (rays_o, rays_d, light_d, ambient_ratio, shading, perturb, need, T_thresh)
            if self.graph_render and rays_o.is_cuda and torch.is_grad_enabled():
                return self.render_graphs.run(self, *args)
            return self.train_render(*args)[0]
        cfg = self.cfg
        N, device = rays_o.shape[0], rays_o.device
        nears, fars = raymarching.near_far_from_aabb(rays_o, rays_d, self.aabb, self.min_near)

        # Inference: march a few samples per alive ray at a time, drop finished rays.
        T_infer = float(cfg.infer_T_thresh)
        weights_sum = torch.zeros(N, device=device)
        depth = torch.zeros(N, device=device)
        image = torch.zeros(N, 3, device=device)
        normal_image = torch.zeros(N, 3, device=device) if need else None
        alive = torch.arange(N, dtype=torch.int32, device=device)
        rays_t = nears.clone()
        step = 0
        while step < cfg.max_steps:
            n_alive = alive.numel()
            if n_alive == 0:
                break
            n_step = max(min(N // n_alive, self.max_infer_step), self.min_infer_step)
            xyzs, dirs, ts = raymarching.march_rays(
                n_alive,
                n_step,
                alive,
                rays_t,
                rays_o,
                rays_d,
                *self._grid(),
                nears,
                fars,
                cfg.dt_gamma,
                cfg.max_steps,
            )
            light = light_d
            if light_d is not None and light_d.shape[0] > 1:
                light = light_d[alive.long()].repeat_interleave(n_step, 0)
            sigma, color, normal = self(xyzs, dirs, light, ambient_ratio, shading, need_normal=need)
            sigma, color = sigma.float(), color.float()
            if normal is not None:
                # Normals ride along as three extra colour channels of the same composite.
                color = torch.cat([color, (normal.float() + 1) / 2], -1)
                acc = torch.cat([image, normal_image], -1)
            else:
                acc = image
            raymarching.composite_rays(
                n_alive, n_step, alive, rays_t, sigma, color, ts, weights_sum, depth, acc, fars, T_infer
            )
            if normal is not None:
                image, normal_image = acc[:, :3].contiguous(), acc[:, 3:].contiguous()
            alive = alive[alive >= 0]
            step += n_step
        out = {"image": image, "depth": depth, "weights_sum": weights_sum}
        if normal_image is not None:
            out["normal_image"] = normal_image * 2 - weights_sum[:, None]  # back to [-1,1]-weighted
        return out

    def render(
        self,
        rays_o: torch.Tensor,
        rays_d: torch.Tensor,
        *,
        light_d: torch.Tensor | None = None,
        ambient_ratio: float = 1.0,
        shading: str = "albedo",
        bg_color: torch.Tensor | None = None,
        perturb: bool = False,
        need_normal: bool = False,
        max_ray_batch: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Render rays [B,N,3]; returns ``image`` [B,N,C], ``depth``/``weights_sum`` [B,N],
        ``normal_image`` [B,N,3] when normals were computed, ``weights`` (per sample) and
        ``loss_orient`` in training.

        ``bg_color``: None uses the background network if there is one, else white; a tensor
        broadcastable to [B,N,3] is used as is. ``light_d``: [B,3] or [3].
        ``max_ray_batch`` renders in chunks (inference).
        """
        B, n = rays_o.shape[:2]
        device = rays_o.device
        ro, rd = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)
        light = expand_light(light_d, n, B, device)
        fn = self.run_cuda if self.cuda_ray else self.run
        kwargs = dict(ambient_ratio=ambient_ratio, shading=shading, perturb=perturb, need_normal=need_normal)
        # run_cuda's alive-ray loop bounds its own memory: chunking would only multiply its
        # iterations (each chunk restarts with one sample per ray), so only ``run`` is chunked.
        if max_ray_batch is None or ro.shape[0] <= max_ray_batch or self.training or self.cuda_ray:
            out = fn(ro, rd, light, **kwargs)
        else:
            parts = []
            for s in range(0, ro.shape[0], max_ray_batch):
                sl = slice(s, s + max_ray_batch)
                lsl = light if light is None or light.shape[0] == 1 else light[sl]
                parts.append(fn(ro[sl], rd[sl], lsl, **kwargs))
            out = {
                k: torch.cat([p[k] for p in parts]) for k in parts[0] if k not in ("weights", "loss_orient")
            }
        if bg_color is None:
            bg = self.background(rd) if getattr(self, "bg_net", None) is not None else torch.ones_like(ro)
        else:
            bg = torch.as_tensor(bg_color, device=device, dtype=torch.float32).expand(B, n, 3).reshape(-1, 3)
        img = out["image"]
        if img.shape[-1] == 3:
            img = img + (1 - out["weights_sum"][:, None]) * bg
        res = {
            "image": img.reshape(B, n, -1),
            "depth": out["depth"].reshape(B, n),
            "weights_sum": out["weights_sum"].reshape(B, n),
        }
        if "normal_image" in out:
            res["normal_image"] = out["normal_image"].reshape(B, n, 3)
        for k in ("weights", "loss_orient", "n_pruned", "n_padding", "complete"):
            if k in out:
                res[k] = out[k]
        return res

    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_extra_state(self, decay: float = 0.95, full: bool | None = None, chunk: int = 2**18) -> None:
        """Refresh the occupancy grid: ``grid = max(grid * decay, sigma(cell + jitter))``.

        The first 16 refreshes (and every refresh with ``--grid_update_frac 1``) evaluate every
        cell; later ones evaluate a random ``grid_update_frac`` of the cells plus as many drawn
        among the currently occupied cells (instant-ngp's scheme), so a refresh costs a
        fraction of a full sweep while occupied space is re-checked often.
        """
        if not self.cuda_ray:
            return
        G, C = self.grid_size, self.cascade
        G3 = G**3
        device = self.density_grid.device
        frac = float(self.cfg.grid_update_frac)
        if full is None:
            full = frac >= 1 or int(self.grid_updates) < 16
        thresh = min(float(self.mean_density), self.density_thresh)
        new = torch.full_like(self.density_grid, -1.0)
        for c in range(C):
            if full:
                idx = torch.arange(G3, device=device)
            else:
                n = max(1, int(G3 * frac))
                uniform = torch.randint(0, G3, (n,), device=device)
                occ = (self.density_grid[c] > thresh).nonzero().squeeze(1)
                if occ.numel() > 0:
                    occ = occ[torch.randint(0, occ.numel(), (n,), device=device)]
                idx = torch.cat([uniform, occ])
            coords = raymarching.morton3D_invert(idx)
            scale = min(2.0**c, self.bound)
            half_cell = scale / G
            for s in range(0, idx.numel(), chunk):
                cc = coords[s : s + chunk].float()
                xyz = (cc / (G - 1) * 2 - 1) * (scale - half_cell)
                xyz = xyz + (torch.rand_like(xyz) * 2 - 1) * half_cell
                sigma = self.density(xyz)["sigma"].reshape(-1).float()
                new[c].scatter_reduce_(0, idx[s : s + chunk], sigma, reduce="amax")
        valid = new >= 0
        self.density_grid[valid] = torch.maximum(self.density_grid[valid] * decay, new[valid])
        self.mean_density.fill_(float(self.density_grid.clamp(min=0).mean()))
        self.grid_updates += 1
        thresh = min(float(self.mean_density), self.density_thresh)
        self.density_bitfield.copy_(raymarching.packbits(self.density_grid, thresh))

    def occupancy(self) -> float:
        """Fraction of occupied cells (for logs)."""
        if not self.cuda_ray:
            return 1.0
        thresh = min(float(self.mean_density), self.density_thresh)
        return float((self.density_grid > thresh).float().mean())
