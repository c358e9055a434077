"""CUDA ray marcher: the kernels of ``raymarching``'s functions on GPU tensors.

Each function takes the arguments of its twin (``_torch_impl.<name>``, where they are typed and
documented, and which defines the semantics; ``takes_args_of`` hands them over by name, as
``a.<argument>``) and returns the same shapes and dtypes, or NotImplemented for inputs the
kernels do not take (other dtypes, CPU tensors, more than 16 composite channels):
``raymarching`` then runs the twin. Kernels live in
``raymarching/csrc`` and are built on first use (``cuda_kernels/build.py``). Ray order in
``march_rays_train``'s packed arrays is arbitrary (rays reserve slices atomically), but each
ray's samples are contiguous and front to back, as ``rays`` says.
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import torch
from torch.autograd.function import once_differentiable

from cuda_kernels.backend import takes_args_of
from cuda_kernels.build import load_kernels

from . import _torch_impl

_MAX_COMPOSITE_CHANNELS = 16  # composite_rays keeps the channels in registers


def available() -> bool:
    """Whether the kernels are built (building them now if needed) and a GPU is present."""
    return load_kernels() is not None


def _ext() -> ModuleType:
    mod = load_kernels()
    if mod is None:
        raise RuntimeError("the CUDA ray-marching kernels are not available")
    return mod


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous() if t.dtype == torch.float32 else t.float().contiguous()


def _is_f32_cuda(*ts: torch.Tensor) -> bool:
    return all(t.is_cuda and t.dtype == torch.float32 for t in ts)


@takes_args_of(_torch_impl.near_far_from_aabb)
def near_far_from_aabb(a: SimpleNamespace):
    if not _is_f32_cuda(a.rays_o, a.rays_d):
        return NotImplemented
    nears, fars = _ext().near_far_from_aabb(
        a.rays_o.contiguous(), a.rays_d.contiguous(), _f32(a.aabb.to(a.rays_o.device)), float(a.min_near)
    )
    return nears, fars


@takes_args_of(_torch_impl.morton3D)
def morton3D(a: SimpleNamespace):  # noqa: N802 - the twin's name
    if not a.coords.is_cuda:
        return NotImplemented
    return _ext().morton3D(a.coords.to(torch.int32).contiguous())


@takes_args_of(_torch_impl.morton3D_invert)
def morton3D_invert(a: SimpleNamespace):  # noqa: N802 - the twin's name
    if not a.indices.is_cuda:
        return NotImplemented
    return _ext().morton3D_invert(a.indices.to(torch.int64).contiguous())


@takes_args_of(_torch_impl.packbits)
def packbits(a: SimpleNamespace):
    if not _is_f32_cuda(a.grid):
        return NotImplemented
    return _ext().packbits(a.grid.contiguous().reshape(-1), float(a.thresh))


@takes_args_of(_torch_impl.march_rays_train)
def march_rays_train(a: SimpleNamespace):
    if not _is_f32_cuda(a.rays_o, a.rays_d, a.nears, a.fars):
        return NotImplemented
    noise = a.noise
    if a.perturb and noise is None:
        noise = torch.rand(a.rays_o.shape[0], device=a.rays_o.device)
    noise = noise if a.perturb else None
    return tuple(_march_train(a, noise, -1)[:4])


@takes_args_of(_torch_impl.march_rays_train_fixed)
def march_rays_train_fixed(a: SimpleNamespace):
    if not _is_f32_cuda(a.rays_o, a.rays_d, a.nears, a.fars):
        return NotImplemented
    return tuple(_march_train(a, a.noise, a.capacity))


def _march_train(a: SimpleNamespace, noise: torch.Tensor | None, capacity: int):
    """The kernels of both training marches (``a``: either march's arguments); capacity -1:
    sized by the count (a host sync); ``a.warp``: a warp per ray (with dt_gamma 0) or a thread
    walking each ray."""
    dt_min, dt_max = _torch_impl._step_params(a.bound, a.C, a.G, a.max_steps)
    return _ext().march_rays_train(
        a.rays_o.contiguous(),
        a.rays_d.contiguous(),
        a.nears.contiguous(),
        a.fars.contiguous(),
        None if noise is None else _f32(noise),
        a.density_bitfield.contiguous(),
        float(a.bound),
        int(a.C),
        int(a.G),
        float(a.dt_gamma),
        int(a.max_steps),
        dt_min,
        dt_max,
        int(capacity),
        bool(a.warp),
    )


class _CompositeRaysTrain(torch.autograd.Function):
    """Front-to-back compositing with a hand-written backward for sigmas and rgbs."""

    @staticmethod
    def forward(ctx, sigmas, rgbs, ts, rays, T_thresh):  # noqa: N803 - the twin's names
        weights, weights_sum, depth, image = _ext().composite_rays_train_forward(
            sigmas, rgbs, ts, rays, T_thresh
        )
        ctx.save_for_backward(sigmas, rgbs, ts, rays)
        ctx.T_thresh = T_thresh
        return weights, weights_sum, depth, image

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_weights, grad_weights_sum, grad_depth, grad_image):
        sigmas, rgbs, ts, rays = ctx.saved_tensors
        N, C = rays.shape[0], rgbs.shape[1]

        def fill(g: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
            # Outputs unused by the loss get no gradient from autograd: treat as zeros.
            return sigmas.new_zeros(shape) if g is None else g.to(sigmas.dtype).contiguous()

        grads = (
            fill(grad_weights, (sigmas.shape[0],)),
            fill(grad_weights_sum, (N,)),
            fill(grad_depth, (N,)),
            fill(grad_image, (N, C)),
        )
        grad_sigmas, grad_rgbs = _ext().composite_rays_train_backward(
            *grads, sigmas, rgbs, ts, rays, ctx.T_thresh
        )
        return grad_sigmas, grad_rgbs, None, None, None


@takes_args_of(_torch_impl.composite_rays_train)
def composite_rays_train(a: SimpleNamespace):
    """Computes in float32 (float64 when sigmas are float64), like the twin."""
    if not a.sigmas.is_cuda:
        return NotImplemented
    cdt = torch.float64 if a.sigmas.dtype == torch.float64 else torch.float32
    return _CompositeRaysTrain.apply(
        a.sigmas.to(cdt).contiguous(),
        a.rgbs.to(cdt).contiguous(),
        a.ts.to(cdt).contiguous(),
        a.rays.to(torch.int32).contiguous(),
        float(a.T_thresh),
    )


@takes_args_of(_torch_impl.prune_rays_train)
def prune_rays_train(a: SimpleNamespace):
    if not _prune_on_gpu(a):
        return NotImplemented
    return tuple(_prune_train(a, -1)[:2])


@takes_args_of(_torch_impl.prune_rays_train_fixed)
def prune_rays_train_fixed(a: SimpleNamespace):
    if not _prune_on_gpu(a):
        return NotImplemented
    return tuple(_prune_train(a, a.capacity))


def _prune_on_gpu(a: SimpleNamespace) -> bool:
    return _is_f32_cuda(a.sigmas, a.ts) and a.sigmas.dim() == 1 and a.sigmas.shape[0] > 0


def _prune_train(a: SimpleNamespace, capacity: int):
    """The kernels of both prunings (``a``: either pruning's arguments); capacity -1: keep
    sized by the kept count (a host sync)."""
    return _ext().prune_rays_train(
        a.sigmas.contiguous(),
        a.ts.contiguous(),
        a.rays.to(torch.int32).contiguous(),
        float(a.T_min),
        int(capacity),
    )


@takes_args_of(_torch_impl.march_rays)
def march_rays(a: SimpleNamespace):
    """Advances rays_t in place."""
    ok = (
        _is_f32_cuda(a.rays_t, a.rays_o, a.rays_d, a.fars)
        and a.rays_t.is_contiguous()
        and a.rays_alive.dtype in (torch.int32, torch.int64)
        and a.rays_alive.is_contiguous()
    )
    if not ok:
        return NotImplemented
    dt_min, dt_max = _torch_impl._step_params(a.bound, a.C, a.G, a.max_steps)
    xyzs, dirs, ts = _ext().march_rays(
        int(a.n_alive),
        int(a.n_step),
        a.rays_alive,
        a.rays_t,
        a.rays_o.contiguous(),
        a.rays_d.contiguous(),
        a.density_bitfield.contiguous(),
        float(a.bound),
        int(a.C),
        int(a.G),
        a.fars.contiguous(),
        float(a.dt_gamma),
        int(a.max_steps),
        dt_min,
        dt_max,
    )
    return xyzs, dirs, ts


@takes_args_of(_torch_impl.composite_rays)
def composite_rays(a: SimpleNamespace):
    """Updates weights_sum, depth, image (float32, contiguous) and rays_alive in place."""
    ok = (
        _is_f32_cuda(a.weights_sum, a.depth, a.image, a.rays_t, a.fars)
        and all(t.is_contiguous() for t in (a.weights_sum, a.depth, a.image, a.rays_alive))
        and a.rays_alive.dtype in (torch.int32, torch.int64)
        and a.image.shape[-1] <= _MAX_COMPOSITE_CHANNELS
    )
    if not ok:
        return NotImplemented
    _ext().composite_rays(
        int(a.n_alive),
        int(a.n_step),
        a.rays_alive,
        a.rays_t.contiguous(),
        _f32(a.sigmas).reshape(-1),
        _f32(a.rgbs),
        _f32(a.ts),
        a.weights_sum,
        a.depth,
        a.image,
        a.fars.contiguous(),
        float(a.T_thresh),
    )
    return None
