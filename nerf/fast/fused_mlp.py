"""The field's MLP and density/albedo head, and its fd shading, as fused Triton kernels
(``--fused_mlp``).

``field._MLPHead`` runs the 3-layer ReLU MLP as cuBLAS GEMMs plus separate passes for
the ReLU backward, the bias sums, casts and slices: about 25 kernels per field call, forward and
backward, and the hidden activations of every row kept for the backward. On bench_sds's fd
passes (seven rows per sample) those passes took about a third of the render's GPU time. Here:

* forward: one kernel; a program takes a tile of rows through the three layers with the
  weights on chip and writes sigma [n] (fp32) and albedo [n,3];
* backward: one kernel; each program walks its tiles, recomputes their forward (nothing but the
  encoder features is saved) and writes the features' gradient, summing the weight gradients
  in registers; the programs' partial sums are then added in a fixed order (no atomics: the
  same inputs give the same gradients).

``fd_shade`` does the same for ``field._FDShade`` (central-difference normals and the
shading of a merged field call: about 20 tensor ops each way) in one kernel each way.

The arithmetic is ``_MLPHead``'s: fp16/bf16 operands (the autocast dtype), fp32 accumulation,
activations rounded between layers. Only that configuration runs here (CUDA, Triton, autocast
fp16/bf16, 3 layers, hidden width a power of two in [16, 128], 4 outputs); ``supported`` says
so and the caller keeps ``_MLPHead`` otherwise (CPU, CI, other backbones).

>>> import torch
>>> supported(torch.zeros(4, 32), [torch.zeros(64, 32)] * 3)  # a CPU tensor: never
False
"""

from __future__ import annotations

import functools
import sys
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

_OUT = 4  # head outputs: density logit and three albedo logits
_O_TILE = 16  # head columns in the kernels (tensor-core tiles need 16)
# Launch settings (scripts/lab/bench_fused_mlp.py sweeps them): rows per tile, warps per program,
# backward programs per SM.
_BM = 64
_WARPS = 4
_PROGRAMS_PER_SM = 4


@functools.cache
def _kernels():
    """The Triton module, or None where Triton is missing (CPU-only installs)."""
    try:
        from . import _fused_mlp_kernels
    except ImportError:
        return None
    return _fused_mlp_kernels


def gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear layer would compute in for ``x``: autocast's when it is on, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def supported(x: torch.Tensor, weights: list[torch.Tensor]) -> bool:
    """Whether the fused kernels take a call on ``x`` (the points or their features: its device
    and the autocast state decide): CUDA, fp16/bf16 GEMMs, and ``weights`` the three nn.Linear
    weights of an [F -> H -> H -> 4] MLP."""
    if not x.is_cuda or _kernels() is None:
        return False
    dtype = gemm_dtype(x)
    if dtype not in (torch.float16, torch.bfloat16) or not shapes_ok(x.shape[0], weights):
        return False
    H, F = weights[0].shape
    return _head_works(x.device, dtype, F, H)


def param_shapes(F: int, H: int) -> tuple[tuple[int, ...], ...]:
    """Shapes of (W0, b0, W1, b1, W2, b2) of the [F -> H -> H -> 4] MLP the kernels take."""
    return ((H, F), (H,), (H, H), (H,), (_OUT, H), (_OUT,))


def shapes_ok(rows: int, weights: list[torch.Tensor]) -> bool:
    """Whether the kernels take ``rows`` rows through an MLP with these three nn.Linear weights:
    [F -> H -> H -> 4], F at most 128, H a power of two in [16, 128], int32 indices.

    >>> w = lambda *s: torch.zeros(s)
    >>> shapes_ok(1000, [w(64, 32), w(64, 64), w(4, 64)]), shapes_ok(1000, [w(48, 32), w(48, 48), w(4, 48)])
    (True, False)
    """
    if len(weights) != 3:
        return False
    H, F = weights[0].shape
    return (
        F <= 128
        and 16 <= H <= 128
        and H & (H - 1) == 0
        and tuple(weights[1].shape) == (H, H)
        and tuple(weights[2].shape) == (_OUT, H)
        and rows * _f_pad(F) < 2**31  # the kernels index in int32
    )


