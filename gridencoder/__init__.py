"""Multi-resolution hash-grid encoder with a CUDA kernel and a PyTorch twin.

``grid_encode`` (and ``GridEncoder``, which calls it) is the twin ``_torch_impl.grid_encode``
(which defines the semantics and carries the one typed, documented signature) wrapped by a
dispatch: it runs ``gridencoder/_cuda.py`` (which takes the same arguments) when its input lives
on a GPU, the extension builds and the kernels take the inputs, and the twin otherwise.
Set ``DREAMFUSION_GRIDENCODER=torch`` to force the twin everywhere.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import nn

from cuda_kernels.backend import CudaBackend

from . import _torch_impl
from ._torch_impl import level_layout

_backend = CudaBackend("gridencoder", "DREAMFUSION_GRIDENCODER")


def cuda_backend() -> ModuleType | None:
    """The CUDA backend module, built on first use, or None when it cannot be used."""
    return _backend.get()


def set_backend(name: str) -> None:
    """Use "torch" (the PyTorch twin everywhere) or "auto" (CUDA for GPU tensors when it builds)."""
    _backend.set(name)


# The public function: the twin (its typed signature and docs), run by the kernels for GPU inputs.
grid_encode = _backend.dispatch(_torch_impl.grid_encode, on="inputs")


class GridEncoder(nn.Module):
    """Hash-grid encoder of points in [-bound, bound]^D.

    Args:
        input_dim: D.
        num_levels: L levels, each giving ``level_dim`` features (output ``L * level_dim``).
        base_resolution: resolution of the coarsest level.
        log2_hashmap_size: at most 2^this table entries per level.
        desired_resolution: finest resolution; sets ``per_level_scale`` when given.
        interpolation: "linear" or "smoothstep" (smooth second derivatives for normals).
        agg_mode, soa: the CUDA kernels' layout choices (see ``grid_encode``); attributes that
            a benchmark may change between calls.

    >>> enc = GridEncoder(num_levels=4, base_resolution=4, log2_hashmap_size=10, desired_resolution=32)
    >>> enc(torch.rand(5, 3) * 2 - 1).shape
    torch.Size([5, 8])
    """

    def __init__(
        self,
        input_dim: int = 3,
        num_levels: int = 16,
        level_dim: int = 2,
        per_level_scale: float = 2.0,
        base_resolution: int = 16,
        log2_hashmap_size: int = 19,
        desired_resolution: int | None = None,
        align_corners: bool = False,
        interpolation: str = "smoothstep",
        init_std: float = 1e-4,
        agg_mode: int = 1,
        soa: bool = True,
    ):
        super().__init__()
        if desired_resolution is not None and num_levels > 1:
            per_level_scale = math.exp2(math.log2(desired_resolution / base_resolution) / (num_levels - 1))
        self.input_dim, self.num_levels, self.level_dim = input_dim, num_levels, level_dim
        self.per_level_scale, self.base_resolution = per_level_scale, base_resolution
        self.log2_hashmap_size = log2_hashmap_size
        self.align_corners, self.interpolation = align_corners, interpolation
        self.agg_mode, self.soa = agg_mode, soa
        self.output_dim = num_levels * level_dim
        self.offsets, self.points = level_layout(
            input_dim, num_levels, per_level_scale, base_resolution, log2_hashmap_size, align_corners
        )
        self.embeddings = nn.Parameter(torch.empty(self.offsets[-1], level_dim))
        nn.init.uniform_(self.embeddings, -init_std, init_std)

    def extra_repr(self) -> str:
        return (
            f"levels={self.num_levels}, level_dim={self.level_dim}, base={self.base_resolution}, "
            f"scale={self.per_level_scale:.4f}, table=2^{self.log2_hashmap_size}, "
            f"params={self.offsets[-1] * self.level_dim}, interpolation={self.interpolation}"
        )

    def _table(self, cuda: bool) -> torch.Tensor:
        """The embeddings, or under fp16 autocast without gradients (rendering frames) a cached
        float16 copy for the CUDA kernel: half the bytes per lookup, and the default 2^19 x 16
        table (32 MiB) then fits the GPU's L2 cache. Refreshed when the weights change."""
        emb = self.embeddings
        if not (
            cuda
            and not torch.is_grad_enabled()
            and torch.is_autocast_enabled("cuda")
            and torch.get_autocast_dtype("cuda") == torch.float16
        ):
            return emb
        if torch.cuda.is_current_stream_capturing():
            # A CUDA graph (--graph_render) replays after the weights change without this check:
            # it converts the table itself at every replay instead of reading a cached copy.
            return emb.detach().half()
        key = (emb._version, emb.data_ptr())
        cached = getattr(self, "_half", None)
        if cached is None or cached[0] != key:
            cached = (key, emb.detach().half())
            self._half = cached
        return cached[1]

    def forward(
        self,
        inputs: torch.Tensor,
        bound: float = 1.0,
        max_level: float | None = None,
        live: tuple[torch.Tensor, int] | None = None,
    ) -> torch.Tensor:
        """[..., D] points in [-bound, bound] to [..., L*level_dim] features.

        ``max_level`` is the fraction of levels in use (1 = all), for coarse-to-fine training.
        ``live``: (count [1] int32, period): the CUDA kernels compute only rows n with
        n % period < count and give the others zero features and no gradient (padding rows of
        a fixed-size graph replay); the twin computes every row.
        """
        shape = inputs.shape[:-1]
        x = ((inputs.reshape(-1, self.input_dim) + bound) / (2 * bound)).clamp(0, 1)
        levels = None if max_level is None else max(1, math.ceil(max_level * self.num_levels))
        cuda = x.is_cuda and cuda_backend() is not None
        # Under autocast the kernel writes the features in the autocast dtype directly: the MLP
        # would cast them anyway, and a float32 copy of [N, L*F] (and of its gradient) is memory
        # the fd normals' 7x samples make large.
        half = torch.get_autocast_dtype("cuda") if cuda and torch.is_autocast_enabled("cuda") else None
        out = grid_encode(
            x,
            self._table(cuda),
            self.offsets,
            self.points,
            self.per_level_scale,
            self.base_resolution,
            self.align_corners,
            self.interpolation,
            levels,
            out_dtype=half,
            live=live,
            agg_mode=self.agg_mode,
            soa=self.soa,
        )
        return out.reshape(*shape, self.output_dim)


__all__ = ["GridEncoder", "grid_encode", "level_layout", "cuda_backend", "set_backend"]
