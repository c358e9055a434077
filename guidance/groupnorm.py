"""GroupNorm (optionally fused with the SiLU after it) for the VAE encoder (``--vae_fused_gn``).

The SDS step encodes a 512x512 render and backpropagates through the VAE encoder. Compiled
by Inductor, its convolutions took 3.7 ms per step on the H100 but the GroupNorm/SiLU kernels
around them 5.0 ms (2.9 ms with ours; ``scripts/bench_vae.py``): the encoder normalises maps of
up to 512x512x128 over only 32 groups per image, and the generic reductions ran at a fraction of
the memory bandwidth. Our
CUDA kernels (``guidance/csrc/groupnorm.cu``) spread each pass over the pixels of
channels_last activations. ``group_norm_act`` is a ``torch.library`` custom op (an opaque node
that Inductor and CUDA graphs keep as is) with its backward to the input; elsewhere (CPU,
NCHW inputs, shapes the kernels do not take) it runs the PyTorch twin, the same arithmetic in
float32.

>>> x = torch.randn(2, 8, 4, 4)
>>> y, mean, rstd = group_norm_act(x, torch.ones(8), torch.zeros(8), 4, 1e-6, False)
>>> torch.allclose(y, torch.nn.functional.group_norm(x, 4, eps=1e-6), atol=1e-5), tuple(mean.shape)
(True, (2, 4))
"""

import torch
import torch.nn.functional as F
from torch import nn


def kernels():
    """Our CUDA extension (built on first use, shared with the NeRF kernels), or None."""
    from cuda_kernels.build import load_kernels

    return load_kernels()


