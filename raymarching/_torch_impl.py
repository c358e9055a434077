"""Pure-PyTorch twin of the CUDA ray marcher: what ``raymarching``'s functions run on CPU.

These functions define the semantics (the grid layout and the sample lattice are described in
``raymarching``'s docstring, each function's arguments and results at its public twin
``raymarching.<name>``); the CUDA kernels must return the same values
(``tests/test_raymarching.py`` and ``tests/test_cuda_kernels.py`` compare them).
"""

from __future__ import annotations

import math

import torch

SQRT3 = math.sqrt(3.0)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def near_far_from_aabb(rays_o, rays_d, aabb, min_near=0.2):
    """See ``raymarching.near_far_from_aabb``."""
    inv = 1.0 / torch.where(rays_d.abs() < 1e-15, torch.full_like(rays_d, 1e-15), rays_d)
    t1 = (aabb[:3] - rays_o) * inv
    t2 = (aabb[3:] - rays_o) * inv
    near = torch.minimum(t1, t2).amax(-1)
    far = torch.maximum(t1, t2).amin(-1)
    miss = far < near
    near = torch.clamp(near, min=min_near)
    miss = miss | (far < near)
    big = torch.full_like(near, 1e10)
    return torch.where(miss, big, near), torch.where(miss, big, far)


def _split_by_3(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.int64) & 0x3FF
    x = (x | (x << 16)) & 0x030000FF
    x = (x | (x << 8)) & 0x0300F00F
    x = (x | (x << 4)) & 0x030C30C3
    x = (x | (x << 2)) & 0x09249249
    return x


def _compact_by_3(x: torch.Tensor) -> torch.Tensor:
    x = x & 0x09249249
    x = (x | (x >> 2)) & 0x030C30C3
    x = (x | (x >> 4)) & 0x0300F00F
    x = (x | (x >> 8)) & 0x030000FF
    x = (x | (x >> 16)) & 0x3FF
    return x


def morton3D(coords):
    """See ``raymarching.morton3D``."""
    return _split_by_3(coords[:, 0]) | (_split_by_3(coords[:, 1]) << 1) | (_split_by_3(coords[:, 2]) << 2)


def morton3D_invert(indices):
    """See ``raymarching.morton3D_invert``."""
    i = indices.to(torch.int64)
    return torch.stack([_compact_by_3(i), _compact_by_3(i >> 1), _compact_by_3(i >> 2)], -1)


def packbits(grid, thresh):
    """See ``raymarching.packbits``."""
    bits = (grid.reshape(-1, 8) > thresh).to(torch.int32)
    weights = 2 ** torch.arange(8, device=grid.device, dtype=torch.int32)
    return (bits * weights).sum(-1).to(torch.uint8)


def _cell_index(xyz: torch.Tensor, bound: float, C: int, G: int) -> torch.Tensor:
    """[...,3] positions to flat grid indices (cascade * G^3 + morton)."""
    mx = xyz.abs().amax(-1).clamp(min=1e-12)
    # Smallest cascade whose box contains the point: 2^m >= max|x|.
    mip = torch.ceil(torch.log2(mx)).clamp(min=0, max=C - 1)
    scale = torch.clamp(torch.exp2(mip), max=bound)
    nx = ((xyz / scale[..., None] + 1) * 0.5 * G).floor().clamp(0, G - 1).to(torch.int64)
    m = morton3D(nx.reshape(-1, 3)).reshape(nx.shape[:-1])
    return mip.to(torch.int64) * G**3 + m


