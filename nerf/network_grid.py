"""``--backbone grid`` (the default): a hash-grid encoder feeding a small MLP (instant-ngp)."""

from __future__ import annotations

from .encoding import get_encoder
from .network_base import FieldNetwork


class NeRFNetwork(FieldNetwork):
    """Hash grid (``--grid_levels`` x 2 features, table 2^``--grid_log2_size``, base
    resolution ``--grid_base``, finest ``--grid_finest * bound``, smoothstep) + 3x64 MLP."""

    def __init__(self, opt, hidden_dim: int = 64, num_layers: int = 3):
        encoder = get_encoder(
            "hashgrid",
            input_dim=3,
            num_levels=opt.grid_levels,
            level_dim=2,
            base_resolution=opt.grid_base,
            log2_hashmap_size=opt.grid_log2_size,
            desired_resolution=int(opt.grid_finest * opt.bound),
            interpolation="smoothstep",
        )
        super().__init__(opt, encoder, hidden_dim, num_layers, normal_method=opt.normal_method or "fd")
