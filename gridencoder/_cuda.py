"""CUDA hash-grid encoding: ``grid_encode`` of ``_torch_impl`` on GPU tensors (with its
arguments, handed over by name by ``takes_args_of``).

Kernels live in ``gridencoder/csrc`` and are built (with the ray marcher's, as one
extension) on first use by ``cuda_kernels/build.py``. Supported: D in {2, 3}, at most 8
features per level, float32 inputs with float32/float16/bfloat16 tables, or float64 with
float64 (for gradcheck); for anything else ``grid_encode`` returns NotImplemented and
``gridencoder.grid_encode`` runs the twin. Gradients reach the embeddings
(atomic adds, accumulated in float32) and the inputs (so autograd normals work). A backward
that must itself be differentiable (``create_graph=True``: training with autograd normals)
runs the twin's arithmetic instead, so second derivatives are exact, at the twin's speed.
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import torch

from cuda_kernels.backend import takes_args_of
from cuda_kernels.build import load_kernels

from . import _torch_impl

_EMB_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# With agg_mode 1 (``gridencoder.grid_encode``), the warp-level sums of the embedding-gradient
# atomics run on levels of at most this many lattice points per axis (a constant, not a switch).
AGG_MAX_POINTS = 256


def available() -> bool:
    """Whether the kernels are built (building them now if needed) and a GPU is present."""
    return load_kernels() is not None


def _ext() -> ModuleType:
    mod = load_kernels()
    if mod is None:
        raise RuntimeError("the CUDA grid-encoder kernels are not available")
    return mod


_layouts: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _layout(
    a: SimpleNamespace, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Device copies of offsets [L+1] int32, points [L] int32 and the position scales [L] of
    ``grid_encode``'s arguments ``a``, cached (one upload per encoder). The scales are computed
    on the CPU in float32 exactly as the twin does, so that both put every point in the same
    cell."""
    key = (
        tuple(a.offsets),
        tuple(a.points),
        a.per_level_scale,
        a.base_resolution,
        a.align_corners,
        dtype,
        device,
    )
    if key not in _layouts:
        levels = torch.arange(len(a.points), dtype=torch.float32)
        scale = a.base_resolution * torch.pow(torch.tensor(a.per_level_scale), levels) - 1
        if a.align_corners:
            scale = torch.ceil(scale)
        _layouts[key] = (
            torch.tensor(a.offsets, dtype=torch.int32, device=device),
            torch.tensor(a.points, dtype=torch.int32, device=device),
            scale.to(dtype).to(device),
        )
    return _layouts[key]


_N_CONFIG_ARGS = 6  # _GridEncode.forward's arguments after inputs and embeddings (no gradient)


class _GridEncode(torch.autograd.Function):
    """The kernels' forward and backward. ``options``: ``grid_encode``'s other arguments by
    name (the twin's backward recomputes from them); ``levels``: ``max_level`` clamped to
    [0, L]; ``out_dtype``: the features' dtype."""

    @staticmethod
    def forward(ctx, inputs, embeddings, offsets_t, points_t, scales, options, levels, out_dtype):
        soa = bool(options["soa"])
        align_corners, smoothstep = bool(options["align_corners"]), options["interpolation"] == "smoothstep"
        live_t, period = options["live"] if options["live"] is not None else (None, 1)
        out = _ext().grid_encode_forward(
            inputs,
            embeddings,
            offsets_t,
            points_t,
            scales,
            align_corners,
            smoothstep,
            levels,
            soa,
            out_dtype,
            live_t,
            period,
        )
        ctx.save_for_backward(inputs, embeddings, offsets_t, points_t, scales)
        ctx.cfg = (align_corners, smoothstep, levels)
        ctx.options, ctx.live, ctx.agg_mode = options, (live_t, period), int(options["agg_mode"])
        return out.t() if soa else out

    @staticmethod
    def backward(ctx, grad_out):
        inputs, embeddings, offsets_t, points_t, scales = ctx.saved_tensors
        need_inputs, need_emb = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():
            # create_graph: the kernels have no backward of their own, so the twin recomputes
            # the encoding and differentiates it with a graph (exact second derivatives).
            grads = _twin_backward(grad_out, inputs, embeddings, ctx.options, need_inputs, need_emb)
            return (*grads, *[None] * _N_CONFIG_ARGS)
        # The kernel reads the gradient in either layout, so no transposed copy is made (a
        # Linear's backward gives [N, L*F] row-major even when the forward wrote [L*F, N]).
        g = grad_out
        if not (embeddings.dtype == torch.float32 and g.dtype in (torch.float16, torch.bfloat16)):
            g = g.to(embeddings.dtype)  # a half gradient is read as is for a float32 table
        g_soa = not g.is_contiguous() and g.t().is_contiguous()
        g = g.t() if g_soa else g.contiguous()
        grad_emb, grad_in = _ext().grid_encode_backward(
            g,
            inputs,
            embeddings,
            offsets_t,
            points_t,
            scales,
            *ctx.cfg,
            need_emb,
            need_inputs,
            ctx.agg_mode,
            int(AGG_MAX_POINTS),
            g_soa,
            *ctx.live,
        )
        return (grad_in if need_inputs else None, grad_emb if need_emb else None, *[None] * _N_CONFIG_ARGS)