_PROBED: dict[tuple, bool] = {}


def _probe(key: tuple, what: str, device: torch.device, run) -> bool:
    """Whether ``run()`` (kernels on a small test input, forward and backward) works here, once
    per ``key``: a GPU or a Triton build they do not support gets the PyTorch path and one line,
    not a crash mid-run. Not probed during a CUDA graph capture (the PyTorch path is taken)."""
    if key in _PROBED:
        return _PROBED[key]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    try:
        results = run()
        if not all(bool(torch.isfinite(t).all()) for t in results):
            raise RuntimeError("non-finite results on a test input")
        _PROBED[key] = True
    except Exception as e:  # any failure means: use the PyTorch path
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(
            f"[speed] --fused_mlp: the Triton {what} kernels failed on {device} ({why}); using the PyTorch path",
            file=sys.stderr,
            flush=True,
        )
        _PROBED[key] = False
    return _PROBED[key]


def _head_works(device: torch.device, dtype: torch.dtype, F: int, H: int) -> bool:
    def run():
        g = torch.Generator(device=device).manual_seed(0)
        params = [
            (torch.randn(s, device=device, generator=g) * 0.1).requires_grad_() for s in param_shapes(F, H)
        ]
        feat = torch.randn(100, F, device=device, generator=g).to(dtype).requires_grad_()
        blob = BlobSpec(torch.rand(100, 3, device=device, generator=g), 1.0, 0.5, True)  # as fields call it
        with torch.enable_grad():
            out = _FusedHead.apply(feat, blob, "exp", None, *params)
            grads = torch.autograd.grad(out[0].sum() + out[1].float().sum(), [feat, *params])
        return (*out, *grads)

    return _probe(("head", device, dtype, F, H), "MLP", device, run)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.float16 if dtype == torch.float16 else tl.bfloat16


def _f_pad(F: int) -> int:
    return max(16, 1 << (F - 1).bit_length())


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs(device_index: int) -> int:
    """Backward programs: a few per SM, so that each sums many tiles into its partial sums."""
    return _PROGRAMS_PER_SM * _sm_count(device_index)


class BlobSpec(NamedTuple):
    """The density blob computed inside the kernels from the points, as
    ``FieldNetwork.density_blob`` computes it (five tensor ops fewer per field call):
    ``density * exp(-|p|^2 / (2 radius^2))`` (gaussian) or ``density * (1 - |p| / radius)``."""

    points: torch.Tensor  # [N,3] fp32
    density: float
    radius: float
    gaussian: bool


def _blob_args(blob: torch.Tensor | BlobSpec) -> tuple[torch.Tensor, float, float, int]:
    """(tensor, bd, bk, BLOB_MODE) of the kernels for a blob [N] or a ``BlobSpec``."""
    if isinstance(blob, BlobSpec):
        points = blob.points.float().contiguous()
        if blob.gaussian:
            return points, float(blob.density), 2.0 * float(blob.radius) ** 2, 1
        return points, float(blob.density), float(blob.radius), 2
    return blob.float().contiguous(), 0.0, 1.0, 0


