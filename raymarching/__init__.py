"""Occupancy-grid ray marching: leaf functions on tensors.

Each function here is the one typed, documented signature. It runs the CUDA kernel
(``raymarching/_cuda.py``) when its tensors live on a GPU, the extension builds and the kernel
takes the inputs, and the pure-PyTorch twin (``_torch_impl``, which defines the semantics)
otherwise. Set ``DREAMFUSION_RAYMARCHING=torch`` to force the twin everywhere.

Occupancy grid layout: ``C`` cascades of ``G^3`` cells, cascade ``m`` covering
``[-s, s]^3`` with ``s = min(2^m, bound)``; cells are stored in Morton (Z-order) so that
neighbouring cells share cache lines. The bitfield packs cell ``8k+b`` into bit ``b`` of
byte ``k``.

Sample positions along a ray lie on a lattice: ``t_0 = near + u * dt(near)`` (``u`` the
per-ray jitter in [0,1), 0 without perturbation) and ``t_{k+1} = t_k + dt(t_k)`` with
``dt(t) = clamp(t * dt_gamma, dt_min, dt_max)``, ``dt_min = 2*sqrt(3)/max_steps`` and
``dt_max = 2*sqrt(3)*s_max/G``. With ``dt_gamma = 0`` that is ``t_k = t_0 + k*dt_min``,
computed as such (no accumulation) so that all implementations agree. At most
``max_steps`` lattice points per ray are visited; a sample is emitted for a lattice point
before ``far`` whose cell is occupied.

Shapes: N rays, M packed samples; C cascades of G^3 cells.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from cuda_kernels.backend import CudaBackend

from . import _torch_impl

_backend = CudaBackend("raymarching", "DREAMFUSION_RAYMARCHING")


def cuda_backend() -> ModuleType | None:
    """The CUDA backend module, built on first use, or None when it cannot be used."""
    return _backend.get()


def set_backend(name: str) -> None:
    """Use "torch" (the PyTorch twin everywhere) or "auto" (CUDA for GPU tensors when it builds)."""
    _backend.set(name)


def _dispatch(name: str, t: torch.Tensor, args: tuple, **cuda_kwargs):
    """``_cuda.<name>(*args, **cuda_kwargs)`` when ``t`` is on a GPU, the kernels build and they
    take these inputs (the wrapper returns NotImplemented when not), else ``_torch_impl.<name>(*args)``."""
    if t.is_cuda:
        mod = cuda_backend()
        if mod is not None:
            out = getattr(mod, name)(*args, **cuda_kwargs)
            if out is not NotImplemented:
                return out
    return getattr(_torch_impl, name)(*args)


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
    return _dispatch("near_far_from_aabb", rays_o, (rays_o, rays_d, aabb, min_near))


def morton3D(coords: Tensor) -> Tensor:  # noqa: N802 - the reference's name
    """[N,3] integer cell coordinates (each < 1024) to [N] int64 Morton indices.

    >>> morton3D(torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]))
    tensor([1, 2, 4, 7])
    """
    return _dispatch("morton3D", coords, (coords,))


def morton3D_invert(indices: Tensor) -> Tensor:  # noqa: N802 - the reference's name
    """[N] integer Morton indices to [N,3] int64 coordinates (inverse of ``morton3D``).

    >>> morton3D_invert(torch.tensor([1, 2, 4, 7])).tolist()
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]
    """
    return _dispatch("morton3D_invert", indices, (indices,))


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
    return _dispatch("packbits", grid, (grid, thresh))


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
        warp: CUDA only, with ``dt_gamma`` 0: a warp per ray testing 32 lattice points at a
            time (True, the default) or a thread walking each ray with empty-space skips
            (False). The same samples; ``scripts/bench_render.py --ab_march`` times both.

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
    args = (rays_o, rays_d, bound, density_bitfield, C, G, nears, fars, perturb, dt_gamma, max_steps, noise)
    return _dispatch("march_rays_train", rays_o, args, warp=warp)


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
    kernel packs rays in any order, the twin in ray order) and ``total`` tells.

    Args:
        rays_o, rays_d, bound, density_bitfield, C, G, nears, fars, dt_gamma, max_steps, warp:
            as for ``march_rays_train``.
        noise: [N] float32 jitter in [0,1) (``perturb``), or None for none.
        capacity: rows of the outputs.

    Returns:
        xyzs, dirs: [capacity,3] float32; ts: [capacity,2] float32; rays: [N,2] int32; total:
        [1] int32, the samples needed (more than ``capacity``: some were dropped).
    """
    args = (rays_o, rays_d, bound, density_bitfield, C, G, nears, fars, noise, dt_gamma, max_steps, capacity)
    return _dispatch("march_rays_train_fixed", rays_o, args, warp=warp)


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

    Returns:
        weights [M], weights_sum [N], depth [N] (``sum w t``), image [N,C].

    >>> w, ws, d, img = composite_rays_train(torch.tensor([1e9]), torch.ones(1, 3),
    ...     torch.tensor([[2.0, 0.1]]), torch.tensor([[0, 1]]))
    >>> ws.tolist(), d.tolist()
    ([1.0], [2.0])
    """
    return _dispatch("composite_rays_train", sigmas, (sigmas, rgbs, ts, rays, T_thresh))


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
        rays: [N,2] int (offset, count).

    Returns:
        keep [M'] int64 sample indices, new_rays [N,2] int32.

    >>> keep, r = prune_rays_train(torch.tensor([0.0, 1e4, 1.0, 1.0]),
    ...     torch.tensor([[0.0, 0.1]] * 4), torch.tensor([[0, 3], [3, 1]]), 1e-5)
    >>> keep.tolist(), r.tolist()
    ([0, 1, 3], [[0, 2], [2, 1]])
    """
    return _dispatch("prune_rays_train", sigmas, (sigmas, ts, rays, T_min))


