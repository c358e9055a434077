"""Doctest collection of nerf/fast/: the Triton kernels' module imports triton, which CPU-only
installs (and CI) do not have."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("triton") else ["_fused_mlp_kernels.py"]
