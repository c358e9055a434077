"""Pure-PyTorch twin of the CUDA ray marcher: what ``raymarching``'s functions run on CPU, and
the one typed, documented signature of each of them.

These functions define the semantics (the grid layout and the sample lattice are described in
``raymarching``'s docstring); the CUDA kernels must return the same values
(``tests/test_raymarching.py`` and ``tests/test_cuda_kernels.py`` compare them).
``raymarching.<name>`` is the function of that name here, wrapped by the CUDA-or-twin dispatch
(``cuda_kernels.backend``), and ``raymarching._cuda.<name>`` takes the same arguments. Arguments
marked "CUDA only" choose between kernels; the twin ignores them.

Shapes: N rays, M packed samples; C cascades of G^3 cells.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SQRT3 = math.sqrt(3.0)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def near_far_from_aabb(
    rays_o: Tensor, rays_d: Tensor, aabb: Tensor, min_near: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Entry/exit distances of rays through an axis-aligned box.

    Args:
        rays_o, rays_d: [N,3] float32 origins and directions.
        aabb: [6] (xmin, ymin, zmin, xmax, ymax, zmax).
        min_near: nears are clamped to at least this.

    Returns:
        nears, fars: [N] float32; rays that miss the box get ``near = far = 1e10``.

    >>> o = torch.tensor([[0.0, 0.0, 3.0]]); d = torch.tensor([[0.0, 0.0, -1.0]])
    >>> near_far_from_aabb(o, d, torch.tensor([-1.0, -1, -1, 1, 1, 1]))
    (tensor([2.]), tensor([4.]))
    """
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


def morton3D(coords: Tensor) -> Tensor:  # noqa: N802 - the reference's name
    """[N,3] integer cell coordinates (each < 1024) to [N] int64 Morton indices.

    >>> morton3D(torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]))
    tensor([1, 2, 4, 7])
    """
    return _split_by_3(coords[:, 0]) | (_split_by_3(coords[:, 1]) << 1) | (_split_by_3(coords[:, 2]) << 2)


def morton3D_invert(indices: Tensor) -> Tensor:  # noqa: N802 - the reference's name
    """[N] integer Morton indices to [N,3] int64 coordinates (inverse of ``morton3D``).

    >>> morton3D_invert(torch.tensor([1, 2, 4, 7])).tolist()
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]
    """
    i = indices.to(torch.int64)
    return torch.stack([_compact_by_3(i), _compact_by_3(i >> 1), _compact_by_3(i >> 2)], -1)


def packbits(grid: Tensor, thresh: float) -> Tensor:
    """Occupancy bits of a density grid.

    Args:
        grid: [C, G^3] (or flat [C*G^3]) float32 densities in Morton order.
        thresh: a cell is occupied when its density is above this.

    Returns:
        [C*G^3/8] uint8; bit ``b`` of byte ``k`` is cell ``8k+b``.

    >>> packbits(torch.tensor([0.0, 2, 0, 0, 0, 0, 0, 3]), 1.0)
    tensor([130], dtype=torch.uint8)
    """
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
    rays_o: Tensor,
    rays_d: Tensor,
    bound: float,
    density_bitfield: Tensor,
    C: int,
    G: int,
    nears: Tensor,
    fars: Tensor,
    perturb: bool = False,
    dt_gamma: float = 0.0,
    max_steps: int = 1024,
    noise: Tensor | None = None,
    warp: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Packed samples in occupied cells along each ray (training).

    Args:
        rays_o, rays_d: [N,3] float32 origins and directions.
        bound: the scene box is [-bound, bound]^3.
        density_bitfield: [C*G^3/8] uint8 from ``packbits``.
        C, G: cascades and cells per axis of the grid.
        nears, fars: [N] float32 from ``near_far_from_aabb``.
        perturb: jitter each ray's first sample by ``noise`` (drawn if None) times its step.
        dt_gamma: step growth with distance (0: a fixed step).
        max_steps: lattice points visited per ray at most.
        noise: [N] float32 in [0,1), the jitter to use (for reproducible comparisons).
        warp: CUDA only (the twin ignores it), with ``dt_gamma`` 0: a warp per ray testing 32
            lattice points at a time (True, the default) or a thread walking each ray with
            empty-space skips (False). The same samples; ``scripts/bench_render.py --ab_march``
            times both.

    Returns:
        xyzs, dirs: [M,3] float32; ts: [M,2] float32 (t, dt); rays: [N,2] int32 (offset,
        count), each ray's samples contiguous and ordered front to back (the rays' order in the
        packed arrays is arbitrary on CUDA: rays reserve slices atomically).

    >>> o = torch.tensor([[0.0, 0, 3]]); d = torch.tensor([[0.0, 0, -1]])
    >>> bits = packbits(torch.ones(8**3), 0.5)
    >>> n, f = near_far_from_aabb(o, d, torch.tensor([-1.0, -1, -1, 1, 1, 1]))
    >>> xyzs, dirs, ts, rays = march_rays_train(o, d, 1.0, bits, 1, 8, n, f, max_steps=8)
    >>> rays.tolist(), [round(v, 3) for v in ts[:, 0].tolist()][:3]
    ([[0, 5]], [2.0, 2.433, 2.866])
    """
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


def composite_rays_train(
    sigmas: Tensor, rgbs: Tensor, ts: Tensor, rays: Tensor, T_thresh: float = 1e-4
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Front-to-back alpha compositing of packed samples (differentiable in sigmas and rgbs).

    ``alpha_i = 1 - exp(-sigma_i dt_i)``, ``T_i = prod_{j<i} (1 - alpha_j)``,
    ``w_i = alpha_i T_i``; a sample whose ``T_i < T_thresh`` is dropped (early termination).
    Computes in float32 (float64 when sigmas are float64, for gradcheck).

    Args:
        sigmas: [M] densities; rgbs: [M,C] colours (any channel count C);
        ts: [M,2] (t, dt); rays: [N,2] int (offset, count), packed in any order.
        T_thresh: transmittance below which samples are dropped.

    Returns:
        weights [M], weights_sum [N], depth [N] (``sum w t``), image [N,C].

    >>> w, ws, d, img = composite_rays_train(torch.tensor([1e9]), torch.ones(1, 3),
    ...     torch.tensor([[2.0, 0.1]]), torch.tensor([[0, 1]]))
    >>> ws.tolist(), d.tolist()
    ([1.0], [2.0])
    """
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