def prune_rays_train_fixed(
    sigmas: Tensor, ts: Tensor, rays: Tensor, T_min: float, capacity: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``prune_rays_train`` into exactly ``capacity`` kept indices, without a host sync (zeros
    past the kept ones: they belong to no ray); kept samples past the capacity are dropped,
    their rays' counts clipped.

    Returns:
        keep [capacity] int64, new_rays [N,2] int32 and total [1] int32 (the samples kept
        before clipping to the capacity).

    >>> keep, r, total = prune_rays_train_fixed(torch.tensor([0.0, 1e4, 1.0, 1.0]),
    ...     torch.tensor([[0.0, 0.1]] * 4), torch.tensor([[0, 3], [3, 1]]), 1e-5, 2)
    >>> keep.tolist(), r.tolist(), total.tolist()
    ([0, 1], [[0, 2], [0, 0]], [3])
    """
    return _dispatch("prune_rays_train_fixed", sigmas, (sigmas, ts, rays, T_min, capacity))


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
        rays_alive: [n_alive] int32/int64 indices of the rays still marching (entries < 0
            are skipped).
        rays_t: [N] float32, updated in place; start it at ``nears``.
        rays_o, rays_d: [N,3] float32; nears, fars: [N] float32.
        bound, density_bitfield, C, G, dt_gamma, max_steps: as for ``march_rays_train``.

    Returns:
        xyzs, dirs: [n_alive*n_step, 3] float32; ts: [n_alive*n_step, 2] float32 (t, dt).
    """
    args = (
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
    )
    return _dispatch("march_rays", rays_o, args)


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
        rays_alive: [n_alive] int32/int64, updated in place; rays_t: [N] float32.
        sigmas: [n_alive*n_step]; rgbs: [n_alive*n_step, C]; ts: [n_alive*n_step, 2].
        weights_sum, depth: [N] float32; image: [N,C] float32 (updated in place).
        fars: [N] float32.
    """
    args = (n_alive, n_step, rays_alive, rays_t, sigmas, rgbs, ts, weights_sum, depth, image, fars, T_thresh)
    return _dispatch("composite_rays", sigmas, args)


__all__ = [
    "near_far_from_aabb",
    "morton3D",
    "morton3D_invert",
    "packbits",
    "march_rays_train",
    "march_rays_train_fixed",
    "prune_rays_train_fixed",
    "composite_rays_train",
    "prune_rays_train",
    "march_rays",
    "composite_rays",
    "cuda_backend",
    "set_backend",
]
