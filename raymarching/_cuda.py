"""CUDA ray marcher: the twin's functions (``_torch_impl``) on GPU tensors.

Same signatures, return shapes and dtypes as ``raymarching._torch_impl``; kernels live in
``raymarching/csrc`` and are built on first use (``cuda_kernels/build.py``). Inputs the kernels do not
take (other dtypes, CPU tensors, more than 16 composite channels) go to the twin. Ray order
in ``march_rays_train``'s packed arrays is arbitrary (rays reserve slices atomically), but
each ray's samples are contiguous and front to back, as ``rays`` says.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from cuda_kernels.build import load_kernels

from . import _torch_impl

_MAX_COMPOSITE_CHANNELS = 16  # composite_rays keeps the channels in registers
# Training marches with a fixed step (dt_gamma 0): a warp per ray testing 32 lattice points at
# a time (True) or a thread walking each ray with empty-space skips (False). Same samples;
# bench_render.py --ab_march times both (docs/benchmarks.md).
MARCH_WARP = True


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


def near_far_from_aabb(
    rays_o: torch.Tensor, rays_d: torch.Tensor, aabb: torch.Tensor, min_near: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """rays_o, rays_d: [N,3]; aabb: [6] -> nears, fars: [N] (1e10 where the box is missed)."""
    if not _is_f32_cuda(rays_o, rays_d):
        return _torch_impl.near_far_from_aabb(rays_o, rays_d, aabb, min_near)
    nears, fars = _ext().near_far_from_aabb(
        rays_o.contiguous(), rays_d.contiguous(), _f32(aabb.to(rays_o.device)), float(min_near)
    )
    return nears, fars


def morton3D(coords: torch.Tensor) -> torch.Tensor:  # noqa: N802 - the twin's name
    """coords: [N,3] integers < 1024 -> [N] int64 Morton indices."""
    if not coords.is_cuda:
        return _torch_impl.morton3D(coords)
    return _ext().morton3D(coords.to(torch.int32).contiguous())


def morton3D_invert(indices: torch.Tensor) -> torch.Tensor:  # noqa: N802 - the twin's name
    """indices: [N] Morton indices -> [N,3] int64 coordinates."""
    if not indices.is_cuda:
        return _torch_impl.morton3D_invert(indices)
    return _ext().morton3D_invert(indices.to(torch.int64).contiguous())


def packbits(grid: torch.Tensor, thresh: float) -> torch.Tensor:
    """grid: [C, G^3] (or flat) float32 densities -> [C*G^3/8] uint8 occupancy bits."""
    if not _is_f32_cuda(grid):
        return _torch_impl.packbits(grid, thresh)
    return _ext().packbits(grid.contiguous().reshape(-1), float(thresh))


def march_rays_train(
    rays_o: torch.Tensor,
    rays_d: torch.Tensor,
    bound: float,
    density_bitfield: torch.Tensor,
    C: int,
    G: int,
    nears: torch.Tensor,
    fars: torch.Tensor,
    perturb: bool = False,
    dt_gamma: float = 0.0,
    max_steps: int = 1024,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed samples in occupied cells (see the twin).

    rays_o, rays_d: [N,3]; nears, fars: [N]; density_bitfield: [C*G^3/8] uint8; noise: [N]
    in [0,1) or None. Returns xyzs, dirs: [M,3]; ts: [M,2] (t, dt); rays: [N,2] int32.
    """
    if not _is_f32_cuda(rays_o, rays_d, nears, fars):
        return _torch_impl.march_rays_train(rays_o, rays_d, bound, density_bitfield, C, G, nears,
                                            fars, perturb, dt_gamma, max_steps, noise)
    if perturb and noise is None:
        noise = torch.rand(rays_o.shape[0], device=rays_o.device)
    return tuple(_march_train(rays_o, rays_d, bound, density_bitfield, C, G, nears, fars,
                              noise if perturb else None, dt_gamma, max_steps, -1)[:4])


