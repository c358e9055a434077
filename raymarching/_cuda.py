"""CUDA ray marcher: the kernels of ``raymarching``'s functions on GPU tensors.

Each function takes the arguments of its public namesake (``raymarching.<name>``, where they
are documented; the twin ``_torch_impl`` defines the semantics) and returns the same shapes and
dtypes, or NotImplemented for inputs the kernels do not take (other dtypes, CPU tensors, more
than 16 composite channels): ``raymarching`` then runs the twin. Kernels live in
``raymarching/csrc`` and are built on first use (``cuda_kernels/build.py``). Ray order in
``march_rays_train``'s packed arrays is arbitrary (rays reserve slices atomically), but each
ray's samples are contiguous and front to back, as ``rays`` says.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

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


def near_far_from_aabb(rays_o, rays_d, aabb, min_near):
    if not _is_f32_cuda(rays_o, rays_d):
        return NotImplemented
    nears, fars = _ext().near_far_from_aabb(
        rays_o.contiguous(), rays_d.contiguous(), _f32(aabb.to(rays_o.device)), float(min_near)
    )
    return nears, fars


def morton3D(coords):  # noqa: N802 - the twin's name
    if not coords.is_cuda:
        return NotImplemented
    return _ext().morton3D(coords.to(torch.int32).contiguous())


def morton3D_invert(indices):  # noqa: N802 - the twin's name
    if not indices.is_cuda:
        return NotImplemented
    return _ext().morton3D_invert(indices.to(torch.int64).contiguous())


def packbits(grid, thresh):
    if not _is_f32_cuda(grid):
        return NotImplemented
    return _ext().packbits(grid.contiguous().reshape(-1), float(thresh))


def march_rays_train(
    rays_o, rays_d, bound, density_bitfield, C, G, nears, fars, perturb, dt_gamma, max_steps, noise, warp
):
    if not _is_f32_cuda(rays_o, rays_d, nears, fars):
        return NotImplemented
    if perturb and noise is None:
        noise = torch.rand(rays_o.shape[0], device=rays_o.device)
    noise = noise if perturb else None
    args = (rays_o, rays_d, bound, density_bitfield, C, G, nears, fars, noise, dt_gamma, max_steps)
    return tuple(_march_train(*args, -1, warp)[:4])


def march_rays_train_fixed(
    rays_o, rays_d, bound, density_bitfield, C, G, nears, fars, noise, dt_gamma, max_steps, capacity, warp
):
    if not _is_f32_cuda(rays_o, rays_d, nears, fars):
        return NotImplemented
    args = (rays_o, rays_d, bound, density_bitfield, C, G, nears, fars, noise, dt_gamma, max_steps)
    return tuple(_march_train(*args, capacity, warp))


def _march_train(
    rays_o, rays_d, bound, density_bitfield, C, G, nears, fars, noise, dt_gamma, max_steps, capacity, warp
):
    """The kernels of both training marches; capacity -1: sized by the count (a host sync);
    warp: a warp per ray (with dt_gamma 0) or a thread walking each ray."""
    dt_min, dt_max = _torch_impl._step_params(bound, C, G, max_steps)
    return _ext().march_rays_train(
        rays_o.contiguous(),
        rays_d.contiguous(),
        nears.contiguous(),
        fars.contiguous(),
        None if noise is None else _f32(noise),
        density_bitfield.contiguous(),
        float(bound),
        int(C),
        int(G),
        float(dt_gamma),
        int(max_steps),
        dt_min,
        dt_max,
        int(capacity),
        bool(warp),
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


def composite_rays_train(sigmas, rgbs, ts, rays, T_thresh):  # noqa: N803 - the twin's name
    """Computes in float32 (float64 when sigmas are float64), like the twin."""
    if not sigmas.is_cuda:
        return NotImplemented
    cdt = torch.float64 if sigmas.dtype == torch.float64 else torch.float32
    return _CompositeRaysTrain.apply(
        sigmas.to(cdt).contiguous(),
        rgbs.to(cdt).contiguous(),
        ts.to(cdt).contiguous(),
        rays.to(torch.int32).contiguous(),
        float(T_thresh),
    )


def prune_rays_train(sigmas, ts, rays, T_min):  # noqa: N803 - the twin's name
    if not _prune_on_gpu(sigmas, ts):
        return NotImplemented
    return tuple(_prune_train(sigmas, ts, rays, T_min, -1)[:2])


def _prune_on_gpu(sigmas: torch.Tensor, ts: torch.Tensor) -> bool:
    return _is_f32_cuda(sigmas, ts) and sigmas.dim() == 1 and sigmas.shape[0] > 0


def _prune_train(sigmas, ts, rays, T_min, capacity):  # noqa: N803 - the twin's name
    """The kernels of both prunings; capacity -1: keep sized by the kept count (a host sync)."""
    return _ext().prune_rays_train(
        sigmas.contiguous(),
        ts.contiguous(),
        rays.to(torch.int32).contiguous(),
        float(T_min),
        int(capacity),
    )


def prune_rays_train_fixed(sigmas, ts, rays, T_min, capacity):  # noqa: N803 - the twin's name
    if not _prune_on_gpu(sigmas, ts):
        return NotImplemented
    return tuple(_prune_train(sigmas, ts, rays, T_min, capacity))


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
    """Advances rays_t in place."""
    ok = (
        _is_f32_cuda(rays_t, rays_o, rays_d, fars)
        and rays_t.is_contiguous()
        and rays_alive.dtype in (torch.int32, torch.int64)
        and rays_alive.is_contiguous()
    )
    if not ok:
        return NotImplemented
    dt_min, dt_max = _torch_impl._step_params(bound, C, G, max_steps)
    xyzs, dirs, ts = _ext().march_rays(
        int(n_alive),
        int(n_step),
        rays_alive,
        rays_t,
        rays_o.contiguous(),
        rays_d.contiguous(),
        density_bitfield.contiguous(),
        float(bound),
        int(C),
        int(G),
        fars.contiguous(),
        float(dt_gamma),
        int(max_steps),
        dt_min,
        dt_max,
    )
    return xyzs, dirs, ts


def composite_rays(
    n_alive, n_step, rays_alive, rays_t, sigmas, rgbs, ts, weights_sum, depth, image, fars, T_thresh
):  # noqa: N803 - the twin's name
    """Updates weights_sum, depth, image (float32, contiguous) and rays_alive in place."""
    ok = (
        _is_f32_cuda(weights_sum, depth, image, rays_t, fars)
        and all(t.is_contiguous() for t in (weights_sum, depth, image, rays_alive))
        and rays_alive.dtype in (torch.int32, torch.int64)
        and image.shape[-1] <= _MAX_COMPOSITE_CHANNELS
    )
    if not ok:
        return NotImplemented
    _ext().composite_rays(
        int(n_alive),
        int(n_step),
        rays_alive,
        rays_t.contiguous(),
        _f32(sigmas).reshape(-1),
        _f32(rgbs),
        _f32(ts),
        weights_sum,
        depth,
        image,
        fars.contiguous(),
        float(T_thresh),
    )
    return None
