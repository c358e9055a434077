"""Moved to ``nerf/fast/graphed.py``: this re-export goes once its importers use that module."""

from .fast.graphed import GraphedPasses, GraphedRender, collector_frozen, sample_bucket, thaw

__all__ = ["GraphedPasses", "GraphedRender", "collector_frozen", "sample_bucket", "thaw"]
