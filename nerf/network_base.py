"""The one backbone design shared by every ``--backbone``.

A backbone only chooses its encoder and MLP sizes (``network_grid.py``, ``network.py``);
everything else lives here once: the density activation and the density blob, albedo,
normals (finite differences, a 4-point tetrahedral stencil, or autograd), shading and the
background network. The speed layer's variants of the MLP head and the fd shading
(``nerf/fast/field.py``) are built from ``NeRFSpeedConfig`` and chosen in ``common_forward`` and
``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.config import option

from .encoding import FreqEncoder
from .fast import NeRFSpeedConfig
from .fast.field import FusedHead, FusedReluMLP
from .field_parts import MLP, SHADINGS, _central_difference, _shade, biased_softplus, trunc_exp
from .provider import safe_normalize
from .renderer import NeRFRenderer, RendererConfig


@dataclass(frozen=True)
class FieldConfig:
    """The NeRF field: backbone, encoder sizes, density, normals, background."""

    backbone: str = option("grid", "NeRF backbone", choices=["grid", "vanilla"])
    density_activation: str = option("exp", "density activation", choices=["exp", "softplus"])
    blob_density: float = option(5.0, "peak of the initial density blob")
    blob_radius: float = option(0.2, "radius of the initial density blob")
    bg_radius: float = option(1.4, "> 0: learn a background network on ray directions")
    normal_method: str | None = option(
        None,
        "normals: central differences (6 density passes), a tetrahedral stencil (4 passes, first "
        "order) or autograd (default: fd for grid, autograd for vanilla)",
        choices=["fd", "tetra", "autograd"],
    )
    grid_levels: int = option(16, "hash-grid levels")
    grid_log2_size: int = option(19, "log2 of the hash table size per level")
    grid_base: int = option(16, "coarsest hash-grid resolution")
    grid_finest: int = option(2048, "finest hash-grid resolution (times bound)")


class FieldNetwork(NeRFRenderer):
    """A NeRF field: encoder -> MLP -> (density logit, albedo logits), plus shading.

    Subclasses call ``super().__init__(cfg, render, speed, encoder, hidden_dim, num_layers, ...)``.
    """

    def __init__(
        self,
        cfg: FieldConfig,
        render: RendererConfig,
        speed: NeRFSpeedConfig,
        encoder: nn.Module,
        hidden_dim: int,
        num_layers: int,
        *,
        residual: bool = False,
        normal_method: str = "fd",
        bg_multires: int = 6,
        bg_hidden: int = 32,
    ):
        super().__init__(
            render, speed, density_thresh_scale=25 if cfg.density_activation == "softplus" else 1
        )
        mlp = FusedReluMLP if speed.fused_relu else MLP  # Linear + ReLU as one GEMM without gradients
        self.field_cfg = cfg
        self.encoder = encoder
        self.sigma_net = mlp(encoder.output_dim, 4, hidden_dim, num_layers, residual=residual)
        self.density_activation = cfg.density_activation
        self.blob_density, self.blob_radius = cfg.blob_density, cfg.blob_radius
        if normal_method not in ("fd", "tetra", "autograd"):
            raise ValueError(f"unknown normal method {normal_method!r}")
        self.normal_method = normal_method
        self.normal_eps = 1e-2
        self.merge_stencil_max = 2**17  # samples up to which forward() makes one field call
        # The MLP + density/albedo head and the fd shading of a merged call as autograd nodes
        # with hand-written backwards, or Triton kernels (--fused_mlp); None: the module path.
        self.fused_head: FusedHead | None = None
        if speed.fused_head:
            self.fused_head = FusedHead(bool(speed.fused_mlp), speed.pad_rows, speed.blob_in_kernel)
        self.max_level: float | None = None  # fraction of encoder levels in use
        if cfg.bg_radius > 0:
            self.encoder_bg = FreqEncoder(3, bg_multires)
            self.bg_net = mlp(self.encoder_bg.output_dim, 3, bg_hidden, 2)
        else:
            self.bg_net = None

    # --- density -----------------------------------------------------------------------
    def density_blob(self, x: torch.Tensor) -> torch.Tensor:
        """[N,3] -> [N] the density prior added to the logit (a centred Gaussian or cone)."""
        d = (x * x).sum(-1)
        if self.density_activation == "exp":
            return self.blob_density * torch.exp(-d / (2 * self.blob_radius**2))
        return self.blob_density * (1 - torch.sqrt(d + 1e-12) / self.blob_radius)

    def common_forward(
        self, x: torch.Tensor, live: tuple[torch.Tensor, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[N,3] -> sigma [N] (activated, >= 0) and albedo [N,3] in [0,1].

        live: (count [1] int32, period): rows r with r % period >= count are padding (of a
        fixed-size graph replay, ``--graph_render``); the CUDA and Triton kernels skip them
        (zeros, no gradient), other paths compute them. None: no padding.
        """
        if self.fused_head is not None and self.fused_head.applies(self, x):
            return self.fused_head.forward(self, x, live)  # the speed layer (nerf/fast/field.py)
        h = self.sigma_net(self.encoder(x, bound=self.bound, max_level=self.max_level))
        logit = h[..., 0].float() + self.density_blob(x.float())
        if self.density_activation == "exp":
            sigma = trunc_exp(logit)
        else:
            sigma = biased_softplus(logit)
        albedo = torch.sigmoid(h[..., 1:])
        return sigma, albedo

    def density(self, x: torch.Tensor, live_count: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """sigma [N] and albedo [N,3] at [N,3] points; live_count: [1] int32, rows from it on are
        padding (see ``common_forward``)."""
        live = None if live_count is None else (live_count, x.shape[0])
        sigma, albedo = self.common_forward(x, live)
        return {"sigma": sigma, "albedo": albedo}

    # --- normals -----------------------------------------------------------------------
    def _sigma(self, x: torch.Tensor, live: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
        return self.common_forward(x, live)[0]

    def normal(self, x: torch.Tensor, live: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
        """[N,3] -> [N,3] unit normals, the negated density gradient.

        "fd": central differences (6 extra density passes, error O(eps^2)); "tetra": a
        4-point tetrahedral stencil (4 passes, but first order: each component is off by eps
        times a mixed second derivative, e.g. eps * d2s/dydz for x); "autograd": exact
        gradient (a backward pass, with a graph when training).
        """
        if self.normal_method == "autograd":
            with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
                xg = x.detach().float().requires_grad_(True) if not x.requires_grad else x.float()
                sigma = self._sigma(xg)
                grad = torch.autograd.grad(sigma.sum(), xg, create_graph=self.training)[0]
        else:
            grad = self._stencil_gradient(self._sigma(self._stencil_points(x), live))
        return safe_normalize(-torch.nan_to_num(grad))

    def _stencil_offsets(self, device) -> torch.Tensor:
        """[K,3] offsets of the "fd" (K=6: +x,+y,+z,-x,-y,-z) or "tetra" (K=4) stencil, built
        once per device, method and eps (four tensor ops saved per training step)."""
        key = (torch.device(device), self.normal_method, self.normal_eps)
        cache = self.__dict__.setdefault("_stencil_cache", {})
        if key not in cache:
            e = self.normal_eps
            eye = torch.eye(3, device=device)
            if self.normal_method == "fd":
                cache[key] = torch.cat([eye, -eye]) * e
            else:
                # Tetrahedron vertices (1,-1,-1), (-1,-1,1), (-1,1,-1), (1,1,1) as 1 - 2 * (where
                # -1), built from eye: a tensor from a list would be a host->device copy (a sync).
                minus = torch.cat([1 - eye[[0, 2, 1]], torch.zeros_like(eye[:1])])
                cache[key] = (1 - 2 * minus) * e
        return cache[key]

    def _stencil_points(self, x: torch.Tensor) -> torch.Tensor:
        """[N,3] -> [K*N,3] stencil points (offset-major), in fp32 and clamped to the box.

        Positions and differences stay in fp32; the density MLP runs in the caller's autocast
        dtype (fp16 tensor cores under -O: the fd pass is 6x the samples, and in fp32 it cost
        more than the rest of the render; normals stay within 1e-2 of fp32, see
        tests/test_cuda_kernels.py).
        """
        offs = self._stencil_offsets(x.device)
        return (x.float()[None] + offs[:, None]).reshape(-1, 3).clamp(-self.bound, self.bound)

    def _stencil_gradient(self, s: torch.Tensor) -> torch.Tensor:
        """[K*N] densities at ``_stencil_points`` -> [N,3] density gradient estimate."""
        e = self.normal_eps
        if self.normal_method == "fd":
            return _central_difference(s, e)
        v = self._stencil_offsets(s.device) / e
        return (s.reshape(4, -1, 1) * v[:, None, :]).sum(0) / (4 * e)

    # --- shading -----------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        d: torch.Tensor,
        l: torch.Tensor | None = None,
        ratio: float = 1.0,
        shading: str = "albedo",
        need_normal: bool = False,
        live_count: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Density, shaded colour and normals at [N,3] points.

        Args:
            d: [N,3] view directions (unused: the colour does not depend on view).
            l: [N,3], [1,3] or [3] light direction (lambertian/textureless).
            ratio: ambient ratio; lambertian = ratio + (1 - ratio) * max(0, n.l).
            shading: one of "albedo", "lambertian", "textureless", "normal".
            need_normal: compute normals even for albedo shading (orientation loss, normal maps).
            live_count: [1] int32: rows from it on are padding (``common_forward``), or None.

        Returns:
            sigma [N], color [N,3], normal [N,3] or None.
        """
        if shading not in SHADINGS:
            raise ValueError(f"unknown shading {shading!r}")
        if l is None and shading in ("lambertian", "textureless"):
            raise ValueError(f"{shading} shading needs a light direction")
        normal = None
        wants = shading != "albedo" or need_normal
        live = None if live_count is None else (live_count, x.shape[0])  # stencil rows too
        if wants and self.normal_method != "autograd" and x.shape[0] <= self.merge_stencil_max:
            # Few samples: they and their stencil points go through the field in one call (one
            # hash-grid forward/backward, half the launches): a 64x64 lambertian render of a
            # fitted scene (98k samples) took 10.1-10.9 ms instead of 12.5-13.3 on the H100.
            N = x.shape[0]
            sigma_all, albedo_all = self.common_forward(torch.cat([x.float(), self._stencil_points(x)]), live)
            if self.fused_head is not None and self.normal_method == "fd":  # nerf/fast/field.py
                light = None if l is None else l.float().reshape(-1, 3)
                shade = self.fused_head.fd_shading(sigma_all, albedo_all, ratio)
                return shade(sigma_all, albedo_all, light, ratio, self.normal_eps, shading, N)
            sigma, albedo = sigma_all[:N], albedo_all[:N]
            normal = safe_normalize(-torch.nan_to_num(self._stencil_gradient(sigma_all[N:])))
        else:
            # Many samples (a fresh, foggy field): two calls. One call was no faster in
            # bench_sds and raised its peak memory by 0.19 GiB (5.39 -> 5.58 GiB allocated).
            sigma, albedo = self.common_forward(x, live)
            if wants:
                normal = self.normal(x, live)
        return sigma, _shade(albedo, normal, l, ratio, shading)[0], normal

    def background(self, d: torch.Tensor) -> torch.Tensor:
        """[N,3] ray directions -> [N,3] background colour in [0,1]."""
        return torch.sigmoid(self.bg_net(self.encoder_bg(d)))

    # --- optimisation ------------------------------------------------------------------
    encoder_lr_mult = 10.0  # hash tables learn faster than the MLP (instant-ngp practice)

    def get_params(self, lr: float) -> list[dict]:
        groups = [{"params": self.sigma_net.parameters(), "lr": lr}]
        enc = list(self.encoder.parameters())
        if enc:
            groups.append({"params": enc, "lr": lr * self.encoder_lr_mult})
        if self.bg_net is not None:
            groups.append({"params": self.bg_net.parameters(), "lr": lr})
        return groups
