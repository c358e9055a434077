"""Lazy choice between a package's CUDA module and its PyTorch twin (used by ``raymarching`` and
``gridencoder``; the package is named by a string, not imported here), and the two wrappers
that let each kernel function's typed signature stand once, on its twin:

- ``CudaBackend.dispatch(twin, on=...)`` makes the public function: the twin's signature and
  docs, running ``package._cuda.<name>`` for GPU tensors and the twin otherwise;
- ``@takes_args_of(twin)`` makes a CUDA function ``impl(a)`` callable with the twin's
  arguments, which it reads by name (``a.rays_o``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


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

    def dispatch(self, twin: F, on: str) -> F:
        """The public function of ``twin`` (its signature, name and docstring): it runs
        ``package._cuda.<name>`` with the same arguments when the argument ``on`` is a CUDA
        tensor, the kernels build and they take the inputs (they return NotImplemented when
        not), and ``twin`` otherwise. It keeps the twin's ``__module__``, so that doctest runs
        the examples once, where they are written.

        >>> def double(x, scale=2.0):
        ...     "Twice x."
        ...     return scale * x
        >>> public = CudaBackend("nowhere", "UNUSED").dispatch(double, on="x")
        >>> public(torch.ones(2)), public.__doc__, str(inspect.signature(public))
        (tensor([2., 2.]), 'Twice x.', '(x, scale=2.0)')
        """
        name = twin.__name__
        index = list(inspect.signature(twin).parameters).index(on)

        @functools.wraps(twin)
        def public(*args, **kwargs):
            # The hot path: the renderer calls these in loops, so no binding here (the CUDA
            # side binds, the twin takes the call as it is).
            t = args[index] if len(args) > index else kwargs.get(on)
            if getattr(t, "is_cuda", False):
                mod = self.get()
                if mod is not None:
                    out = getattr(mod, name)(*args, **kwargs)
                    if out is not NotImplemented:
                        return out
            return twin(*args, **kwargs)

        return public  # type: ignore[return-value]


def takes_args_of(
    twin: Callable[..., Any],
) -> Callable[[Callable[[SimpleNamespace], Any]], Callable[..., Any]]:
    """Decorator for a CUDA implementation ``impl(a)`` of ``twin``: the decorated function takes
    ``twin``'s arguments (positional or by keyword, its defaults filled in) and hands them to
    ``impl`` by name, as the attributes of ``a``. The parameter list stands once, on the twin.

    >>> def twin(x, scale=2.0, *, warp=True): ...
    >>> @takes_args_of(twin)
    ... def impl(a):
    ...     return a.x * a.scale, a.warp
    >>> impl(3), impl(3, scale=1.0, warp=False)
    ((6.0, True), (3.0, False))
    >>> impl(3, x=4)
    Traceback (most recent call last):
    ...
    TypeError: multiple values for argument 'x'
    """
    bind = _Binder(twin)

    def wrap(impl: Callable[[SimpleNamespace], Any]) -> Callable[..., Any]:
        @functools.wraps(impl)
        def bound(*args, **kwargs):
            return impl(bind(args, kwargs))

        bound.__signature__ = bind.signature  # type: ignore[attr-defined]
        return bound

    return wrap


class _Binder:
    """A function's arguments bound by name: ``inspect.Signature.bind``'s result, in about a
    tenth of its time (~1 us for 14 arguments against ~10 us), which matters in the renderer's
    loops; malformed calls go to ``Signature.bind`` for its TypeError."""

    def __init__(self, fn: Callable[..., Any]):
        self.signature = inspect.signature(fn)
        params = list(self.signature.parameters.values())
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        if any(p.kind not in kinds for p in params):
            raise TypeError(f"{fn.__name__}: only plain and keyword-only parameters are bound")
        self.names = frozenset(p.name for p in params)
        self.positional = tuple(p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.defaults = {p.name: p.default for p in params if p.default is not p.empty}

    def __call__(self, args: tuple, kwargs: dict) -> SimpleNamespace:
        values = dict(zip(self.positional, args))
        well_formed = len(args) <= len(self.positional)
        if kwargs:
            well_formed = (
                well_formed
                and kwargs.keys() <= self.names
                and kwargs.keys().isdisjoint(self.positional[: len(args)])
            )
            values.update(kwargs)
        if len(values) < len(self.names):
            values = {**self.defaults, **values}
        if not (well_formed and len(values) == len(self.names)):
            bound = self.signature.bind(*args, **kwargs)  # raises the call's TypeError
            bound.apply_defaults()
            values = bound.arguments
        return SimpleNamespace(**values)