def _live_args(live: tuple[torch.Tensor, int] | None, fallback: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(count pointer, period) of the kernels' live rows; any tensor and 1 when every row is."""
    return (fallback, 1) if live is None else (live[0], int(live[1]))


class _FusedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat, blob, activation, live, *params):
        k = _kernels()
        n, F = feat.shape
        dtype = gemm_dtype(feat)
        H = params[0].shape[0]
        sigma = torch.empty(n, dtype=torch.float32, device=feat.device)
        albedo = torch.empty(n, 3, dtype=dtype, device=feat.device)
        blob, bd, bk, mode = _blob_args(blob)
        params = [p.contiguous() for p in params]
        if n > 0:
            with torch.cuda.device(feat.device):  # Triton launches on the current device
                k.head_forward_kernel[(_cdiv(n, _BM),)](
                    feat, feat.stride(0), feat.stride(1), blob, *params, sigma, albedo, n, F,
                    *_live_args(live, sigma), bd, bk, EXP=activation == "exp", F_P=_f_pad(F), H=H,
                    O=_O_TILE, BM=_BM, DT=_tl_dtype(dtype), HAS_LIVE=live is not None, BLOB_MODE=mode,
                    num_warps=_WARPS,
                )  # fmt: skip
        ctx.save_for_backward(feat, blob, *params)
        ctx.activation, ctx.dtype, ctx.live, ctx.blob = activation, dtype, live, (bd, bk, mode)
        return sigma, albedo

    @staticmethod
    @once_differentiable
    def backward(ctx, g_sigma, g_albedo):
        feat, blob, *params = ctx.saved_tensors
        k = _kernels()
        n, F = feat.shape
        H = params[0].shape[0]
        total = sum(p.numel() for p in params)
        tiles = _cdiv(n, _BM)
        programs = max(1, min(tiles, _programs(feat.device.index or 0)))
        # Each program's partial weight gradients in a row (every program writes all of its
        # row), summed below in a fixed order.
        partial = torch.empty(programs, total, dtype=torch.float32, device=feat.device)
        rows, at = [], 0
        for p in params:
            rows.append(partial[0, at : at + p.numel()])
            at += p.numel()
        want_gx = ctx.needs_input_grad[0]
        gx = torch.empty(n, F, dtype=feat.dtype, device=feat.device) if want_gx else partial
        if n > 0:
            with torch.cuda.device(feat.device):
                k.head_backward_kernel[(programs,)](
                    feat, feat.stride(0), feat.stride(1), blob, *params,
                    g_sigma.float().contiguous(), g_albedo.contiguous(), gx, *rows, n, F, tiles,
                    total, *_live_args(ctx.live, partial), ctx.blob[0], ctx.blob[1],
                    EXP=ctx.activation == "exp", F_P=_f_pad(F), H=H, O=_O_TILE, BM=_BM,
                    DT=_tl_dtype(ctx.dtype), WANT_GX=want_gx, HAS_LIVE=ctx.live is not None,
                    BLOB_MODE=ctx.blob[2], num_warps=_WARPS,
                )  # fmt: skip
        flat = partial.sum(0) if programs > 1 else partial[0]
        grads, at = [], 0
        for p in params:
            grads.append(flat[at : at + p.numel()].view(p.shape).to(p.dtype))
            at += p.numel()
        return (gx if want_gx else None, None, None, None, *grads)


