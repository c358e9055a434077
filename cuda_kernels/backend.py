"""Lazy choice between a package's CUDA module and its PyTorch twin (used by
``raymarching`` and ``gridencoder``; the package is named by a string, not imported here)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch


class CudaBackend:
    """``package._cuda``, imported (and its kernels built) on first GPU use.

    ``get()`` returns the module, or None when there is no GPU, the kernels cannot be built,
    or the environment variable ``env_var`` is "torch". ``set("torch")`` forces the twin,
    ``set("auto")`` tries CUDA again.
    """

    def __init__(self, package: str, env_var: str):
        self.package, self.env_var = package, env_var
        self._module: ModuleType | None | bool = None  # None: not tried yet; False: unavailable

    def get(self) -> ModuleType | None:
        if self._module is None:
            self._module = False
            if os.environ.get(self.env_var, "") != "torch" and torch.cuda.is_available():
                try:
                    mod = importlib.import_module(f"{self.package}._cuda")
                    if mod.available():
                        self._module = mod
                except ImportError:
                    self._module = False
        return self._module or None

    def set(self, name: str) -> None:
        if name not in ("torch", "auto"):
            raise ValueError(f"unknown backend {name!r}")
        self._module = False if name == "torch" else None
