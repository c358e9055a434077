"""What the Trainer needs from any prior, and the registry ``--guidance`` picks from.

A guidance model scores renders: given a batch of renders and the cameras they were taken
from, ``train_step`` returns a loss whose gradient pulls the renders towards what the prior
believes (Score Distillation Sampling for diffusion priors). It prepares its conditioning
(prompt embeddings, a reference image) once, caches what is costly, and chooses the
conditioning of each view itself (the view-dependent prompt policy). It imports nothing of
``nerf/``: cameras reach it as a dict of tensors (``CAMERA_KEYS``).

Stable Diffusion (``guidance/sd_utils.py``) and the built-in prior (the same class on the
shipped weights, ``--sd_version builtin``) implement it now; DeepFloyd IF, Zero-1-to-3 and
CLIP plug in the same way: a file with a config dataclass and a class, one ``register``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from common.config import option

from .views import VIEW_POLICIES

# What a batch of cameras carries for the guidance (``nerf.provider.NeRFDataset`` makes them):
# polar, azimuth, radius, fovy [B] (degrees), dir [B] int64 view classes (views.FRONT ...),
# view_weights [B,5] blend weights over views.INTERP_VIEWS. A training batch carries more keys
# (rays, poses): a guidance ignores them.
CAMERA_KEYS = ("polar", "azimuth", "radius", "fovy", "dir", "view_weights")


@dataclass(frozen=True)
class GuidanceConfig:
    """The prior's conditioning, shared by every guidance model."""

    guidance: tuple[str, ...] = option(("SD",), "guidance models", nargs="*", choices=["SD"])
    text: str | None = option(None, "text prompt (required unless --test)")
    negative: str = option("", "negative prompt, used as the unconditional branch of CFG")
    view_prompt: str = option(
        "interp",
        "view-dependent prompting: blend front/side/back embeddings by azimuth, append the discrete "
        "view suffix, or use the prompt alone",
        choices=list(VIEW_POLICIES),
    )
    guidance_scale: float = option(100.0, "classifier-free guidance scale")
    t_range: tuple[float, float] = option(
        (0.02, 0.98), "fractions of the diffusion timesteps t is drawn from"
    )


@runtime_checkable
class Guidance(Protocol):
    """A prior that scores renders. What the Trainer calls, and what each call promises."""

    def prepare(self, cond: GuidanceConfig) -> None:
        """Keep ``cond`` for ``train_step`` (guidance scale, view policy), compute the
        conditioning once (prompt embeddings, disk-cached where costly) and free what is only
        needed for it (a text encoder). Draws nothing from the run's RNG. Without a prompt
        (``cond.text`` None: a test-only run) nothing is computed."""

    def train_step(
        self,
        pred_rgb: torch.Tensor,
        cameras: dict[str, torch.Tensor],
        *,
        as_latent: bool = False,
        grad_scale: float = 1.0,
        save_guidance_path: str | None = None,
    ) -> torch.Tensor:
        """The loss of renders ``pred_rgb`` [B,3,H,W] in [0,1] (or [B,4,H,W] normal + mask with
        ``as_latent``) seen from ``cameras`` (``CAMERA_KEYS``, [B] each; other keys ignored),
        conditioned per view by the prepared policy (``views.view_embeddings``): a scalar whose
        gradient with respect to the renders is the prior's update times ``grad_scale``. With
        ``save_guidance_path`` it also writes a preview strip (render, noisy, x0 estimate)."""
        ...


# name -> (its config classes, builder(*configs, cond=, device=, precision=) -> Guidance)
Builder = Callable[..., Guidance]
REGISTRY: dict[str, tuple[tuple[type, ...], Builder]] = {}


def register(name: str, config_classes: tuple[type, ...], builder: Builder) -> None:
    """Make ``--guidance name`` build ``builder(*configs, cond=, device=, precision=)``, one
    config per class in ``config_classes`` (their fields become command-line options)."""
    REGISTRY[name] = (tuple(config_classes), builder)


def build(
    name: str, configs: tuple[Any, ...], cond: GuidanceConfig, device: torch.device, precision: str
) -> Guidance:
    """The guidance model ``name`` (``REGISTRY``) from its configs."""
    if name not in REGISTRY:
        raise ValueError(f"unknown guidance {name!r} (known: {', '.join(REGISTRY)})")
    return REGISTRY[name][1](*configs, cond=cond, device=device, precision=precision)