def prune_rays_train(sigmas: Tensor, ts: Tensor, rays: Tensor, T_min: float) -> tuple[Tensor, Tensor]:
    """Keep each ray's samples up to where its transmittance falls below ``T_min``.

    Transmittance only decreases along a ray, so the kept samples are a prefix of each ray and
    the packed layout survives: ``keep`` indexes the kept samples in order and ``new_rays``
    gives each ray's (offset, count) among them. With ``T_min`` below the compositing
    threshold, ``composite_rays_train`` of the kept samples equals that of all samples (the
    dropped ones would get weight 0 and no gradient). On CUDA: three kernels and one host sync
    (the kept count) instead of the twin's ~50 tensor ops.

    Args:
        sigmas: [M] float32 densities (no gradient needed); ts: [M,2] float32 (t, dt);
        rays: [N,2] int (offset, count); T_min: the transmittance to stop at.

    Returns:
        keep [M'] int64 sample indices, new_rays [N,2] int32.

    >>> keep, r = prune_rays_train(torch.tensor([0.0, 1e4, 1.0, 1.0]),
    ...     torch.tensor([[0.0, 0.1]] * 4), torch.tensor([[0, 3], [3, 1]]), 1e-5)
    >>> keep.tolist(), r.tolist()
    ([0, 1, 3], [[0, 2], [2, 1]])
    """
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
    rays_o: Tensor,
    rays_d: Tensor,
    bound: float,
    density_bitfield: Tensor,
    C: int,
    G: int,
    nears: Tensor,
    fars: Tensor,
    noise: Tensor | None,
    dt_gamma: float,
    max_steps: int,
    capacity: int,
    warp: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``march_rays_train`` into exactly ``capacity`` rows, without a host sync: the shapes a
    CUDA graph needs.

    Rows past the samples are zeros that belong to no ray. When the samples need more rows,
    the rays whose slices cross the end keep only what fits (which rays: unspecified; the CUDA
    kernel packs rays in any order, this twin in ray order) and ``total`` tells.

    Args:
        rays_o, rays_d: [N,3] float32; nears, fars: [N] float32;
        bound, density_bitfield, C, G, dt_gamma, max_steps, warp (CUDA only):
            as for ``march_rays_train``.
        noise: [N] float32 jitter in [0,1) (``perturb``), or None for none.
        capacity: rows of the outputs.

    Returns:
        xyzs, dirs: [capacity,3] float32; ts: [capacity,2] float32; rays: [N,2] int32; total:
        [1] int32, the samples needed (more than ``capacity``: some were dropped).

    >>> o = torch.tensor([[0.0, 0, 3]]); d = torch.tensor([[0.0, 0, -1]])
    >>> n, f = near_far_from_aabb(o, d, torch.tensor([-1.0, -1, -1, 1, 1, 1]))
    >>> out = march_rays_train_fixed(o, d, 1.0, packbits(torch.ones(8**3), 0.5), 1, 8, n, f,
    ...     None, 0.0, 8, 3)
    >>> [t.shape[0] for t in out[:3]], out[3].tolist(), out[4].tolist()
    ([3, 3, 3], [[0, 3]], [5])
    """
    perturb = noise is not None
    xyzs, dirs, ts, rays = march_rays_train(
        rays_o, rays_d, bound, density_bitfield, C, G, nears, fars, perturb, dt_gamma, max_steps, noise
    )
    total = torch.full((1,), xyzs.shape[0], dtype=torch.int32, device=rays_o.device)
    return (*(_fit_rows(t, capacity) for t in (xyzs, dirs, ts)), _clip_rays(rays, capacity), total)


def prune_rays_train_fixed(
    sigmas: Tensor, ts: Tensor, rays: Tensor, T_min: float, capacity: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``prune_rays_train`` into exactly ``capacity`` kept indices, without a host sync (zeros
    past the kept ones: they belong to no ray); kept samples past the capacity are dropped,
    their rays' counts clipped.

    Args:
        sigmas, ts, rays, T_min: as for ``prune_rays_train`` ([M], [M,2], [N,2], a float).
        capacity: entries of ``keep``.

    Returns:
        keep [capacity] int64, new_rays [N,2] int32 and total [1] int32 (the samples kept
        before clipping to the capacity).

    >>> keep, r, total = prune_rays_train_fixed(torch.tensor([0.0, 1e4, 1.0, 1.0]),
    ...     torch.tensor([[0.0, 0.1]] * 4), torch.tensor([[0, 3], [3, 1]]), 1e-5, 2)
    >>> keep.tolist(), r.tolist(), total.tolist()
    ([0, 1], [[0, 2], [0, 0]], [3])
    """
    keep, new_rays = prune_rays_train(sigmas, ts, rays, T_min)
    total = torch.full((1,), keep.numel(), dtype=torch.int32, device=sigmas.device)
    return _fit_rows(keep, capacity), _clip_rays(new_rays, capacity), total


