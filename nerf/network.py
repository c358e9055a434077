"""``--backbone vanilla`` (``-O2``): frequency encoding and a residual MLP, no CUDA at all."""

from __future__ import annotations

from .encoding import get_encoder
from .fast import NeRFSpeedConfig
from .network_base import FieldConfig, FieldNetwork
from .renderer import RendererConfig
from .representation import NeRFRepresentation


class NeRFNetwork(NeRFRepresentation, FieldNetwork):
    """Frequency encoding (12 octaves) + 5x64 MLP with residual LayerNorm blocks;
    autograd normals; the learning rate decays exponentially (see ``Trainer``)."""

    lr_decay = True

    def __init__(
        self,
        cfg: FieldConfig = FieldConfig(backbone="vanilla"),
        render: RendererConfig = RendererConfig(),
        speed: NeRFSpeedConfig = NeRFSpeedConfig(),
        hidden_dim: int = 64,
        num_layers: int = 5,
    ):
        encoder = get_encoder("frequency", input_dim=3, multires=12)
        super().__init__(
            cfg,
            render,
            speed,
            encoder,
            hidden_dim,
            num_layers,
            residual=True,
            normal_method=cfg.normal_method or "autograd",
            bg_multires=4,
        )
