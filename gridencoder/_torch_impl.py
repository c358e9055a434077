"""Pure-PyTorch multi-resolution hash-grid encoding (instant-ngp style).

This defines the semantics that the CUDA kernel (``gridencoder/_cuda.py``) reproduces, and
``grid_encode`` here is the one typed, documented signature: ``gridencoder.grid_encode`` is it
wrapped by the CUDA-or-twin dispatch (``cuda_kernels.backend``), and ``_cuda.grid_encode``
takes the same arguments.

Level ``l`` has scale ``s_l = base_resolution * per_level_scale**l - 1`` and
``res_l = ceil(s_l) + 1``. With ``align_corners=False`` a point ``x`` in [0,1] sits at
``p = x * s_l + 0.5`` in grid units (``p = x * (res_l - 1)`` with ``align_corners=True``),
and the level has ``P_l = res_l + 1`` (``res_l``) lattice points per axis. A level whose
``P_l^D`` lattice points fit in its table is indexed densely (``x + y P + z P^2``), otherwise
through the hash ``(x * 1) xor (y * 2654435761) xor (z * 805459861)`` in uint32 arithmetic,
modulo the level's table size ``T_l = min(2^log2_hashmap_size, P_l^D)`` rounded up to a
multiple of 8. Interpolation weights are trilinear, or smoothstep ``f^2 (3 - 2f)`` of the
fraction ``f``. Levels at or above ``max_level`` output zeros (coarse-to-fine training).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)


def level_layout(
    input_dim: int,
    num_levels: int,
    per_level_scale: float,
    base_resolution: int,
    log2_hashmap_size: int,
    align_corners: bool = False,
) -> tuple[list[int], list[int]]:
    """Table offsets [L+1] and lattice points per axis [L] of every level.

    >>> level_layout(3, 2, 2.0, 4, 19)
    ([0, 128, 864], [5, 9])
    """
    offsets, points, total = [0], [], 0
    max_params = 2**log2_hashmap_size
    for level in range(num_levels):
        scale = base_resolution * per_level_scale**level - 1
        res = math.ceil(scale) + 1
        P = res if align_corners else res + 1
        size = min(max_params, P**input_dim)
        size = int(math.ceil(size / 8) * 8)
        total += size
        offsets.append(total)
        points.append(P)
    return offsets, points


def grid_encode(
    inputs: Tensor,
    embeddings: Tensor,
    offsets: list[int],
    points: list[int],
    per_level_scale: float,
    base_resolution: int,
    align_corners: bool = False,
    interpolation: str = "linear",
    max_level: int | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    live: tuple[Tensor, int] | None = None,
    agg_mode: int = 1,
    soa: bool = True,
) -> Tensor:
    """Encode points with a multi-resolution grid (this module's docstring: the layout).

    Args:
        inputs: [N,D] coordinates in [0,1], float32 (float64 for gradcheck; float16/bfloat16
            are computed in float32).
        embeddings: [T,F] all levels' tables, level ``l`` at rows ``offsets[l]:offsets[l+1]``
            (float32, float16 or bfloat16; float64 with float64 inputs).
        offsets, points: [L+1] and [L] from ``level_layout``.
        per_level_scale, base_resolution: the levels' scales (see this module's docstring).
        align_corners: lattice points on the box's corners.
        interpolation: "linear" or "smoothstep".
        max_level: levels >= max_level give zeros (None: all levels).
        out_dtype: CUDA only (the twin ignores it): the features' dtype: the table's (None), or float16/bfloat16 for
            a float32 table (what autocast would cast them to: interpolated in float32, rounded
            once, and their gradient read in that dtype; saves the cast and its memory).
        live: CUDA only (the twin ignores it: it computes every row): (count [1] int32 on the
            GPU, period): only rows n with n % period < count are computed; the others give zero
            features and pass no gradient (padding rows of a fixed-size CUDA graph replay).
            None: every row.
        agg_mode: CUDA only (the twin ignores it): 1 (the default): a warp first sums the embedding-gradient atomics
            of consecutive lanes on the same table row (samples of one ray share cells at
            coarse levels); 0: every atomic is issued. The same gradients up to rounding;
            ``scripts/bench_render.py --kernel_variants`` times both.
        soa: CUDA only (the twin ignores it): True (the default): features computed as [L*F, N] (a warp's stores
            coalesce) and returned as the transposed [N, L*F] view (the Linear layers after it
            take the transposed layout as is); False: computed as [N, L*F].

    Returns:
        [N, L*F] features, level-major (level 0's F features first), in the embeddings' dtype
        (or ``out_dtype``); differentiable with respect to both ``embeddings`` and ``inputs``.

    >>> off, pts = level_layout(3, 2, 2.0, 4, 19, align_corners=True)
    >>> emb = torch.arange(off[-1], dtype=torch.float32)[:, None]
    >>> grid_encode(torch.zeros(1, 3), emb, off, pts, 2.0, 4, align_corners=True).tolist()
    [[0.0, 64.0]]
    """
    N, D = inputs.shape
    L = len(points)
    F_ = embeddings.shape[1]
    dev = inputs.device
    levels = torch.arange(L, device=dev, dtype=torch.float32)
    scale = base_resolution * torch.pow(torch.tensor(per_level_scale, device=dev), levels) - 1  # [L]
    # float32 positions, or float64 when given float64 inputs (for gradcheck).
    cdt = torch.float64 if inputs.dtype == torch.float64 else torch.float32
    if align_corners:
        pos = inputs.to(cdt)[:, None, :] * torch.ceil(scale).to(cdt)[None, :, None]
    else:
        pos = inputs.to(cdt)[:, None, :] * scale.to(cdt)[None, :, None] + 0.5
    grid = torch.floor(pos)
    frac = pos - grid  # [N,L,D], carries the input gradient
    if interpolation == "smoothstep":
        frac = frac * frac * (3 - 2 * frac)
    elif interpolation != "linear":
        raise ValueError(f"unknown interpolation {interpolation!r}")
    grid = grid.long()

    P = torch.tensor(points, device=dev, dtype=torch.int64)  # [L]
    size_list = [offsets[i + 1] - offsets[i] for i in range(L)]
    sizes = torch.tensor(size_list, device=dev, dtype=torch.int64)
    base = torch.tensor(offsets[:-1], device=dev, dtype=torch.int64)
    dense = P**D <= sizes  # [L]
    strides = P[:, None] ** torch.arange(D, device=dev)[None, :]  # [L,D]

    # Per axis and corner bit b: the clamped lattice coordinate's dense-index term, its hash
    # term and the interpolation factor ([N,L] each); a corner combines one of each per axis.
    # (The same values as clamping and hashing all D coordinates per corner, at a fraction of
    # the work: this function is what CPU runs spend most of their time in.) Hashed tables have
    # 2^k rows (at least 8), so the modulo is a mask that commutes with the xor: the hash terms
    # are masked up front and all index arithmetic fits int32 (rows < 2^31 overall).
    hashed_sizes = [n for n, p in zip(size_list, points) if p**D > n]
    narrow = all(n & (n - 1) == 0 for n in hashed_sizes) and offsets[-1] < 2**31
    itype = torch.int32 if narrow else torch.int64
    # ... but the gather's backward (index_add) is several times slower with int32 indices.
    wide_gather = torch.is_grad_enabled() and embeddings.requires_grad
    mask = torch.where(dense, sizes.new_full((), 0xFFFFFFFF), sizes - 1) if narrow else 0xFFFFFFFF
    terms = []
    for d in range(D):
        g = grid[..., d]
        cs = (torch.minimum(g, P[None] - 1), torch.minimum(g + 1, P[None] - 1))
        f = frac[..., d]
        terms.append(
            [
                ((c * strides[None, :, d]).to(itype), ((c * PRIMES[d]) & mask).to(itype), w)
                for c, w in zip(cs, (1 - f, f))
            ]
        )
    out = torch.zeros(N, L, F_, device=dev, dtype=embeddings.dtype)
    for corner in range(2**D):
        dense_idx, h, w = terms[0][corner & 1]
        for d in range(1, D):  # weight ((w0 * w1) * w2): the CUDA kernel's order
            t_d, h_d, w_d = terms[d][(corner >> d) & 1]
            dense_idx, h, w = dense_idx + t_d, h ^ h_d, w * w_d
        if narrow:
            idx = torch.where(dense[None], dense_idx, h) + base.to(itype)[None]
            if wide_gather:
                idx = idx.long()
        else:
            idx = torch.where(dense[None], dense_idx, h) % sizes[None] + base[None]
        # index_select: its backward (index_add) is deterministic on multi-threaded CPUs,
        # unlike advanced indexing's accumulate-put.
        feats = embeddings.index_select(0, idx.reshape(-1)).reshape(N, L, F_)
        out = out + w[..., None].to(embeddings.dtype) * feats
    if max_level is not None and max_level < L:
        keep = (torch.arange(L, device=dev) < max_level).to(out.dtype)
        out = out * keep[None, :, None]
    return out.reshape(N, L * F_)