def _twin_backward(
    grad_out: torch.Tensor,
    inputs: torch.Tensor,
    embeddings: torch.Tensor,
    options: dict,
    need_inputs: bool,
    need_emb: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d inputs, d embeddings) of <grad_out [N, L*F], features>, differentiable in grad_out,
    inputs and embeddings: the twin's encoding of the saved tensors, differentiated with a
    graph; ``options``: ``grid_encode``'s other arguments by name."""
    with torch.enable_grad():
        # need_inputs is inputs.requires_grad (autograd's needs_input_grad): no detached copy.
        feats = _torch_impl.grid_encode(inputs, embeddings, **options)
        wrt = [t for t, need in ((inputs, need_inputs), (embeddings, need_emb)) if need]
        grads = iter(
            torch.autograd.grad(feats, wrt, grad_out.to(feats.dtype), create_graph=True, allow_unused=True)
        )
    return (next(grads) if need_inputs else None, next(grads) if need_emb else None)


@takes_args_of(_torch_impl.grid_encode)
def grid_encode(a: SimpleNamespace):
    """``_torch_impl.grid_encode`` (where the arguments are documented) on GPU tensors, or
    NotImplemented for inputs the kernels do not take. Returns [N, L*F] (a transposed view with
    ``a.soa``)."""
    if a.interpolation not in ("linear", "smoothstep"):
        raise ValueError(f"unknown interpolation {a.interpolation!r}")
    inputs, embeddings = a.inputs, a.embeddings
    N, D = inputs.shape
    L, F = len(a.points), embeddings.shape[1]
    if inputs.dtype in (torch.float16, torch.bfloat16):
        inputs = inputs.float()  # the twin computes positions in float32 too
    pair_ok = (inputs.dtype == torch.float32 and embeddings.dtype in _EMB_DTYPES) or (
        inputs.dtype == torch.float64 and embeddings.dtype == torch.float64
    )
    if not (
        inputs.is_cuda
        and embeddings.is_cuda
        and D in (2, 3)
        and 1 <= F <= 8
        and pair_ok
        and a.offsets[-1] < 2**31
    ):
        return NotImplemented
    offsets_t, points_t, scales = _layout(a, inputs.dtype, inputs.device)
    levels = L if a.max_level is None else max(0, min(int(a.max_level), L))
    out_dtype = a.out_dtype
    if out_dtype is None or embeddings.dtype != torch.float32:
        out_dtype = embeddings.dtype
    options = {k: v for k, v in vars(a).items() if k not in ("inputs", "embeddings")}
    return _GridEncode.apply(
        inputs.contiguous(), embeddings.contiguous(), offsets_t, points_t, scales, options, levels, out_dtype
    )
