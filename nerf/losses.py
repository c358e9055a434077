"""The training loss's weights (``LossConfig``) and the regularizers as pure functions.

Each function computes one unweighted term from tensors; the representation
(``nerf/representation.py``: ``NeRFRepresentation.regularizers``) weighs them with the
``LossConfig`` and the run's progress, and the Trainer sums them after the guidance loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.config import option


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms and regularizers (0 = off)."""

    lambda_guidance: float = option(1.0, "scale of the SDS gradient")
    lambda_entropy: float = option(
        1e-3, "binary entropy of per-sample weights, ramped in over the first half"
    )
    lambda_opacity: float = option(0.0, "mean squared opacity")
    lambda_orient: float = option(1e-2, "orientation loss (normals facing the camera)")
    lambda_tv: float = option(0.0, "total variation of hash-grid features")
    lambda_wd: float = option(0.0, "weight decay of hash-grid features")
    lambda_2d_normal_smooth: float = option(0.0, "TV of the rendered normal image")
    lambda_3d_normal_smooth: float = option(0.0, "|n(x) - n(x + N(0, 0.01))| on the surface")


def weight_entropy(
    weights: torch.Tensor,
    n_pruned: int | torch.Tensor = 0,
    n_padding: int | torch.Tensor = 0,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Mean binary entropy (bits) of per-sample weights [M] clamped to [eps, 1 - eps].

    ``n_pruned`` samples that were dropped with weight 0 (``--prune_samples``) count with their
    constant entropy, so the mean is the one over every marched sample; the last ``n_padding``
    rows of ``weights`` are padding (``--graph_render``) and do not count. Either count may be
    a device tensor (no sync).

    >>> float(weight_entropy(torch.tensor([0.5]))), float(weight_entropy(torch.tensor([0.5]), 1))
    (1.0, 0.5000902414321899)
    >>> round(float(weight_entropy(torch.tensor([0.5, 0.0]), 1, torch.tensor(1))), 6)  # a padding row
    0.50009
    """
    a = weights.float().clamp(eps, 1 - eps)
    h = -a * torch.log2(a) - (1 - a) * torch.log2(1 - a)
    h0 = -eps * math.log2(eps) - (1 - eps) * math.log2(1 - eps)
    # Padding rows have weight 0, so each added h0 to the sum.
    count = h.numel() + n_pruned - n_padding
    count = count.clamp(min=1) if isinstance(count, torch.Tensor) else max(count, 1)
    return (h.sum() + (n_pruned - n_padding) * h0) / count


def mean_square(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x**2`` in float32, any shape: the opacity term on ``weights_sum`` [B,N], the
    weight decay on hash-grid features [T,F].

    >>> float(mean_square(torch.tensor([1.0, 3.0])))
    5.0
    """
    return (x.float() ** 2).mean()


def image_tv(img: torch.Tensor) -> torch.Tensor:
    """Squared total variation of ``img`` [B,H,W,C]: the mean squared difference of vertical
    neighbours plus that of horizontal ones (2D normal smoothness on the normal image).

    >>> float(image_tv(torch.tensor([[[[0.0], [1.0]], [[0.0], [1.0]]]])))  # [1,2,2,1]
    1.0
    """
    return ((img[:, 1:] - img[:, :-1]) ** 2).mean() + ((img[:, :, 1:] - img[:, :, :-1]) ** 2).mean()


def surface_points(
    rays_o: torch.Tensor, rays_d: torch.Tensor, depth: torch.Tensor, weights_sum: torch.Tensor
) -> torch.Tensor:
    """[K,3] the expected surface points of the rays whose opacity exceeds 0.5 (no gradient to
    depth or opacity). rays_o, rays_d: [B,N,3]; depth (opacity-weighted), weights_sum: [B,N].

    >>> o, d = torch.zeros(1, 2, 3), torch.tensor([[[0.0, 0, 1], [1, 0, 0]]])
    >>> surface_points(o, d, torch.tensor([[1.8, 1.0]]), torch.tensor([[0.9, 0.1]])).tolist()
    [[0.0, 0.0, 2.0]]
    """
    ws = weights_sum.reshape(-1).detach()
    hit = ws > 0.5
    t = depth.reshape(-1).detach()[hit] / ws[hit]
    return rays_o.reshape(-1, 3)[hit] + rays_d.reshape(-1, 3)[hit] * t[:, None]


def normal_smoothness_3d(normal_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Mean ``|n(x) - n(x + N(0, 0.01))|`` over points ``x`` [K,3] (one ``randn`` draw).

    >>> float(normal_smoothness_3d(lambda p: torch.ones_like(p), torch.zeros(4, 3)))
    0.0
    """
    n1 = normal_fn(x)
    n2 = normal_fn(x + torch.randn_like(x) * 0.01)
    return (n1 - n2).abs().mean()


def grid_tv(
    encoder: Callable[[torch.Tensor, float], torch.Tensor],
    bound: float,
    cell: float,
    n: int = 4096,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Total variation of grid features: the mean squared difference of ``encoder(x, bound)``
    between ``n`` random points in the box and their neighbours one ``cell`` away along a random
    axis (draws ``rand`` then ``randint``).

    >>> round(float(grid_tv(lambda x, b: x.sum(-1, keepdim=True), 1.0, 0.5, n=8)), 6)
    0.25
    """
    x = (torch.rand(n, 3, device=device) * 2 - 1) * bound
    dx = F.one_hot(torch.randint(0, 3, (n,), device=device), 3).float() * cell
    return (encoder(x, bound) - encoder(x + dx, bound)).pow(2).mean()
