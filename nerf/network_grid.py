"""``--backbone grid`` (the default): a hash-grid encoder feeding a small MLP (instant-ngp)."""

from __future__ import annotations

from .encoding import get_encoder
from .fast import NeRFSpeedConfig
from .network_base import FieldConfig, FieldNetwork
from .renderer import RendererConfig
from .representation import NeRFRepresentation


class NeRFNetwork(NeRFRepresentation, FieldNetwork):
    """Hash grid (``grid_levels`` x 2 features, table 2^``grid_log2_size``, base resolution
    ``grid_base``, finest ``grid_finest * bound``, smoothstep) + 3x64 MLP."""

    def __init__(
        self,
        cfg: FieldConfig = FieldConfig(),
        render: RendererConfig = RendererConfig(),
        speed: NeRFSpeedConfig = NeRFSpeedConfig(),
        hidden_dim: int = 64,
        num_layers: int = 3,
    ):
        encoder = get_encoder(
            "hashgrid",
            input_dim=3,
            num_levels=cfg.grid_levels,
            level_dim=2,
            base_resolution=cfg.grid_base,
            log2_hashmap_size=cfg.grid_log2_size,
            desired_resolution=int(cfg.grid_finest * render.bound),
            interpolation="smoothstep",
        )
        super().__init__(
            cfg, render, speed, encoder, hidden_dim, num_layers, normal_method=cfg.normal_method or "fd"
        )