def _march_train(rays_o, rays_d, bound, density_bitfield, C, G, nears, fars, noise, dt_gamma,
                 max_steps, capacity):
    """The kernels of both training marches; capacity -1: sized by the count (a host sync)."""
    dt_min, dt_max = _torch_impl._step_params(bound, C, G, max_steps)
    return _ext().march_rays_train(
        rays_o.contiguous(), rays_d.contiguous(), nears.contiguous(), fars.contiguous(),
        None if noise is None else _f32(noise), density_bitfield.contiguous(), float(bound), int(C),
        int(G), float(dt_gamma), int(max_steps), dt_min, dt_max, int(capacity), bool(MARCH_WARP),
    )


def march_rays_train_fixed(
    rays_o: torch.Tensor,
    rays_d: torch.Tensor,
    bound: float,
    density_bitfield: torch.Tensor,
    C: int,
    G: int,
    nears: torch.Tensor,
    fars: torch.Tensor,
    noise: torch.Tensor | None,
    dt_gamma: float,
    max_steps: int,
    capacity: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``march_rays_train`` into ``capacity`` rows, without a host sync (see the twin).

    noise: [N] in [0,1) or None (no jitter). Returns xyzs, dirs: [capacity,3]; ts:
    [capacity,2]; rays: [N,2] int32; total: [1] int32 (the samples needed).
    """
    if not _is_f32_cuda(rays_o, rays_d, nears, fars):
        return _torch_impl.march_rays_train_fixed(rays_o, rays_d, bound, density_bitfield, C, G, nears,
                                                  fars, noise, dt_gamma, max_steps, capacity)
    return tuple(_march_train(rays_o, rays_d, bound, density_bitfield, C, G, nears, fars, noise,
                              dt_gamma, max_steps, capacity))


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

        grads = (fill(grad_weights, (sigmas.shape[0],)), fill(grad_weights_sum, (N,)),
                 fill(grad_depth, (N,)), fill(grad_image, (N, C)))
        grad_sigmas, grad_rgbs = _ext().composite_rays_train_backward(
            *grads, sigmas, rgbs, ts, rays, ctx.T_thresh
        )
        return grad_sigmas, grad_rgbs, None, None, None


def composite_rays_train(
    sigmas: torch.Tensor,
    rgbs: torch.Tensor,
    ts: torch.Tensor,
    rays: torch.Tensor,
    T_thresh: float = 1e-4,  # noqa: N803 - the twin's name
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sigmas: [M]; rgbs: [M,C]; ts: [M,2]; rays: [N,2] -> weights [M], weights_sum [N],
    depth [N], image [N,C]; differentiable in sigmas and rgbs. Computes in float32 (float64
    when sigmas are float64), like the twin."""
    if not sigmas.is_cuda:
        return _torch_impl.composite_rays_train(sigmas, rgbs, ts, rays, T_thresh)
    cdt = torch.float64 if sigmas.dtype == torch.float64 else torch.float32
    return _CompositeRaysTrain.apply(
        sigmas.to(cdt).contiguous(), rgbs.to(cdt).contiguous(), ts.to(cdt).contiguous(),
        rays.to(torch.int32).contiguous(), float(T_thresh),
    )


def prune_rays_train(
    sigmas: torch.Tensor,
    ts: torch.Tensor,
    rays: torch.Tensor,
    T_min: float,  # noqa: N803 - the twin's name
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each ray's samples while its transmittance is at least ``T_min`` (see the twin).

    sigmas: [M] float32; ts: [M,2]; rays: [N,2]. Returns keep [M'] int64 sample indices in
    order and new_rays [N,2] int32. Three kernels and one host sync (the kept count) instead
    of the twin's ~50 tensor ops (a sort and a binary search among them).
    """
    if not _prune_on_gpu(sigmas, ts):
        return _torch_impl.prune_rays_train(sigmas, ts, rays, T_min)
    return tuple(_prune_train(sigmas, ts, rays, T_min, -1)[:2])


def _prune_on_gpu(sigmas: torch.Tensor, ts: torch.Tensor) -> bool:
    return _is_f32_cuda(sigmas, ts) and sigmas.dim() == 1 and sigmas.shape[0] > 0


def _prune_train(sigmas, ts, rays, T_min, capacity):  # noqa: N803 - the twin's name
    """The kernels of both prunings; capacity -1: keep sized by the kept count (a host sync)."""
    return _ext().prune_rays_train(
        sigmas.contiguous(), ts.contiguous(), rays.to(torch.int32).contiguous(), float(T_min),
        int(capacity),
    )


def prune_rays_train_fixed(
    sigmas: torch.Tensor,
    ts: torch.Tensor,
    rays: torch.Tensor,
    T_min: float,  # noqa: N803 - the twin's name
    capacity: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``prune_rays_train`` into ``capacity`` kept indices, without a host sync (see the twin).

    Returns keep [capacity] int64 (zeros past the kept ones), new_rays [N,2] int32 and total [1]
    int32 (the samples kept before clipping to the capacity).
    """
    if not _prune_on_gpu(sigmas, ts):
        return _torch_impl.prune_rays_train_fixed(sigmas, ts, rays, T_min, capacity)
    return tuple(_prune_train(sigmas, ts, rays, T_min, capacity))


def march_rays(
    n_alive: int,
    n_step: int,
    rays_alive: torch.Tensor,
    rays_t: torch.Tensor,
    rays_o: torch.Tensor,
    rays_d: torch.Tensor,
    bound: float,
    density_bitfield: torch.Tensor,
    C: int,
    G: int,
    nears: torch.Tensor,
    fars: torch.Tensor,
    dt_gamma: float = 0.0,
    max_steps: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next ``n_step`` samples of each alive ray (see the twin); advances rays_t [N] in place.

    rays_alive: [n_alive] int32/int64 (entries < 0 are skipped); rays_o, rays_d: [N,3];
    fars: [N]. Returns xyzs, dirs: [n_alive*n_step, 3] and ts: [n_alive*n_step, 2].
    """
    ok = (_is_f32_cuda(rays_t, rays_o, rays_d, fars) and rays_t.is_contiguous()
          and rays_alive.dtype in (torch.int32, torch.int64) and rays_alive.is_contiguous())
    if not ok:
        return _torch_impl.march_rays(n_alive, n_step, rays_alive, rays_t, rays_o, rays_d, bound,
                                      density_bitfield, C, G, nears, fars, dt_gamma, max_steps)
    dt_min, dt_max = _torch_impl._step_params(bound, C, G, max_steps)
    xyzs, dirs, ts = _ext().march_rays(
        int(n_alive), int(n_step), rays_alive, rays_t, rays_o.contiguous(), rays_d.contiguous(),
        density_bitfield.contiguous(), float(bound), int(C), int(G), fars.contiguous(),
        float(dt_gamma), int(max_steps), dt_min, dt_max,
    )
    return xyzs, dirs, ts


def composite_rays(
    n_alive: int,
    n_step: int,
    rays_alive: torch.Tensor,
    rays_t: torch.Tensor,
    sigmas: torch.Tensor,
    rgbs: torch.Tensor,
    ts: torch.Tensor,
    weights_sum: torch.Tensor,
    depth: torch.Tensor,
    image: torch.Tensor,
    fars: torch.Tensor,
    T_thresh: float = 1e-2,  # noqa: N803 - the twin's name
) -> None:
    """Accumulate a ``march_rays`` batch in place (see the twin); marks finished rays -1.

    sigmas: [n_alive*n_step]; rgbs: [n_alive*n_step, C]; ts: [n_alive*n_step, 2];
    weights_sum, depth: [N]; image: [N,C] (float32, contiguous, updated in place).
    """
    ok = (_is_f32_cuda(weights_sum, depth, image, rays_t, fars)
          and all(t.is_contiguous() for t in (weights_sum, depth, image, rays_alive))
          and rays_alive.dtype in (torch.int32, torch.int64)
          and image.shape[-1] <= _MAX_COMPOSITE_CHANNELS)
    if not ok:
        return _torch_impl.composite_rays(n_alive, n_step, rays_alive, rays_t, sigmas, rgbs, ts,
                                          weights_sum, depth, image, fars, T_thresh)
    _ext().composite_rays(
        int(n_alive), int(n_step), rays_alive, rays_t.contiguous(), _f32(sigmas).reshape(-1),
        _f32(rgbs), _f32(ts), weights_sum, depth, image, fars.contiguous(), float(T_thresh),
    )
    return None
