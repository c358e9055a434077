"""Occupancy-grid ray marching: leaf functions on tensors.

Each function runs the CUDA kernel when its tensors live on a GPU and the extension
builds (``raymarching/_cuda.py``), and the pure-PyTorch twin (``_torch_impl``) otherwise.
Both have the same signatures and semantics; see ``_torch_impl`` for the definitions.
Set ``DREAMFUSION_RAYMARCHING=torch`` to force the twin everywhere.
"""

from __future__ import annotations

from types import ModuleType

import torch

from cuda_kernels.backend import CudaBackend

from . import _torch_impl

_backend = CudaBackend("raymarching", "DREAMFUSION_RAYMARCHING")


def cuda_backend() -> ModuleType | None:
    """The CUDA backend module, built on first use, or None when it cannot be used."""
    return _backend.get()


def set_backend(name: str) -> None:
    """Use "torch" (the PyTorch twin everywhere) or "auto" (CUDA for GPU tensors when it builds)."""
    _backend.set(name)


def _impl(t: torch.Tensor) -> ModuleType:
    if t.is_cuda:
        mod = cuda_backend()
        if mod is not None:
            return mod
    return _torch_impl


def near_far_from_aabb(rays_o, rays_d, aabb, min_near=0.2):
    return _impl(rays_o).near_far_from_aabb(rays_o, rays_d, aabb, min_near)


def morton3D(coords):
    return _impl(coords).morton3D(coords)


def morton3D_invert(indices):
    return _impl(indices).morton3D_invert(indices)


def packbits(grid, thresh):
    return _impl(grid).packbits(grid, thresh)


def march_rays_train(
    rays_o,
    rays_d,
    bound,
    density_bitfield,
    C,
    G,
    nears,
    fars,
    perturb=False,
    dt_gamma=0.0,
    max_steps=1024,
    noise=None,
):
    return _impl(rays_o).march_rays_train(
        rays_o, rays_d, bound, density_bitfield, C, G, nears, fars, perturb, dt_gamma, max_steps, noise
    )


def march_rays_train_fixed(
    rays_o, rays_d, bound, density_bitfield, C, G, nears, fars, noise, dt_gamma, max_steps, capacity
):
    return _impl(rays_o).march_rays_train_fixed(
        rays_o, rays_d, bound, density_bitfield, C, G, nears, fars, noise, dt_gamma, max_steps, capacity
    )


def prune_rays_train_fixed(sigmas, ts, rays, T_min, capacity):
    return _impl(sigmas).prune_rays_train_fixed(sigmas, ts, rays, T_min, capacity)


def composite_rays_train(sigmas, rgbs, ts, rays, T_thresh=1e-4):
    return _impl(sigmas).composite_rays_train(sigmas, rgbs, ts, rays, T_thresh)


def prune_rays_train(sigmas, ts, rays, T_min):
    return _impl(sigmas).prune_rays_train(sigmas, ts, rays, T_min)


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
    dt_gamma=0.0,
    max_steps=1024,
):
    return _impl(rays_o).march_rays(
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


def composite_rays(
    n_alive, n_step, rays_alive, rays_t, sigmas, rgbs, ts, weights_sum, depth, image, fars, T_thresh=1e-2
):
    return _impl(sigmas).composite_rays(
        n_alive, n_step, rays_alive, rays_t, sigmas, rgbs, ts, weights_sum, depth, image, fars, T_thresh
    )


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
