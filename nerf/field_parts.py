"""The field's building blocks: the density activations, the MLP, shading and the central
difference of a density stencil. Shared by the reference field (``nerf/network_base.py``) and
its speed variants (``nerf/fast/field.py``), which both build on them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _TruncExp(torch.autograd.Function):
    """exp(x) in fp32 whose backward is clamped at exp(15), so large logits cannot blow up."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.exp(x.clamp(max=15))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return _TruncExp.apply(x)


def biased_softplus(x: torch.Tensor, bias: float = 0.0) -> torch.Tensor:
    return F.softplus(x - bias)


class ResBlock(nn.Module):
    """Linear + LayerNorm with a skip connection and SiLU (the vanilla backbone's block)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return F.silu(x + self.norm(self.dense(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU (or residual blocks in the middle)."""

    def __init__(self, dim_in: int, dim_out: int, dim_hidden: int, num_layers: int, residual: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_layers):
            first, last = i == 0, i == num_layers - 1
            if residual and not first and not last:
                layers.append(ResBlock(dim_hidden))
            else:
                layers.append(nn.Linear(dim_in if first else dim_hidden, dim_out if last else dim_hidden))
        self.layers = nn.ModuleList(layers)
        self.residual = residual

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            hidden = i != len(self.layers) - 1 and isinstance(layer, nn.Linear)
            x = layer(x)
            if hidden:
                x = F.silu(x) if self.residual else F.relu(x, inplace=True)
        return x


def _shade(
    albedo: torch.Tensor, normal: torch.Tensor | None, l: torch.Tensor | None, ratio: float, shading: str
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Colour [N,3] of a shading, and for lambertian/textureless also lam [N] (ambient plus
    diffuse factor) and n.l [N]: ``lam = ratio + (1 - ratio) * max(0, n.l)``."""
    if shading == "albedo":
        return albedo, None, None
    if shading == "normal":
        return (normal + 1) / 2, None, None
    dot = (normal * l).sum(-1)
    lam = ratio + (1 - ratio) * dot.clamp(min=0)
    return (lam[:, None].expand(-1, 3) if shading == "textureless" else albedo * lam[:, None]), lam, dot


def _central_difference(s: torch.Tensor, eps: float) -> torch.Tensor:
    """[6*N] densities at the +x,+y,+z,-x,-y,-z offsets (offset-major) -> [N,3] gradient."""
    s = s.reshape(6, -1)
    return ((s[:3] - s[3:]) / (2 * eps)).t()


SHADINGS = ("albedo", "lambertian", "textureless", "normal")
