"""Input encoders behind one interface: ``encoder(x, bound, max_level) -> [N, output_dim]``.

``max_level`` is the fraction of levels (hash grid) or frequency bands in use, for
coarse-to-fine training (``--progressive_level``); None means all.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gridencoder import GridEncoder


class FreqEncoder(nn.Module):
    """Positional encoding ``[x, sin(2^k x), cos(2^k x)]`` for k < ``multires``.

    >>> FreqEncoder(3, 4)(torch.zeros(2, 3)).shape
    torch.Size([2, 27])
    """

    def __init__(self, input_dim: int = 3, multires: int = 6, include_input: bool = True):
        super().__init__()
        self.input_dim, self.multires, self.include_input = input_dim, multires, include_input
        self.output_dim = input_dim * (int(include_input) + 2 * multires)
        self.register_buffer("freqs", 2.0 ** torch.arange(multires, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor, bound: float = 1.0, max_level: float | None = None) -> torch.Tensor:
        xf = x[..., None, :] * self.freqs[:, None]  # [..., K, D]
        enc = torch.cat([torch.sin(xf), torch.cos(xf)], -1)  # [..., K, 2D]
        if max_level is not None and max_level < 1:
            bands = max(1, math.ceil(max_level * self.multires))
            enc = enc * (torch.arange(self.multires, device=x.device) < bands).to(enc.dtype)[:, None]
        enc = enc.flatten(-2)
        return torch.cat([x, enc], -1) if self.include_input else enc


def get_encoder(kind: str, **kwargs) -> nn.Module:
    """Build an encoder by name: "frequency" or "hashgrid" (kwargs go to its constructor)."""
    if kind == "frequency":
        return FreqEncoder(**kwargs)
    if kind == "hashgrid":
        return GridEncoder(**kwargs)
    raise ValueError(f"unknown encoder {kind!r}")
