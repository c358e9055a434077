"""The field's speed variants (``nerf/network_base.py`` has the reference computation).

* ``FusedReluMLP``: ``MLP`` whose calls without gradients run each hidden Linear + ReLU as one
  GEMM with a ReLU epilogue (``linear_relu``).
* ``FusedHead``: the MLP, the density activation and the albedo sigmoid as one autograd node
  with a hand-written backward (``_MLPHead``, rows padded to ``bucket_rows`` on GPUs), or as
  Triton kernels (``triton``, ``--fused_mlp``: ``nerf/fast/fused_mlp.py``) where they apply;
  and the fd normals and shading of a merged field call likewise (``_FDShade`` or Triton).

``FieldNetwork`` builds them from ``NeRFSpeedConfig`` (``fused_relu``, ``fused_head``,
``fused_mlp``, ``pad_rows``, ``blob_in_kernel``); each computes what the reference computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from gridencoder import GridEncoder

from ..field_parts import MLP, _central_difference, _shade
from . import fused_mlp

if TYPE_CHECKING:  # the field builds these variants; they only name its type
    from ..network_base import FieldNetwork

FUSED_RELU = hasattr(torch, "_addmm_activation")  # this torch has the ReLU-epilogue GEMM


def linear_relu(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """relu(layer(x)) for [N, in] x in one ``addmm`` with a ReLU epilogue (autocast dtype)."""
    dtype = fused_mlp.gemm_dtype(x)
    w, b = layer.weight.to(dtype), layer.bias.to(dtype)
    return torch._addmm_activation(b, x.to(dtype), w.t())


class FusedReluMLP(MLP):
    """``MLP`` (same layers and state) whose calls without gradients (frames, density queries)
    run each hidden Linear + ReLU as one GEMM with a ReLU epilogue: the separate ReLU pass over
    [N, hidden] cost 2.5 of 24 ms of GPU time in an 800x800 H100 frame.
    ``torch._addmm_activation`` has no backward, hence no_grad only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not FUSED_RELU or self.residual or x.dim() != 2 or torch.is_grad_enabled():
            return super().forward(x)
        for i, layer in enumerate(self.layers):
            hidden = i != len(self.layers) - 1
            if hidden and layer.bias is not None:
                x = linear_relu(x, layer)
                continue
            x = layer(x)
            if hidden:
                x = F.relu(x, inplace=True)
        return x