def march_rays(
    n_alive: int,
    n_step: int,
    rays_alive: Tensor,
    rays_t: Tensor,
    rays_o: Tensor,
    rays_d: Tensor,
    bound: float,
    density_bitfield: Tensor,
    C: int,
    G: int,
    nears: Tensor,
    fars: Tensor,
    dt_gamma: float = 0.0,
    max_steps: int = 1024,
) -> tuple[Tensor, Tensor, Tensor]:
    """The next ``n_step`` occupied samples of each alive ray (inference).

    ``rays_t`` holds each ray's next lattice point and is advanced in place past the last
    lattice point visited; unused sample slots have ``dt = 0``. Rays with ``rays_t >= far``
    are exhausted.

    Args:
        n_alive: rays still marching (``rays_alive``'s length); n_step: samples per ray.
        rays_alive: [n_alive] int32/int64 indices of the rays still marching (entries < 0
            are skipped).
        rays_t: [N] float32, updated in place; start it at ``nears``.
        rays_o, rays_d: [N,3] float32; nears, fars: [N] float32.
        bound, density_bitfield, C, G, dt_gamma, max_steps: as for ``march_rays_train``.

    Returns:
        xyzs, dirs: [n_alive*n_step, 3] float32; ts: [n_alive*n_step, 2] float32 (t, dt).

    >>> o = torch.tensor([[0.0, 0, 3]]); d = torch.tensor([[0.0, 0, -1]])
    >>> n, f = near_far_from_aabb(o, d, torch.tensor([-1.0, -1, -1, 1, 1, 1]))
    >>> rays_t = n.clone()
    >>> xyzs, dirs, ts = march_rays(1, 2, torch.tensor([0]), rays_t, o, d, 1.0,
    ...     packbits(torch.ones(8**3), 0.5), 1, 8, n, f, max_steps=8)
    >>> [round(v, 3) for v in ts[:, 0].tolist()], round(rays_t.item(), 3)
    ([2.0, 2.433], 2.866)
    """
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
    n_alive: int,
    n_step: int,
    rays_alive: Tensor,
    rays_t: Tensor,
    sigmas: Tensor,
    rgbs: Tensor,
    ts: Tensor,
    weights_sum: Tensor,
    depth: Tensor,
    image: Tensor,
    fars: Tensor,
    T_thresh: float = 1e-2,
) -> None:
    """Accumulate one ``march_rays`` batch into the frame, in place (inference).

    Rays whose transmittance falls below ``T_thresh``, or that are exhausted
    (``rays_t >= far``), are marked dead by setting ``rays_alive[i] = -1``.

    Args:
        n_alive, n_step: as for ``march_rays``.
        rays_alive: [n_alive] int32/int64, updated in place; rays_t: [N] float32.
        sigmas: [n_alive*n_step]; rgbs: [n_alive*n_step, C]; ts: [n_alive*n_step, 2].
        weights_sum, depth: [N] float32; image: [N,C] float32 (updated in place).
        fars: [N] float32.
        T_thresh: transmittance below which a ray is finished.
    """
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
