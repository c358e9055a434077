"""Stable Diffusion's speed layer: opt-in paths (CUDA graphs, torch.compile, ahead-of-time
traced UNets, fused kernels) that compute what the eager reference in ``sd_utils.py`` does.

Every lever is a field of ``SDSpeedConfig``; with all of them off the prior runs the
reference computation alone. ``-O`` turns on the ones measured faster (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import option


@dataclass(frozen=True)
class SDSpeedConfig:
    """Speed levers of the diffusion prior (CUDA only; on a CPU they are ignored)."""

    unet_graph: bool | None = option(
        None,
        "replay the UNet's CFG call from a CUDA graph per input shape [default: on with -O, else off]",
        tristate=True,
    )
    vae_graph: bool | None = option(
        None,
        "replay the VAE encoder's forward and backward from CUDA graphs [default: on with -O, else off]",
        tristate=True,
    )
    compile_vae: bool | None = option(
        None,
        "torch.compile the VAE encoder (about 30 s on first use) [default: on with -O, else off]",
        tristate=True,
    )
    channels_last: bool | None = option(
        None,
        "UNet weights and inputs in channels_last memory format [default: on with -O, else off]",
        tristate=True,
    )
    vae_channels_last: bool = option(
        False, "VAE encoder weights and inputs in channels_last on the graphed/compiled encoder path"
    )
    vae_fused_gn: bool | None = option(
        None,
        "the VAE encoder's GroupNorm + SiLU pairs as our CUDA kernels (implies --vae_channels_last) "
        "[default: on with -O, else off]",
        tristate=True,
    )
    unet_fused_qkv: bool | None = option(
        None,
        "one GEMM for the q/k/v projections of each UNet attention [default: on with -O, else off]",
        tristate=True,
    )
    compile_unet: bool | None = option(
        None,
        "torch.compile the UNet (about a minute on first use, seconds from torch's compile cache) "
        "[default: on with -O, else off]",
        tristate=True,
    )
    unet_traced: str = option(
        "auto",
        "UNet compiled ahead of time by trace.py: auto loads a matching one from "
        "~/.cache/dreamfusion/unet_traced, PATH loads that .pt2, off never loads one",
        metavar="auto|off|PATH",
    )
