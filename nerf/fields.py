"""The representation registry: ``--backbone`` picks the field.

Its own module because it imports every backbone, and each backbone builds on
``nerf/network_base.py``.
"""

from __future__ import annotations

from . import network, network_grid
from .fast import NeRFSpeedConfig
from .network_base import FieldConfig, FieldNetwork
from .renderer import RendererConfig

BACKBONES = {"grid": network_grid.NeRFNetwork, "vanilla": network.NeRFNetwork}


def build_field(
    cfg: FieldConfig, render: RendererConfig = RendererConfig(), speed: NeRFSpeedConfig = NeRFSpeedConfig()
) -> FieldNetwork:
    """The NeRF of ``cfg.backbone``: "grid" (``network_grid.py``) or "vanilla" (``network.py``).

    >>> import torch
    >>> field = build_field(FieldConfig(grid_levels=2, grid_log2_size=8))
    >>> field.density(torch.zeros(2, 3))["sigma"].shape
    torch.Size([2])
    """
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {cfg.backbone!r} (known: {', '.join(BACKBONES)})")
    return BACKBONES[cfg.backbone](cfg, render, speed)
