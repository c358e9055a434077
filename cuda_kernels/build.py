"""Build-on-first-use of our CUDA kernels (ray marching, grid encoding, the fused Adan step, the
VAE's GroupNorm), as ONE extension.

One extension rather than one per package: the slow part of a build is the host files that
include torch headers, and ninja compiles all files of one extension in parallel, so a
single build costs about as much as the slowest file. Objects and the module are cached in
``~/.cache/dreamfusion/kernels/torch<ver>-cu<ver>-py<ver>/dreamfusion_kernels`` (or under
``$DREAMFUSION_KERNEL_CACHE``); ninja rebuilds only what changed, and nothing when nothing
did. ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures, as for any torch extension.

Set ``DREAMFUSION_KERNEL_VERBOSE=1`` to see the compiler's output.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

NAME = "dreamfusion_kernels"
_ROOT = Path(__file__).resolve().parent.parent
# Object files are named by basename: every source name must be unique.
SOURCES = [
    _ROOT / "raymarching" / "csrc" / "module.cpp",
    _ROOT / "raymarching" / "csrc" / "raymarching_bindings.cpp",
    _ROOT / "raymarching" / "csrc" / "raymarching.cu",
    _ROOT / "gridencoder" / "csrc" / "gridencoder_bindings.cpp",
    _ROOT / "gridencoder" / "csrc" / "gridencoder.cu",
    _ROOT / "nerf" / "csrc" / "adan_bindings.cpp",
    _ROOT / "nerf" / "csrc" / "adan.cu",
    _ROOT / "guidance" / "csrc" / "groupnorm_bindings.cpp",
    _ROOT / "guidance" / "csrc" / "groupnorm.cu",
]
# --fmad=false: the kernels must round like the PyTorch twins, which never fuse a multiply
# and an add (an FMA could move a sample across a cell boundary). No --use_fast_math: it
# would make divisions and exp approximate. The .cu files include no torch header, so they
# build as C++17 whatever standard torch's own headers need (torch picks it for .cpp files).
CUDA_FLAGS = ["-O3", "-std=c++17", "--fmad=false"]
CXX_FLAGS = ["-O2"]

_module: ModuleType | None | bool = None  # None: not tried; False: failed
build_seconds: float | None = None  # wall time of the last load (cold build or cache hit)


def find_nvcc() -> str | None:
    """Path of the CUDA compiler torch would use (from CUDA_HOME/CUDA_PATH or PATH), or None."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home is None:
        from torch.utils import cpp_extension  # noqa: PLC0415 - slow import, only when needed

        home = cpp_extension.CUDA_HOME
    if home is not None:
        nvcc = Path(home) / "bin" / "nvcc"
        if nvcc.exists():
            return str(nvcc)
    return shutil.which("nvcc")


def cache_dir() -> Path:
    """Build folder, keyed by torch, CUDA and Python versions (binaries match all three).

    >>> cache_dir().name, cache_dir().parent.name.startswith("torch")
    ('dreamfusion_kernels', True)
    """
    root = os.environ.get("DREAMFUSION_KERNEL_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "dreamfusion" / "kernels"
    torch_ver = torch.__version__.split("+")[0]
    cuda_ver = (torch.version.cuda or "none").replace(".", "")
    py_ver = f"{sys.version_info.major}{sys.version_info.minor}"
    return base / f"torch{torch_ver}-cu{cuda_ver}-py{py_ver}" / NAME


def _say(msg: str) -> None:
    print(f"[dreamfusion] {msg}", file=sys.stderr, flush=True)


def load_kernels() -> ModuleType | None:
    """The compiled extension module, built on first use; None (after ONE printed line) when
    no CUDA compiler is found or the build fails, so that callers use the PyTorch twins."""
    global _module, build_seconds
    if _module is None:
        _module = False
        if torch.version.cuda is None or not torch.cuda.is_available():
            return None
        if find_nvcc() is None:
            _say(
                "no CUDA compiler found (set CUDA_HOME or put nvcc on PATH): "
                "using the PyTorch ray marcher and grid encoder, which are much slower"
            )
            return None
        from torch.utils import cpp_extension  # noqa: PLC0415

        build = cache_dir()
        build.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            _module = cpp_extension.load(
                name=NAME,
                sources=[str(s) for s in SOURCES],
                extra_cflags=CXX_FLAGS,
                extra_cuda_cflags=CUDA_FLAGS,
                build_directory=str(build),
                verbose=os.environ.get("DREAMFUSION_KERNEL_VERBOSE", "") == "1",
            )
        except Exception as err:  # noqa: BLE001 - any build failure means: use the twins
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            _say(
                f"building the CUDA kernels in {build} failed ({first}); "
                "set DREAMFUSION_KERNEL_VERBOSE=1 for the compiler output. Using the PyTorch twins"
            )
            _module = False
        build_seconds = time.perf_counter() - start
    return _module or None
