"""The NeRF's speed layer: opt-in paths that compute what the reference computation in
``nerf/renderer.py`` and ``nerf/network_base.py`` does, with fewer launches or syncs.

Each is switched by a field of ``NeRFSpeedConfig`` (``-O`` turns the measured ones on); with
every field off the renderer runs the reference computation alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import option


@dataclass(frozen=True)
class NeRFSpeedConfig:
    """Speed levers of the field and the training render (CUDA; ignored on a CPU)."""

    fused_mlp: bool | None = option(
        None,
        "under --fp16 on a GPU, the field's MLP and density/albedo head, and the fd shading, as fused "
        "Triton kernels (the PyTorch path without Triton) [default: on with -O, else off]",
        tristate=True,
    )
    graph_pass: bool = option(
        False,
        "--cuda_ray training: replay the network pass from CUDA graphs per sample-count bucket; pays "
        "when views repeat, and turns itself off when counts rarely repeat",
    )
    graph_buckets: int = option(8, "--graph_pass: sample-count buckets per octave (8: at most 9%% padding)")
    graph_render: bool | None = option(
        None,
        "--cuda_ray training: replay the whole training render from CUDA graphs at fixed sizes with "
        "no host sync; a render that does not fit is skipped and captured again larger [default: on "
        "with -O, else off]",
        tristate=True,
    )
    graph_render_headroom: float = option(
        1.1, "--graph_render: graph sizes are the largest sample counts seen times this"
    )
    graph_render_max_work: int = option(
        3 * 2**20,
        "--graph_render: renders needing more rows of field evaluation than this run eagerly (0: no limit)",
    )