def _occupied(xyz: torch.Tensor, bitfield: torch.Tensor, bound: float, C: int, G: int) -> torch.Tensor:
    idx = _cell_index(xyz, bound, C, G)
    byte = bitfield[idx // 8].to(torch.int32)
    return ((byte >> (idx % 8).to(torch.int32)) & 1).bool()


def _step_params(bound: float, C: int, G: int, max_steps: int) -> tuple[float, float]:
    dt_min = 2 * SQRT3 / max_steps
    dt_max = 2 * SQRT3 * min(2 ** (C - 1), bound) / G
    return dt_min, dt_max


def _lattice(t0: torch.Tensor, n: int, dt_gamma: float, dt_min: float, dt_max: float):
    """[R] start points to [R,n] lattice points and their step sizes."""
    if dt_gamma == 0:
        k = torch.arange(n, device=t0.device, dtype=t0.dtype)
        ts = t0[:, None] + k * dt_min
        return ts, torch.full_like(ts, dt_min)
    ts, dts = [], []
    t = t0
    for _ in range(n):
        dt = torch.clamp(t * dt_gamma, dt_min, dt_max)
        ts.append(t)
        dts.append(dt)
        t = t + dt
    return torch.stack(ts, 1), torch.stack(dts, 1)


def march_rays_train(
    rays_o, rays_d, bound, density_bitfield, C, G, nears, fars, perturb, dt_gamma, max_steps, noise
):
    """See ``raymarching.march_rays_train``."""
    N = rays_o.shape[0]
    dt_min, dt_max = _step_params(bound, C, G, max_steps)
    if perturb:
        if noise is None:
            noise = torch.rand(N, device=rays_o.device)
        t0 = nears + noise * torch.clamp(nears * dt_gamma, dt_min, dt_max)
    else:
        t0 = nears.clone()
    ts, dts = _lattice(t0, max_steps, dt_gamma, dt_min, dt_max)  # [N, S]
    xyz = rays_o[:, None] + ts[..., None] * rays_d[:, None]
    xyz = torch.clamp(xyz, -bound, bound)
    keep = (ts < fars[:, None]) & _occupied(xyz, density_bitfield, bound, C, G)
    counts = keep.sum(1)
    offsets = torch.cumsum(counts, 0) - counts
    ray_ids = torch.arange(N, device=rays_o.device)[:, None].expand_as(keep)[keep]
    rays = torch.stack([offsets, counts], -1).to(torch.int32)
    return xyz[keep], rays_d[ray_ids], torch.stack([ts[keep], dts[keep]], -1), rays


def _ray_ids(rays: torch.Tensor, M: int) -> torch.Tensor:
    """[M] index of the ray that owns each packed sample (samples not owned: -1).

    Rays may be packed in any order (the CUDA marcher reserves slices atomically). No host
    synchronisation: the non-empty rays sorted by offset, then a binary search per sample.

    >>> _ray_ids(torch.tensor([[3, 2], [0, 0], [0, 2]]), 6).tolist()
    [2, 2, -1, 0, 0, -1]
    """
    starts, counts = rays[:, 0].long(), rays[:, 1].long()
    keys = torch.where(counts > 0, starts, torch.full_like(starts, -1))  # empty rays own nothing
    sorted_keys, order = torch.sort(keys)
    pos = torch.arange(M, device=rays.device)
    k = torch.searchsorted(sorted_keys, pos, right=True) - 1  # last ray starting at or before
    r = order.index_select(0, k.clamp(min=0))
    owned = (k >= 0) & (pos >= starts.index_select(0, r)) & (pos < (starts + counts).index_select(0, r))
    return torch.where(owned, r, torch.full_like(r, -1))


def _exclusive_depth(tau: torch.Tensor, rays: torch.Tensor, ids_c: torch.Tensor) -> torch.Tensor:
    """[M] float64 optical depth accumulated before each packed sample within its own ray.

    A global cumsum minus its value at the ray's first sample (float64 keeps the subtraction
    exact over long packed arrays). tau: [M]; rays: [N,2] (offset, count); ids_c: [M] owner
    ray of each sample, clamped to >= 0.
    """
    csum = torch.cumsum(tau.double(), 0) - tau.double()
    if tau.shape[0] == 0:
        return csum
    start = rays[:, 0].long().clamp(max=tau.shape[0] - 1)
    return csum - csum.index_select(0, start).index_select(0, ids_c)


def composite_rays_train(sigmas, rgbs, ts, rays, T_thresh=1e-4):
    """See ``raymarching.composite_rays_train``."""
    M, N = sigmas.shape[0], rays.shape[0]
    ids = _ray_ids(rays, M)
    owned = ids >= 0
    ids_c = ids.clamp(min=0)
    # float32 arithmetic, or float64 when given float64 (for gradcheck).
    cdt = torch.float64 if sigmas.dtype == torch.float64 else torch.float32
    tau = sigmas.to(cdt) * ts[:, 1].to(cdt)
    excl = _exclusive_depth(tau, rays, ids_c)
    T = torch.exp(-excl.to(cdt))
    alpha = 1 - torch.exp(-tau)
    weights = alpha * T * ((T >= T_thresh) & owned).to(cdt)
    weights_sum = torch.zeros(N, device=sigmas.device, dtype=cdt).index_add(0, ids_c, weights)
    depth = torch.zeros(N, device=sigmas.device, dtype=cdt).index_add(0, ids_c, weights * ts[:, 0].to(cdt))
    image = torch.zeros(N, rgbs.shape[-1], device=sigmas.device, dtype=cdt).index_add(
        0, ids_c, weights[:, None] * rgbs.to(cdt)
    )
    return weights, weights_sum, depth, image


def prune_rays_train(sigmas, ts, rays, T_min):
    """See ``raymarching.prune_rays_train``."""
    M, N = sigmas.shape[0], rays.shape[0]
    device = sigmas.device
    if M == 0:
        return torch.zeros(0, dtype=torch.int64, device=device), rays.to(torch.int32)
    ids = _ray_ids(rays, M)
    ids_c = ids.clamp(min=0)
    excl = _exclusive_depth(sigmas.double() * ts[:, 1].double(), rays, ids_c)
    start = rays[:, 0].long().clamp(max=M - 1)
    keep_mask = (excl <= -math.log(T_min)) & (ids >= 0)
    keep = keep_mask.nonzero().squeeze(1)
    before = torch.cumsum(keep_mask.long(), 0) - keep_mask.long()  # kept samples before each one
    counts = torch.zeros(N, dtype=torch.int64, device=device).index_add(0, ids_c, keep_mask.long())
    offsets = torch.where(counts > 0, before.index_select(0, start), torch.zeros_like(counts))
    return keep, torch.stack([offsets, counts], 1).to(torch.int32)


def _clip_rays(rays: torch.Tensor, capacity: int) -> torch.Tensor:
    """[N,2] (offset, count) with each ray's slice cut at row ``capacity`` (count 0, offset 0
    for rays wholly past it)."""
    off, cnt = rays[:, 0].long(), rays[:, 1].long()
    cnt = torch.minimum(cnt, (capacity - off).clamp(min=0))
    return torch.stack([torch.where(cnt > 0, off, torch.zeros_like(off)), cnt], 1).to(torch.int32)


def _fit_rows(t: torch.Tensor, capacity: int) -> torch.Tensor:
    """The first ``capacity`` rows of ``t``, zero-padded to exactly ``capacity``."""
    t = t[:capacity]
    pad = torch.zeros((capacity - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad])


def march_rays_train_fixed(
    rays_o, rays_d, bound, density_bitfield, C, G, nears, fars, noise, dt_gamma, max_steps, capacity
):
    """See ``raymarching.march_rays_train_fixed`` (this twin packs the rays in ray order)."""
    perturb = noise is not None
    xyzs, dirs, ts, rays = march_rays_train(
        rays_o, rays_d, bound, density_bitfield, C, G, nears, fars, perturb, dt_gamma, max_steps, noise
    )
    total = torch.full((1,), xyzs.shape[0], dtype=torch.int32, device=rays_o.device)
    return (*(_fit_rows(t, capacity) for t in (xyzs, dirs, ts)), _clip_rays(rays, capacity), total)


def prune_rays_train_fixed(sigmas, ts, rays, T_min, capacity):
    """See ``raymarching.prune_rays_train_fixed``."""
    keep, new_rays = prune_rays_train(sigmas, ts, rays, T_min)
    total = torch.full((1,), keep.numel(), dtype=torch.int32, device=sigmas.device)
    return _fit_rows(keep, capacity), _clip_rays(new_rays, capacity), total


def march_rays(
    n_alive,
    n_step,
    rays_alive,
    rays_t,
    rays_o,
    rays_d,
    bound,
    density_bitfield,
    C,
    G,
    nears,
    fars,
    dt_gamma,
    max_steps,
):
    """See ``raymarching.march_rays``."""
    dt_min, dt_max = _step_params(bound, C, G, max_steps)
    idx = rays_alive.long()
    o, d, far = rays_o[idx], rays_d[idx], fars[idx]
    t = rays_t[idx].clone()
    out_t = torch.zeros(n_alive, n_step, device=o.device)
    out_dt = torch.zeros(n_alive, n_step, device=o.device)
    count = torch.zeros(n_alive, dtype=torch.int64, device=o.device)
    window = max(2 * n_step, 16)
    active = t < far
    while bool(active.any()):
        a = active.nonzero().squeeze(1)
        cand_t, cand_dt = _lattice(t[a], window, dt_gamma, dt_min, dt_max)
        inside = cand_t < far[a, None]
        xyz = torch.clamp(o[a, None] + cand_t[..., None] * d[a, None], -bound, bound)
        occ = _occupied(xyz, density_bitfield, bound, C, G) & inside
        rank = torch.cumsum(occ.long(), 1) - 1 + count[a, None]
        keep = occ & (rank < n_step)
        rows = a[:, None].expand_as(keep)[keep]
        out_t[rows, rank[keep]] = cand_t[keep]
        out_dt[rows, rank[keep]] = cand_dt[keep]
        count[a] += keep.sum(1)
        # Continue after the last kept sample when full, else after the whole window.
        full = count[a] >= n_step
        last = torch.where(keep, torch.arange(window, device=o.device), -1).amax(1)
        nxt = torch.where(full, last + 1, torch.full_like(last, window))
        next_t = cand_t[:, -1] + cand_dt[:, -1]
        within = nxt < window
        gather = cand_t.gather(1, nxt.clamp(max=window - 1)[:, None]).squeeze(1)
        t[a] = torch.where(within, gather, next_t)
        active = (count < n_step) & (t < far)
    rays_t[idx] = t
    ts = torch.stack([out_t, out_dt], -1).reshape(-1, 2)
    xyzs = (o[:, None] + out_t[..., None] * d[:, None]).reshape(-1, 3)
    xyzs = torch.where(ts[:, 1:] > 0, torch.clamp(xyzs, -bound, bound), torch.zeros_like(xyzs))
    dirs = d[:, None].expand(n_alive, n_step, 3).reshape(-1, 3)
    return xyzs, dirs, ts


def composite_rays(
    n_alive, n_step, rays_alive, rays_t, sigmas, rgbs, ts, weights_sum, depth, image, fars, T_thresh
):
    """See ``raymarching.composite_rays``."""
    idx = rays_alive.long()
    sig = sigmas.float().reshape(n_alive, n_step)
    dt = ts[:, 1].reshape(n_alive, n_step)
    tt = ts[:, 0].reshape(n_alive, n_step)
    col = rgbs.float().reshape(n_alive, n_step, -1)
    tau = sig * dt
    T0 = (1 - weights_sum[idx]).clamp(min=0)
    T = T0[:, None] * torch.exp(-(torch.cumsum(tau, 1) - tau))
    alpha = 1 - torch.exp(-tau)
    w = alpha * T * ((T >= T_thresh) & (dt > 0)).float()
    weights_sum[idx] += w.sum(1)
    depth[idx] += (w * tt).sum(1)
    image[idx] += (w[..., None] * col).sum(1)
    T_end = T0 * torch.exp(-tau.sum(1))
    dead = (T_end < T_thresh) | (rays_t[idx] >= fars[idx])
    rays_alive[dead] = -1
