"""The NeRF's speed layer: opt-in paths that compute what the reference computation in
``nerf/renderer.py`` and ``nerf/network_base.py`` does, with fewer launches or syncs.

* ``field.py``: the field's MLP and density/albedo head as one autograd node (``FusedHead``),
  or as Triton kernels (``fused_mlp.py``, kernels in ``_fused_mlp_kernels.py``); the fd normals
  and shading of a merged field call likewise; Linear + ReLU as one GEMM without gradients.
* ``graphed.py``: the training network pass (``GraphedPasses``) or the whole training render
  (``GraphedRender``) replayed from CUDA graphs, and ``collector_frozen`` for their captures.
* ``fixed_render.py``: the training render at fixed sizes with no host sync, which
  ``GraphedRender`` captures.

Each is switched by a field of ``NeRFSpeedConfig`` (``-O`` turns the measured ones on); with
every field off the renderer runs the reference computation alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import option


@dataclass(frozen=True)
class NeRFSpeedConfig:
    """Speed levers of the field and the training render (CUDA; ignored on a CPU).

    The fields without help text are not command-line options: they are the A/B switches of
    benchmarks and tests (``dataclasses.replace``), on by default.
    """

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
    march_warp: bool = option(
        True,
        "--cuda_ray training on a GPU: march a ray per warp testing 32 lattice points at a time "
        "(--no-march_warp: a thread per ray walks it; the same samples)",
        tristate=True,
    )
    # The MLP + density/albedo head (and a merged call's fd shading) as one autograd node with a
    # hand-written backward (field.FusedHead); False: the reference nn.Module path.
    fused_head: bool = True
    # Without gradients, each hidden Linear + ReLU of the MLPs as one GEMM with a ReLU epilogue
    # (field.FusedReluMLP); False: the reference MLP.
    fused_relu: bool = True
    # Pad the fused head's GEMM rows to bucket sizes (field.bucket_rows); None: on GPUs only.
    pad_rows: bool | None = None
    # With --fused_mlp, the density blob computed inside the kernels from the points; False:
    # passed to them as a tensor.
    blob_in_kernel: bool = True