def _use_kernel(x: torch.Tensor, groups: int) -> bool:
    vec = 4 if x.dtype == torch.float32 else 8
    C = x.shape[1]
    return (
        x.is_cuda
        and x.dim() == 4
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and x.is_contiguous(memory_format=torch.channels_last)
        and x.data_ptr() % 16 == 0
        and 1 <= groups <= 128
        and C % groups == 0
        and C % vec == 0
        and 256 % (C // vec) == 0
        and kernels() is not None
    )


def _stats(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (image, group) mean and 1/sqrt(var + eps) [N, G] in float32 (population variance)."""
    xr = x.float().reshape(x.shape[0], groups, -1)
    var, mean = torch.var_mean(xr, -1, unbiased=False)
    return mean, torch.rsqrt(var + eps)


def _normalized(x, mean, rstd, groups):
    """(x - mean) * rstd in float32, [N, C, ...] like x."""
    xr = x.float().reshape(x.shape[0], groups, -1)
    return ((xr - mean[..., None]) * rstd[..., None]).reshape(x.shape)


def _affine(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[C] -> broadcastable over [N, C, ...] like t."""
    return v.float().reshape(1, -1, *([1] * (t.dim() - 2)))


def _like(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """v in x's dtype and strides (the custom op's outputs keep the input's memory format)."""
    return torch.empty_like(x).copy_(v)


@torch.library.custom_op("dreamfusion::group_norm_act", mutates_args=())
def group_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    eps: float,
    silu: bool,
    unroll: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``silu(group_norm(x))`` (or without the SiLU): x [N, C, ...], weight, bias [C].

    Returns y (x's dtype and memory format) and the float32 mean and rstd [N, groups] the
    backward reuses. Statistics and arithmetic in float32. ``unroll``: pixels each CUDA thread
    loads per loop iteration, in the forward and the backward kernels (1, 2 or 4, default 4:
    the same results; ``scripts/bench_vae.py --unroll`` times them); the twin ignores it."""
    if _use_kernel(x, groups):
        y, mean, rstd = kernels().group_norm_forward(
            x, weight.float().contiguous(), bias.float().contiguous(), groups, eps, silu, unroll
        )
        return y, mean, rstd
    mean, rstd = _stats(x, groups, eps)
    y = _normalized(x, mean, rstd, groups) * _affine(x, weight) + _affine(x, bias)
    return _like(x, F.silu(y) if silu else y), mean, rstd


@group_norm_act.register_fake
def _(x, weight, bias, groups, eps, silu, unroll=4):
    stat = x.new_empty((x.shape[0], groups), dtype=torch.float32)
    return torch.empty_like(x), stat, torch.empty_like(stat)


@torch.library.custom_op("dreamfusion::group_norm_act_backward", mutates_args=())
def group_norm_act_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    groups: int,
    eps: float,
    silu: bool,
    unroll: int = 4,
) -> torch.Tensor:
    """dL/dx of ``group_norm_act`` from dy = dL/dy (x's dtype and memory format)."""
    if _use_kernel(x, groups):
        dy = dy.to(x.dtype).contiguous(memory_format=torch.channels_last)
        return kernels().group_norm_backward(
            dy,
            x,
            weight.float().contiguous(),
            bias.float().contiguous(),
            mean,
            rstd,
            groups,
            eps,
            silu,
            unroll,
        )
    d, xh = _pre_affine_grad(dy, x, weight, bias, mean, rstd, groups, silu)
    n = x.shape[0]
    dxh = (d * _affine(x, weight)).reshape(n, groups, -1)
    xh = xh.reshape(n, groups, -1)
    c1, c2 = dxh.mean(-1, keepdim=True), (dxh * xh).mean(-1, keepdim=True)
    return _like(x, (rstd[..., None] * (dxh - c1 - xh * c2)).reshape(x.shape))


@group_norm_act_backward.register_fake
def _(dy, x, weight, bias, mean, rstd, groups, eps, silu, unroll=4):
    return torch.empty_like(x)


def _pre_affine_grad(dy, x, weight, bias, mean, rstd, groups, silu):
    """(dL/d(xh * w + b), xh) in float32: the gradient through the SiLU, and the normalised x."""
    xh = _normalized(x, mean, rstd, groups)
    d = dy.float()
    if silu:
        y = xh * _affine(x, weight) + _affine(x, bias)
        sg = torch.sigmoid(y)
        d = d * sg * (1 + y * (1 - sg))
    return d, xh


def _setup(ctx, inputs, output):
    x, weight, bias, groups, eps, silu, unroll = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.cfg = (groups, eps, silu, unroll)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    groups, eps, silu, unroll = ctx.cfg
    dx = group_norm_act_backward(dy, x, weight, bias, mean, rstd, groups, eps, silu, unroll)
    g_w = g_b = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:  # a trainable norm (not the VAE's)
        d, xh = _pre_affine_grad(dy, x, weight, bias, mean, rstd, groups, silu)
        dims = [0, *range(2, x.dim())]
        g_w, g_b = (d * xh).sum(dims).to(weight.dtype), d.sum(dims).to(bias.dtype)
    return dx, g_w, g_b, None, None, None, None


group_norm_act.register_autograd(_backward, setup_context=_setup)


class GroupNormAct(nn.Module):
    """A frozen ``nn.GroupNorm`` followed by SiLU or nothing, as one ``group_norm_act``. Takes
    [N, C, H, W], or [N, C, L] (as an attention block's norm does).

    Keeps float32 copies of the norm's weight and bias (what the kernels read: converting a
    half copy at every call cost 88 small kernels per VAE step), so the norm must not change
    afterwards, as the frozen VAE's does not. ``unroll``: see ``group_norm_act``."""

    def __init__(self, norm: nn.GroupNorm, silu: bool, unroll: int = 4):
        super().__init__()
        if not norm.affine:
            raise ValueError("GroupNormAct needs an affine GroupNorm")
        self.num_groups, self.eps, self.silu, self.unroll = norm.num_groups, float(norm.eps), silu, unroll
        self.register_buffer("weight", norm.weight.detach().float().clone(), persistent=False)
        self.register_buffer("bias", norm.bias.detach().float().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x4 = x.unsqueeze(-1) if x.dim() == 3 else x  # [N, C, L] -> [N, C, L, 1]: same strides
        y = group_norm_act(x4, self.weight, self.bias, self.num_groups, self.eps, self.silu, self.unroll)[0]
        return y.squeeze(-1) if x.dim() == 3 else y


def fuse_group_norms(encoder: nn.Module) -> int:
    """Swaps the GroupNorms of a diffusers VAE ``Encoder`` for ``GroupNormAct`` in place: each
    ResNet block's norm1/norm2 with the SiLU after it, the output norm with ``conv_act``, and the
    attention blocks' norms. Returns how many were swapped.

    >>> from diffusers.models.autoencoders.vae import Encoder
    >>> enc = Encoder(block_out_channels=(32,), layers_per_block=1, norm_num_groups=8)
    >>> fuse_group_norms(enc)  # 2 in the down block, 4 + 1 in the mid block, the output norm
    8
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    count = 0
    for m in encoder.modules():
        if isinstance(m, ResnetBlock2D) and m.time_emb_proj is None and m.time_embedding_norm == "default":
            if isinstance(m.nonlinearity, nn.SiLU) and isinstance(m.norm1, nn.GroupNorm):
                m.norm1, m.norm2 = GroupNormAct(m.norm1, True), GroupNormAct(m.norm2, True)
                m.nonlinearity = nn.Identity()  # used only after the two norms when temb is None
                count += 2
        elif isinstance(m, Attention) and isinstance(m.group_norm, nn.GroupNorm):
            m.group_norm = GroupNormAct(m.group_norm, False)
            count += 1
    norm, act = getattr(encoder, "conv_norm_out", None), getattr(encoder, "conv_act", None)
    if isinstance(norm, nn.GroupNorm) and isinstance(act, nn.SiLU):
        encoder.conv_norm_out, encoder.conv_act = GroupNormAct(norm, True), nn.Identity()
        count += 1
    return count