def bucket_rows(n: int) -> int:
    """``n`` rounded up to a multiple of 1/64 to 1/128 of its power of two (at most 1.6% more).

    cuBLASLt chooses a GEMM algorithm for each new shape: that cost 0.27-0.55 ms of host time
    per ReLU-epilogue GEMM against 0.03-0.04 ms for a shape seen before (H100, torch 2.11,
    scripts/lab/bench_gemm.py), and the sample count changes at every step. Padding the rows to
    64-128 sizes per octave makes the shapes repeat (a 10k-step run meets a few hundred
    sizes), for at most 1.6% more rows (with buckets of up to 6%, bench_sds's allocation peak
    was 0.17 GiB higher).

    >>> [bucket_rows(n) for n in (1, 100, 1000, 334242)]
    [64, 128, 1024, 335872]
    """
    q = 1 << max(n.bit_length() - 7, 6)
    return max(-(-n // q) * q, q)


def _head_forward(
    feat: torch.Tensor, blob: torch.Tensor, params: tuple[torch.Tensor, ...], activation: str, pad: bool
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """The ReLU MLP and the density/albedo head, without autograd.

    feat: [N,F] encoder features (any strides; the GEMMs run in the autocast dtype when
    autocast is on, else in feat's dtype); blob: [N] fp32 density prior; params: (W0, b0, W1,
    b1, ...); pad: the GPU path's GEMM padding (``FusedHead.pad_rows``). Returns sigma [N]
    fp32, albedo [N,3], the layers' inputs and the fp32 logit.
    """
    dtype = fused_mlp.gemm_dtype(feat)
    h = feat.to(dtype)
    acts = []
    n = len(params) // 2
    for i in range(n):
        w, b = params[2 * i].to(dtype), params[2 * i + 1].to(dtype)
        acts.append(h)
        if i < n - 1:  # ReLU as the GEMM's epilogue (one kernel instead of two)
            h = torch._addmm_activation(b, h, w.t())
            continue
        out, out_pad = w.shape[0], -w.shape[0] % 8
        if pad and out_pad and h.shape[0] >= _PAD_OUT_MIN_ROWS:
            # 4 output columns: padded to 8 (zero rows of W) cuBLAS picks a faster kernel, 0.6x
            # to 0.8x the time at 400k rows on the H100; at 100k rows padding is slower
            # (scripts/lab/bench_gemm.py).
            w, b = F.pad(w, (0, 0, 0, out_pad)), F.pad(b, (0, out_pad))
        h = torch.addmm(b, h, w.t())[:, :out]
    logit = h[:, 0].float() + blob
    sigma = torch.exp(logit) if activation == "exp" else F.softplus(logit)
    return sigma, torch.sigmoid(h[:, 1:]), acts, logit


_PAD_OUT_MIN_ROWS = 1 << 18  # rows from which the last layer's outputs are padded (with pad)


class _MLPHead(torch.autograd.Function):
    """MLP + density activation + albedo sigmoid as one autograd node with a hand-written
    backward: the same math as the module path in fewer host launches (the 64x64 training
    render is bound by the host, not by the GPU).

    Inputs may carry padding rows (``bucket_rows``): only the first ``n`` rows are returned,
    and the padding gets zero gradient (which the hash-grid backward skips).
    """

    @staticmethod
    def forward(ctx, feat, blob, n, activation, pad, *params):
        sigma, albedo, acts, logit = _head_forward(feat, blob, params, activation, pad)
        ctx.activation, ctx.feat_dtype, ctx.rows = activation, feat.dtype, feat.shape[0]
        ctx.save_for_backward(logit, albedo, acts[0], *params[0::2])
        # Hidden activations are kept outside save_for_backward so that backward can drop each
        # one as soon as it is used (as the module path's per-layer nodes do): with all of
        # them alive to the end (and the ReLU mask out of place), bench_sds peaked 1.1 GiB
        # higher (its fd passes reach 5M points).
        ctx.hidden = acts[1:]
        return sigma[:n], albedo[:n]

    @staticmethod
    @once_differentiable
    def backward(ctx, g_sigma, g_albedo):
        logit, albedo, feat, *weights = ctx.saved_tensors
        hidden = ctx.hidden
        ctx.hidden = None
        n, rows, dtype = g_sigma.shape[0], ctx.rows, albedo.dtype
        g_h = torch.empty(rows, 1 + albedo.shape[1], dtype=dtype, device=logit.device)
        if rows > n:
            g_h[n:] = 0
        lg = logit[:n]
        if ctx.activation == "exp":  # trunc_exp: the derivative is clamped at exp(15)
            g_logit = g_sigma * torch.exp(lg.clamp(max=15))
        else:
            g_logit = g_sigma * torch.sigmoid(lg)
        g_h[:n, 0] = g_logit
        al = albedo[:n]
        torch.mul(g_albedo.to(dtype), al * (1 - al), out=g_h[:n, 1:])
        del logit, albedo, lg, g_logit, al
        grads: list[torch.Tensor | None] = [None] * (2 * len(weights))
        for i in reversed(range(len(weights))):
            a = hidden.pop() if i > 0 else feat
            grads[2 * i] = (g_h.t() @ a).to(weights[i].dtype)
            grads[2 * i + 1] = g_h.sum(0, dtype=torch.float32).to(weights[i].dtype)
            g_h = g_h @ weights[i].to(dtype)
            if i > 0:  # a = relu(previous layer): the gradient passes where a > 0 (in place)
                torch.ops.aten.threshold_backward.grad_input(g_h, a, 0, grad_input=g_h)
            del a
        g_feat = g_h.to(ctx.feat_dtype) if ctx.needs_input_grad[0] else None
        return (g_feat, None, None, None, None, *grads)


class _FDShade(torch.autograd.Function):
    """Central-difference normals and shading of a merged field call as one autograd node.

    Inputs: sigma_all [7N] and albedo_all [7N,3] for N samples followed by their six fd points
    (offset-major: +x,+y,+z,-x,-y,-z); l [1,3] or [N,3] light directions. Outputs sigma [N],
    color [N,3] and normal [N,3], computed as ``FieldNetwork.forward``'s module path does
    (``safe_normalize(-nan_to_num(gradient))``, then the shading), with its gradients written
    out: about 20 tensor ops and as many autograd nodes fewer on the host-bound training render.
    """

    @staticmethod
    def forward(ctx, sigma_all, albedo_all, l, ratio, eps, shading, n):
        d = _central_difference(sigma_all[n:], eps)  # [N,3] density gradient
        v = -torch.nan_to_num(d)
        sq = (v * v).sum(-1, keepdim=True)
        den = torch.sqrt(torch.clamp(sq, min=1e-20))
        normal = v / den
        albedo = albedo_all[:n]
        color, lam, dot = _shade(albedo, normal, l, ratio, shading)
        lit = () if lam is None else (albedo, lam, dot > 0, l)
        ctx.save_for_backward(normal, den, sq >= 1e-20, torch.isfinite(d), *lit)
        ctx.shading, ctx.ratio, ctx.eps, ctx.n = shading, ratio, eps, n
        ctx.albedo_dtype = albedo_all.dtype
        return sigma_all[:n], color, normal

    @staticmethod
    @once_differentiable
    def backward(ctx, g_sigma, g_color, g_normal):
        normal, den, unclamped, finite, *rest = ctx.saved_tensors
        shading, n = ctx.shading, ctx.n
        g_n = g_normal.float()
        g_alb = None
        if shading == "albedo":
            g_alb = g_color
        elif shading == "normal":
            g_n = g_n + g_color / 2
        else:
            albedo, lam, lit, l = rest
            if shading == "lambertian":
                g_alb = g_color * lam[:, None]
                g_lam = (g_color * albedo).sum(-1)
            else:
                g_lam = g_color.sum(-1)
            g_n = g_n + (g_lam * (1 - ctx.ratio) * lit)[:, None] * l
        # n = v / sqrt(clamp(|v|^2, 1e-20)); where unclamped the radial part is projected out.
        g_v = (g_n - unclamped * normal * (normal * g_n).sum(-1, keepdim=True)) / den
        g_d = -g_v * finite  # v = -nan_to_num(d)
        g_half = (g_d / (2 * ctx.eps)).t()  # d = (s+ - s-) / (2 eps)
        g_sigma_all = torch.cat([g_sigma.float().reshape(-1), g_half.reshape(-1), -g_half.reshape(-1)])
        g_albedo_all = None
        if ctx.needs_input_grad[1]:
            g_albedo_all = torch.zeros(7 * n, 3, dtype=ctx.albedo_dtype, device=g_sigma.device)
            if g_alb is not None:
                g_albedo_all[:n] = g_alb
        return g_sigma_all, g_albedo_all, None, None, None, None, None


def _encode(field: FieldNetwork, x: torch.Tensor, live: tuple[torch.Tensor, int] | None) -> torch.Tensor:
    """``field.encoder`` on [N,3] points, skipping the padding rows of ``live`` (grid only)."""
    if live is None or not isinstance(field.encoder, GridEncoder):  # only the grid skips rows
        return field.encoder(x, bound=field.bound, max_level=field.max_level)
    return field.encoder(x, bound=field.bound, max_level=field.max_level, live=live)


@dataclass
class FusedHead:
    """The field's MLP + density/albedo head, and a merged call's fd shading, each as one
    autograd node with a hand-written backward (``_MLPHead``, ``_FDShade``), or as Triton
    kernels (``nerf/fast/fused_mlp.py``) with ``triton`` where they apply.

    Args:
        triton: the Triton kernels where ``fused_mlp.supported`` (``--fused_mlp``).
        pad_rows: pad the GEMM rows to ``bucket_rows`` sizes (and, from ``_PAD_OUT_MIN_ROWS``
            rows, the last layer's outputs to 8); None: on GPUs only (CPU BLAS has no per-shape
            set-up cost, so padding would only add work there). Triton needs no padding.
        blob_in_kernel: with Triton, the density blob computed inside the kernels from the
            points (five tensor ops fewer per field call); False: passed to them as a tensor.
    """

    triton: bool = False
    pad_rows: bool | None = None
    blob_in_kernel: bool = True

    def applies(self, field: FieldNetwork, x: torch.Tensor) -> bool:
        """Whether ``forward`` takes a call on [N,3] points ``x``: a plain ReLU MLP (no
        residual blocks) and no gradient wanted with respect to the points."""
        return FUSED_RELU and not field.sigma_net.residual and not x.requires_grad

    def forward(
        self, field: FieldNetwork, x: torch.Tensor, live: tuple[torch.Tensor, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``field.common_forward``: [N,3] -> sigma [N] and albedo [N,3] (``live`` as there)."""
        params = [t for layer in field.sigma_net.layers for t in (layer.weight, layer.bias)]
        if self.triton and fused_mlp.supported(x, params[0::2]):
            # Triton kernels: no GEMM algorithm choice per shape, so no padding either.
            feat = _encode(field, x, live)
            if self.blob_in_kernel:
                gaussian = field.density_activation == "exp"  # density_blob's two forms
                blob = fused_mlp.BlobSpec(x, field.blob_density, field.blob_radius, gaussian)
            else:
                blob = field.density_blob(x.float())
            return fused_mlp.mlp_head(feat, blob, field.density_activation, params, live)
        # Padding rows (at the origin) make the GEMM shapes repeat (bucket_rows).
        n = x.shape[0]
        pad = x.is_cuda if self.pad_rows is None else self.pad_rows
        rows = bucket_rows(n) if pad else n
        xp = F.pad(x, (0, 0, 0, rows - n)) if rows > n else x
        feat = field.encoder(xp, bound=field.bound, max_level=field.max_level)
        blob = field.density_blob(xp.float())
        return _MLPHead.apply(feat, blob, n, field.density_activation, pad, *params)

    def fd_shading(
        self, sigma_all: torch.Tensor, albedo_all: torch.Tensor, ratio: float | torch.Tensor
    ) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The central-difference normals and shading of a merged field call that take these
        inputs: ``fused_mlp.fd_shade`` (Triton) where it applies with ``triton``, else
        ``_FDShade.apply``. Both take (sigma_all [7N], albedo_all [7N,3] (N samples, then their
        six fd points offset-major), light [1,3], [N,3] or None, ratio, eps, shading, N) and
        return sigma [N], color [N,3], normal [N,3]."""
        if self.triton and fused_mlp.supported_fd_shade(sigma_all, albedo_all, ratio):
            return fused_mlp.fd_shade
        return _FDShade.apply
