"""What the Trainer needs from the thing being optimised, and the NeRF's implementation of it.

``Representation`` is the interface (a NeRF now, a DMTet mesh later); ``NeRFRepresentation``
implements it for the fields of ``nerf/network.py`` and ``nerf/network_grid.py`` on top of
``NeRFRenderer.render`` (``class NeRFNetwork(NeRFRepresentation, FieldNetwork)``). The
regularizers themselves are pure functions in ``nerf/losses.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from .fast import NeRFSpeedConfig
from .losses import (
    LossConfig,
    grid_tv,
    image_tv,
    mean_square,
    normal_smoothness_3d,
    surface_points,
    weight_entropy,
)
from .mesh import MeshConfig
from .network_base import FieldConfig
from .provider import safe_normalize
from .renderer import RendererConfig

Cameras = dict[str, Any]  # a batch of cameras: nerf.provider.NeRFDataset's batches
Render = dict[str, Any]  # what Representation.render_batch returns


@runtime_checkable
class Representation(Protocol):
    """The thing being optimised, as the Trainer sees it. It is also a ``torch.nn.Module``
    (``parameters``, ``train``/``eval``, ``to``, ``state_dict``/``load_state_dict``).

    Light and background belong to the representation's ``render_batch``: the background
    network is part of it (a DMTet mesh keeps one too), and it alone knows how a light and a
    background enter its render. A DMTet implementation draws them with the same
    ``random_light_and_background`` as the NeRF, so both stages see the same distribution.

    Everything random draws from torch's global generator, in the order each method states;
    the Trainer's calls come in a fixed order, so a run is reproducible from its seed.
    """

    lr_decay: bool  # the learning rate decays 10x over the run (else constant)
    state_optional: tuple[str, ...]  # prefixes of state keys a checkpoint may lack

    def render_batch(
        self,
        data: Cameras,
        *,
        shading: str = ...,
        ambient_ratio: float = ...,
        need_normal: bool = ...,
        training: bool = ...,
    ) -> Render:
        """Render a batch of cameras, with gradients unless called under ``no_grad``. Defaults:
        albedo shading, ambient ratio 1, normals only where the shading needs them, inference.

        ``data``: a batch of ``nerf.provider.NeRFDataset`` (``rays_o``/``rays_d`` [B,H*W,3],
        ``poses`` [B,4,4], ``intrinsics``, ``H``, ``W``; the guidance's camera keys).
        ``shading``: "albedo", "lambertian", "textureless" or "normal".
        With ``training``: a random light near each camera and a random background (one
        ``randn`` of [B,3], then the background's draws), then the render's own draws
        (perturbed samples); without: no light, the learnt (or white) background, no
        perturbation, rays in chunks as memory requires.

        Returns ``rgb`` [B,3,H,W] (composited on the background), ``opacity`` [B,1,H,W],
        ``depth`` [B,1,H,W] (opacity-weighted: divide by opacity for the surface depth),
        ``normal`` [B,3,H,W] in [-1,1] times opacity (when ``need_normal`` or the shading
        needs normals), optionally ``complete`` (0-d bool tensor: False when the render lost
        samples and the step must be skipped), and what ``regularizers`` needs."""
        ...

    def regularizers(
        self,
        out: Render,
        data: Cameras,
        losses: LossConfig,
        *,
        progress: float,
        elapsed: float,
    ) -> dict[str, torch.Tensor]:
        """The weighted regularizer terms of a training render ``out`` of ``data``: name -> 0-d
        tensor, in a fixed order, terms with weight 0 left out. ``progress``: fraction of the
        run's schedule done (``--exp_start_iter`` .. ``--exp_end_iter``); ``elapsed``: steps
        done / ``--iters``."""
        ...

    def get_params(self, lr: float) -> list[dict]:
        """Parameter groups for an optimiser at base learning rate ``lr`` (stable-dreamfusion's
        name); a group may scale ``lr`` (a hash grid learns 10x faster)."""
        ...

    def before_step(self, step: int, progress: float, *, progressive_level: bool = False) -> None:
        """Refresh what the representation keeps beside its parameters before training step
        ``step`` (an occupancy grid, the coarse-to-fine level at ``progress``); runs under the
        run's autocast."""
        ...

    def stats(self) -> dict[str, float]:
        """Scalars for the training log (e.g. ``occupancy``); may sync with the device."""
        ...

    def export_mesh(
        self, folder: str | os.PathLike, cfg: MeshConfig, *, progress: bool = False
    ) -> dict[str, Path]:
        """Write the current shape as a textured mesh into ``folder``: {kind: path} written."""
        ...


def random_light_and_background(
    data: dict[str, Any], has_bg_net: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A training render's light and background: a light direction [B,3] near each camera
    (``randn``), then with a background network a coin flip (``rand(())``) between it (None)
    and one random solid colour per view [B,1,3] (``rand``).

    >>> data = {"poses": torch.eye(4).expand(2, 4, 4), "rays_o": torch.zeros(2, 1, 3)}
    >>> light, bg = random_light_and_background(data, has_bg_net=False)
    >>> light.shape, bg.shape
    (torch.Size([2, 3]), torch.Size([2, 1, 3]))
    """
    campos = data["poses"][:, :3, 3]
    light_d = safe_normalize(campos + torch.randn_like(campos))
    if has_bg_net and torch.rand(()).item() > 0.5:
        return light_d, None  # the background network
    B = data["rays_o"].shape[0]
    return light_d, torch.rand(B, 1, 3, device=data["rays_o"].device)


class NeRFRepresentation:
    """``Representation`` for a ``FieldNetwork`` (mixed in before it: it uses the field's
    ``render``, ``normal``, ``encoder``, occupancy grid and configs)."""

    state_optional: tuple[str, ...] = ("encoder_bg",)  # no parameters; older checkpoints lack it

    def render_batch(
        self,
        data: dict[str, Any],
        *,
        shading: str = "albedo",
        ambient_ratio: float = 1.0,
        need_normal: bool = False,
        training: bool = False,
    ) -> dict[str, Any]:
        """``Representation.render_batch``; also ``render``: the dict of ``NeRFRenderer.render``
        ([B,H*W,...] per ray, ``weights`` per sample, ``loss_orient``) for ``regularizers``.

        >>> from nerf.fields import build_field
        >>> from nerf.provider import CameraConfig, NeRFDataset
        >>> field = build_field(FieldConfig(grid_levels=2, grid_log2_size=8))
        >>> data = NeRFDataset(CameraConfig(h=4, w=4), type="train", size=1).train_batch()
        >>> out = field.render_batch(data, shading="lambertian", training=True)
        >>> out["rgb"].shape, out["opacity"].shape, out["normal"].shape
        (torch.Size([1, 3, 4, 4]), torch.Size([1, 1, 4, 4]), torch.Size([1, 3, 4, 4]))
        """
        rays_o, rays_d = data["rays_o"], data["rays_d"]
        B, H, W = rays_o.shape[0], data["H"], data["W"]
        if training:
            light_d, bg_color = random_light_and_background(data, self.bg_net is not None)
            kw = dict(light_d=light_d, bg_color=bg_color, perturb=True)
        else:  # no light, the learnt (or white) background, rays in chunks
            kw = dict(bg_color=None, perturb=False, max_ray_batch=self.cfg.max_ray_batch)
        out = self.render(
            rays_o, rays_d, ambient_ratio=ambient_ratio, shading=shading, need_normal=need_normal, **kw
        )
        res = {
            "rgb": out["image"].reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous(),
            "opacity": out["weights_sum"].reshape(B, 1, H, W),
            "depth": out["depth"].reshape(B, 1, H, W),
            "render": out,
        }
        if "normal_image" in out:
            res["normal"] = out["normal_image"].reshape(B, H, W, 3).permute(0, 3, 1, 2)
        if "complete" in out:
            res["complete"] = out["complete"]
        return res

    def regularizers(
        self,
        out: dict[str, Any],
        data: dict[str, Any],
        losses: LossConfig,
        *,
        progress: float,
        elapsed: float,
    ) -> dict[str, torch.Tensor]:
        """``Representation.regularizers``, in this order: entropy of the sample weights (ramped
        in over the first half of ``elapsed``), opacity, orientation, 2D normal TV, 3D normal
        smoothness (``randn``), grid weight decay, grid TV (ramped in over the first half of
        ``progress``; ``rand``, ``randint``)."""
        r, parts = out["render"], {}
        if losses.lambda_entropy > 0 and "weights" in r:
            entropy = weight_entropy(r["weights"], r.get("n_pruned", 0), r.get("n_padding", 0))
            parts["entropy"] = losses.lambda_entropy * min(1.0, 2 * elapsed) * entropy
        if losses.lambda_opacity > 0:
            parts["opacity"] = losses.lambda_opacity * mean_square(r["weights_sum"])
        if losses.lambda_orient > 0 and "loss_orient" in r:
            parts["orient"] = losses.lambda_orient * r["loss_orient"]
        if losses.lambda_2d_normal_smooth > 0 and "normal_image" in r:
            B, H, W = data["rays_o"].shape[0], data["H"], data["W"]
            tv = image_tv(r["normal_image"].reshape(B, H, W, 3))
            parts["normal_2d"] = losses.lambda_2d_normal_smooth * tv
        if losses.lambda_3d_normal_smooth > 0:
            x = surface_points(data["rays_o"], data["rays_d"], r["depth"], r["weights_sum"])
            if x.shape[0] > 0:
                parts["normal_3d"] = losses.lambda_3d_normal_smooth * normal_smoothness_3d(self.normal, x)
        enc = self.encoder
        if losses.lambda_wd > 0 and hasattr(enc, "embeddings"):
            parts["wd"] = losses.lambda_wd * mean_square(enc.embeddings)
        if losses.lambda_tv > 0 and hasattr(enc, "embeddings"):
            # Neighbours one finest cell apart.
            cell = 2 * self.bound / self.field_cfg.grid_finest
            tv = grid_tv(enc, self.bound, cell, device=data["rays_o"].device)
            parts["tv"] = losses.lambda_tv * min(1.0, 2 * progress) * tv
        return parts

    def before_step(self, step: int, progress: float, *, progressive_level: bool = False) -> None:
        """The occupancy grid's refresh every ``--update_extra_interval`` steps (``--cuda_ray``;
        its draws), then the encoder levels in use, ``min(1, 0.25 + 2 * progress)``, with
        ``progressive_level`` (the refresh sees the previous step's levels)."""
        if self.cuda_ray and step % self.cfg.update_extra_interval == 0:
            self.update_extra_state()
        if progressive_level:
            self.max_level = min(1.0, 0.25 + 2.0 * progress)

    def stats(self) -> dict[str, float]:
        """The occupied fraction of the occupancy grid (``--cuda_ray``)."""
        return {"occupancy": self.occupancy()} if self.cuda_ray else {}

    def export_mesh(
        self, folder: str | os.PathLike, cfg: MeshConfig, *, progress: bool = False
    ) -> dict[str, Path]:
        """Marching cubes on the density, the albedo baked into a texture (``nerf/mesh.py``)."""
        from .mesh import export_mesh

        def density_fn(x):
            return self.density(x)["sigma"].float()

        def albedo_fn(x):
            return self.density(x)["albedo"].float()

        return export_mesh(
            density_fn,
            albedo_fn,
            folder,
            bound=self.bound,
            resolution=cfg.mcubes_resolution,
            density_thresh=self.density_thresh,
            mean_density=float(self.mean_density) if self.cuda_ray else None,
            decimate_target=int(cfg.decimate_target),
            texture_size=cfg.texture_size,
            formats=tuple(cfg.mesh_format),
            device=self.aabb.device,
            progress=progress,
        )


def nerf_configs(ns: Any = None, **kw: Any) -> tuple[FieldConfig, RendererConfig, NeRFSpeedConfig]:
    """(FieldConfig, RendererConfig, NeRFSpeedConfig) for ``nerf.fields.build_field``, from
    flat option values named as on the command line (each key must belong to one of the three),
    or from parsed options ``ns`` (``main.parse_args``; a Namespace or a dict) updated by ``kw``.

    >>> field, render, speed = nerf_configs(grid_levels=4, cuda_ray=True)
    >>> field.grid_levels, render.cuda_ray
    (4, True)
    """
    import dataclasses

    from common.config import from_namespace

    classes = (FieldConfig, RendererConfig, NeRFSpeedConfig)
    known = {f.name for c in classes for f in dataclasses.fields(c)}
    if ns is not None:
        values = ns if isinstance(ns, dict) else vars(ns)
        kw = {**{k: v for k, v in values.items() if k in known}, **kw}
    unknown = set(kw) - known
    if unknown:
        raise TypeError(f"not a field, renderer or speed option: {sorted(unknown)}")
    return tuple(from_namespace(c, kw) for c in classes)