def mlp_head(
    feat: torch.Tensor,
    blob: torch.Tensor | BlobSpec,
    activation: str,
    params: list[torch.Tensor],
    live: tuple[torch.Tensor, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sigma [N] fp32 and albedo [N,3] (GEMM dtype) of encoder features feat [N,F].

    blob: the density prior added to the logit, [N] or computed in the kernels from the points
    (``BlobSpec``); activation: "exp" (trunc_exp) or "softplus";
    params: (W0, b0, W1, b1, W2, b2) of the [F -> H -> H -> 4] ReLU MLP; live: (count [1]
    int32, period) to compute only rows r with r % period < count (the padding rows of a
    fixed-size graph replay get zeros and pass no gradient), or None for every row. Check
    ``supported`` first.
    """
    return _FusedHead.apply(feat, blob, activation, live, *params)


_SHADE_BLOCK = 256


def _ratio_ok(ratio: object, device: torch.device) -> bool:
    """A Python number, or a one-element fp32 tensor on ``device`` (graph replays)."""
    if isinstance(ratio, torch.Tensor):
        return ratio.numel() == 1 and ratio.dtype == torch.float32 and ratio.device == device
    return isinstance(ratio, (int, float))


def supported_fd_shade(sigma_all: torch.Tensor, albedo_all: torch.Tensor, ratio: object) -> bool:
    """Whether ``fd_shade`` takes a call: CUDA, Triton, an ambient ratio that is a Python number
    or a one-element fp32 tensor on the GPU, and kernels that run here."""
    return (
        sigma_all.is_cuda
        and _kernels() is not None
        and _ratio_ok(ratio, sigma_all.device)
        and 3 * sigma_all.shape[0] < 2**31  # the kernels index in int32
        and _shade_works(sigma_all.device, albedo_all.dtype)
    )


def _shade_works(device: torch.device, dtype: torch.dtype) -> bool:
    def run():
        g = torch.Generator(device=device).manual_seed(0)
        sig = torch.rand(700, device=device, generator=g).requires_grad_()
        alb = torch.rand(700, 3, device=device, generator=g).to(dtype).requires_grad_()
        with torch.enable_grad():
            out = fd_shade(sig, alb, torch.ones(1, 3, device=device), 0.5, 1e-2, "lambertian", 100)
            grads = torch.autograd.grad(sum(o.float().sum() for o in out), [sig, alb])
        return (*out, *grads)

    return _probe(("shade", device, dtype), "fd shading", device, run)


def _light_args(l: torch.Tensor | None, fallback: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Light pointer and row stride (0: one light for all samples); any tensor when unused."""
    if l is None:
        return fallback, 0
    return l, 3 if l.shape[0] > 1 else 0


class _FusedFDShade(torch.autograd.Function):
    """``field._FDShade`` (central-difference normals and shading of a merged field
    call) as one kernel each way; the backward recomputes the normals from the densities."""

    @staticmethod
    def forward(ctx, sigma_all, albedo_all, l, ratio, eps, shading, n):
        k = _kernels()
        sig, alb = sigma_all.float().contiguous(), albedo_all.contiguous()
        l = None if l is None else l.float().contiguous()
        normal = torch.empty(n, 3, dtype=torch.float32, device=sig.device)
        color = torch.empty(
            n, 3, dtype=alb.dtype if shading == "albedo" else torch.float32, device=sig.device
        )
        light, stride = _light_args(l, sig)
        if n > 0:
            with torch.cuda.device(sig.device):
                k.fd_shade_forward_kernel[(_cdiv(n, _SHADE_BLOCK),)](
                    sig, alb, light, stride, color, normal, n, 1.0 / (2 * eps), ratio,
                    SHADING=k.SHADING_IDS[shading], BLOCK=_SHADE_BLOCK, RATIO_PTR=isinstance(ratio, torch.Tensor),
                )  # fmt: skip
        ctx.save_for_backward(sig, alb, l)
        ctx.ratio, ctx.eps, ctx.shading, ctx.n = ratio, eps, shading, n
        return sigma_all[:n], color, normal

    @staticmethod
    @once_differentiable
    def backward(ctx, g_sigma, g_color, g_normal):
        sig, alb, l = ctx.saved_tensors
        k, n = _kernels(), ctx.n
        g_sigma_all = torch.empty(7 * n, dtype=torch.float32, device=sig.device)
        want_alb = ctx.needs_input_grad[1]
        g_albedo_all = torch.empty(7 * n, 3, dtype=alb.dtype, device=sig.device) if want_alb else None
        light, stride = _light_args(l, sig)
        if n > 0:
            with torch.cuda.device(sig.device):
                k.fd_shade_backward_kernel[(_cdiv(n, _SHADE_BLOCK),)](
                    sig, alb, light, stride, g_sigma.contiguous(), g_color.contiguous(),
                    g_normal.contiguous(), g_sigma_all, g_albedo_all if want_alb else g_sigma_all, n,
                    1.0 / (2 * ctx.eps), ctx.ratio, SHADING=k.SHADING_IDS[ctx.shading],
                    WANT_GALB=want_alb, BLOCK=_SHADE_BLOCK, RATIO_PTR=isinstance(ctx.ratio, torch.Tensor),
                )  # fmt: skip
        return g_sigma_all, g_albedo_all, None, None, None, None, None


def fd_shade(
    sigma_all: torch.Tensor,
    albedo_all: torch.Tensor,
    l: torch.Tensor | None,
    ratio: float | torch.Tensor,
    eps: float,
    shading: str,
    n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sigma [n], colour [n,3] and normal [n,3] from a merged field call's sigma_all [7n] and
    albedo_all [7n,3] (n samples, then their fd points offset-major: +x,+y,+z,-x,-y,-z); l: [1,3]
    or [n,3] fp32 light directions (lambertian/textureless); ratio: the ambient ratio, a number
    or a one-element fp32 tensor (graph replays). ``field._FDShade`` is the reference;
    check ``supported_fd_shade`` first."""
    return _FusedFDShade.apply(sigma_all, albedo_all, l, ratio, eps, shading, n)
