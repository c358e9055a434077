"""Multi-resolution hash-grid encoder with a CUDA kernel and a PyTorch twin.

``grid_encode`` (and ``GridEncoder``, which calls it) runs ``gridencoder/_cuda.py`` when its
input lives on a GPU, the extension builds and the kernels take the inputs, and
``_torch_impl.grid_encode`` otherwise (which defines the semantics, see there).
Set ``DREAMFUSION_GRIDENCODER=torch`` to force the twin everywhere.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import Tensor, nn

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


def grid_encode(
    inputs: Tensor,
    embeddings: Tensor,
    offsets: list[int],
    points: list[int],
    per_level_scale: float,
    base_resolution: int,
    align_corners: bool = False,
    interpolation: str = "linear",
    max_level: int | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    live: tuple[Tensor, int] | None = None,
    agg_mode: int = 1,
    soa: bool = True,
) -> Tensor:
    """Encode points with a multi-resolution grid (``_torch_impl``'s docstring: the layout).

    Args:
        inputs: [N,D] coordinates in [0,1], float32 (float64 for gradcheck; float16/bfloat16
            are computed in float32).
        embeddings: [T,F] all levels' tables, level ``l`` at rows ``offsets[l]:offsets[l+1]``
            (float32, float16 or bfloat16; float64 with float64 inputs).
        offsets, points: [L+1] and [L] from ``level_layout``.
        per_level_scale, base_resolution: the levels' scales (see ``_torch_impl``).
        align_corners: lattice points on the box's corners.
        interpolation: "linear" or "smoothstep".
        max_level: levels >= max_level give zeros (None: all levels).
        out_dtype: CUDA only: the features' dtype: the table's (None), or float16/bfloat16 for
            a float32 table (what autocast would cast them to: interpolated in float32, rounded
            once, and their gradient read in that dtype; saves the cast and its memory).
        live: CUDA only: (count [1] int32 on the GPU, period): only rows n with n % period <
            count are computed; the others give zero features and pass no gradient (padding
            rows of a fixed-size CUDA graph replay). None: every row. The twin computes every row.
        agg_mode: CUDA only: 1 (the default): a warp first sums the embedding-gradient atomics
            of consecutive lanes on the same table row (samples of one ray share cells at
            coarse levels); 0: every atomic is issued. The same gradients up to rounding;
            ``scripts/bench_render.py --kernel_variants`` times both.
        soa: CUDA only: True (the default): features computed as [L*F, N] (a warp's stores
            coalesce) and returned as the transposed [N, L*F] view (the Linear layers after it
            take the transposed layout as is); False: computed as [N, L*F].

    Returns:
        [N, L*F] features, level-major (level 0's F features first), in the embeddings' dtype
        (or ``out_dtype``); differentiable with respect to both ``embeddings`` and ``inputs``.

    >>> off, pts = level_layout(3, 2, 2.0, 4, 19, align_corners=True)
    >>> emb = torch.arange(off[-1], dtype=torch.float32)[:, None]
    >>> grid_encode(torch.zeros(1, 3), emb, off, pts, 2.0, 4, align_corners=True).tolist()
    [[0.0, 64.0]]
    """
    args = (
        inputs,
        embeddings,
        offsets,
        points,
        per_level_scale,
        base_resolution,
        align_corners,
        interpolation,
        max_level,
    )
    if inputs.is_cuda:
        cuda = cuda_backend()
        if cuda is not None:
            out = cuda.grid_encode(*args, out_dtype=out_dtype, live=live, agg_mode=agg_mode, soa=soa)
            if out is not NotImplemented:
                return out
    return _torch_impl.grid_encode(*args)


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
