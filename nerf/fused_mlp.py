"""Moved to ``nerf/fast/fused_mlp.py``: this re-export goes once its importers use that module."""

from .fast.fused_mlp import BlobSpec, fd_shade, mlp_head, param_shapes

__all__ = ["BlobSpec", "fd_shade", "mlp_head", "param_shapes"]
