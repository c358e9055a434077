"""Occupancy-grid ray marching: leaf functions on tensors.

Each function here is its pure-PyTorch twin (``_torch_impl``, which defines the semantics and
carries the one typed, documented signature) wrapped by a dispatch: it runs the CUDA kernel
(``raymarching/_cuda.py``, which takes the same arguments) when its tensors live on a GPU, the
extension builds and the kernel takes the inputs, and the twin otherwise. Set
``DREAMFUSION_RAYMARCHING=torch`` to force the twin everywhere.

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

from cuda_kernels.backend import CudaBackend

from . import _torch_impl

_backend = CudaBackend("raymarching", "DREAMFUSION_RAYMARCHING")


def cuda_backend() -> ModuleType | None:
    """The CUDA backend module, built on first use, or None when it cannot be used."""
    return _backend.get()


def set_backend(name: str) -> None:
    """Use "torch" (the PyTorch twin everywhere) or "auto" (CUDA for GPU tensors when it builds)."""
    _backend.set(name)


# The public functions: the twins, dispatched on the tensor named by ``on`` (its device).
near_far_from_aabb = _backend.dispatch(_torch_impl.near_far_from_aabb, on="rays_o")
morton3D = _backend.dispatch(_torch_impl.morton3D, on="coords")  # noqa: N816 - the reference's name
morton3D_invert = _backend.dispatch(_torch_impl.morton3D_invert, on="indices")  # noqa: N816
packbits = _backend.dispatch(_torch_impl.packbits, on="grid")
march_rays_train = _backend.dispatch(_torch_impl.march_rays_train, on="rays_o")
march_rays_train_fixed = _backend.dispatch(_torch_impl.march_rays_train_fixed, on="rays_o")
composite_rays_train = _backend.dispatch(_torch_impl.composite_rays_train, on="sigmas")
prune_rays_train = _backend.dispatch(_torch_impl.prune_rays_train, on="sigmas")
prune_rays_train_fixed = _backend.dispatch(_torch_impl.prune_rays_train_fixed, on="sigmas")
march_rays = _backend.dispatch(_torch_impl.march_rays, on="rays_o")
composite_rays = _backend.dispatch(_torch_impl.composite_rays, on="sigmas")

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
