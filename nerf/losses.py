"""The training loss's weights (``LossConfig``) and its terms as pure functions."""

from __future__ import annotations

from dataclasses import dataclass

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
