"""The training network pass replayed from CUDA graphs (``--graph_pass``).

A 64x64 training render launches a few hundred small kernels for the field, the fd shading and
the composite, forward and backward; the host takes longer to launch them than the GPU to run
them. Replayed from a CUDA graph the same pass costs one launch each way. Graphs need fixed
shapes, and the sample count changes at every step: the samples are padded to a bucket (steps
of 2^(1/k) for k = ``--graph_buckets``, 8 by default: at most 9% more rows) whose extra rows
belong to no ray (weight 0, zero gradient), and one graph is kept per shading and bucket, the
least recently used dropped first. The graphs share one memory pool, but each keeps its own
saved activations, so memory grows with ``max_graphs``. A bucket is captured only once it has
been asked for ``min_uses`` times; a failed capture, or captures at too many passes (counts
that rarely repeat, as in text-to-3D training with a new camera each step), turn graphs off
with one line.
"""

from __future__ import annotations

import gc
import math
import sys
from collections import Counter, OrderedDict, deque
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

_OUT_KEYS = ("weights", "weights_sum", "depth", "image", "normal_image", "loss_orient")


def sample_bucket(m: int, per_octave: int = 8) -> int:
    """Rows a pass of ``m`` samples is padded to: the next 2^(k/per_octave), a multiple of 256.

    >>> [sample_bucket(m) for m in (1, 1000, 97991)], sample_bucket(97991, 2)
    ([256, 1024, 101120], 131072)
    """
    k = math.ceil(per_octave * math.log2(max(m, 1)))
    return max(256, -(-math.ceil(2 ** (k / per_octave)) // 256) * 256)


class _Pass(nn.Module):
    """``renderer.network_pass`` with fixed settings, as a module whose only parameters are the
    renderer's (under ``renderer.``), so that ``torch.func.functional_call`` can run it on other
    tensors in their place."""

    def __init__(
        self,
        renderer: nn.Module,
        shading: str,
        need: bool,
        light: bool,
        T_thresh: float,
        N: int,
        dtype: torch.dtype | None,
    ):
        super().__init__()
        self.renderer = renderer
        self.shading, self.need, self.light, self.T_thresh, self.N, self.dtype = (
            shading,
            need,
            light,
            T_thresh,
            N,
            dtype,
        )

    def forward(self, xyzs, dirs, ts, rays, light, ratio) -> tuple[torch.Tensor, ...]:
        # Autocast's weight cache cannot live across graph replays: off inside the capture.
        with torch.autocast(
            "cuda", dtype=self.dtype or torch.float32, enabled=self.dtype is not None, cache_enabled=False
        ):
            out = self.renderer.network_pass(
                xyzs,
                dirs,
                ts,
                rays,
                light if self.light else None,
                ratio,
                self.shading,
                self.need,
                self.T_thresh,
                self.N,
            )
        return tuple(out[k] for k in _OUT_KEYS if k in out)


def functional_pass(module: _Pass) -> tuple[Callable[..., tuple], tuple[torch.Tensor, ...]]:
    """``(fn, params)``: ``fn(*args, *params)`` runs ``module(*args)`` with the given tensors as
    the renderer's trainable parameters, in ``params``' order.

    The pass is captured with fresh leaves that share the parameters' storage: capturing a
    backward needs the parameters' gradient accumulators to be created on the capture stream,
    and a graph of an earlier step still alive (a kept output) holds accumulators made on the
    default stream, which invalidates the capture ("operation would make the legacy stream
    depend on a capturing blocking stream"). Replays then take the real parameters, so their
    gradients accumulate outside the graph as usual."""
    named = [(f"renderer.{n}", p) for n, p in module.renderer.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    n_args = 6

    def fn(*a):
        return torch.func.functional_call(module, dict(zip(names, a[n_args:])), a[:n_args])

    return fn, tuple(p for _, p in named)


class GraphedPasses:
    """One CUDA graph (forward and backward) of the training network pass per shading, sample
    bucket and shape of the inputs; ``run`` has ``network_pass``'s signature and result.

    A replay's outputs live in the graph's memory: they hold until the next pass, so a training
    step reads them (loss, backward) before it renders again, as the Trainer does."""

    def __init__(
        self,
        max_graphs: int = 4,
        min_uses: int = 2,
        window: int = 64,
        max_captures: int = 8,
        per_octave: int = 8,
    ):
        if per_octave < 1:
            raise ValueError(f"--graph_buckets must be at least 1, got {per_octave}")
        self.max_graphs, self.per_octave = max_graphs, per_octave
        self.pool = None  # one memory pool for all graphs (see _capture)
        self.graphs: OrderedDict[tuple, tuple[Callable[..., tuple], list[str], tuple]] = OrderedDict()
        self.captures = 0  # graphs captured so far (for tests and benchmarks)
        self.min_uses = min_uses
        self.uses: Counter[tuple] = Counter()  # requests per key (cleared when large)
        self.eager_runs = 0  # passes run eagerly (their bucket not yet asked for min_uses times)
        self.disabled = False  # a capture failed, or captures came too often: eager from then on
        # Churn guard: a run whose sample counts rarely repeat (random cameras on a changing
        # field) pays a capture at most steps and keeps a pool of dead graphs; more than
        # ``max_captures`` captures in the last ``window`` passes turn graphs off for good.
        self.window, self.max_captures = window, max_captures
        self.recent: deque[bool] = deque(maxlen=window)  # whether each recent pass captured

    def _disable(self, why: str) -> None:
        """Eager from now on: drop every graph and its memory, and say why in one line."""
        self.disabled = True
        self.graphs.clear()
        self.pool = None
        gc.collect()  # graphed functions sit in reference cycles: free their pool now
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"[speed] --graph_pass: {why}; the network pass runs eagerly", file=sys.stderr, flush=True)

    def run(
        self,
        renderer: nn.Module,
        xyzs: torch.Tensor,
        dirs: torch.Tensor,
        ts: torch.Tensor,
        rays: torch.Tensor,
        light_d: torch.Tensor | None,
        ambient_ratio: float,
        shading: str,
        need: bool,
        T_thresh: float,
        N: int,
    ) -> dict:
        """``renderer.network_pass`` (same arguments and shapes: xyzs, dirs [M,3], ts [M,2],
        rays [N,2]), from a graph when its bucket has one; weights [M] as there."""
        eager = (xyzs, dirs, ts, rays, light_d, ambient_ratio, shading, need, T_thresh, N)
        if self.disabled:
            return renderer.network_pass(*eager)
        M = xyzs.shape[0]
        pad = sample_bucket(M, self.per_octave) - M
        xyzs, dirs, ts = (F.pad(t, (0, 0, 0, pad)) for t in (xyzs, dirs, ts))
        dev = xyzs.device
        ratio = torch.full((), float(ambient_ratio), device=dev)
        light = light_d if light_d is not None else torch.zeros(1, 3, device=dev)
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        args = (
            xyzs.contiguous(),
            dirs.contiguous(),
            ts.contiguous(),
            rays,
            light.float().contiguous(),
            ratio,
        )
        key = (
            shading,
            need,
            light_d is not None,
            float(T_thresh),
            dtype,
            *((tuple(a.shape), a.dtype) for a in args),
        )
        if key not in self.graphs:
            if len(self.uses) > 1024:
                self.uses.clear()
            self.uses[key] += 1
            if self.uses[key] < self.min_uses:
                self.eager_runs += 1
                self.recent.append(False)
                return renderer.network_pass(*eager)
            if len(self.graphs) >= self.max_graphs:
                self.graphs.popitem(last=False)
                # Graphed functions sit in reference cycles: only the cycle collector frees
                # their graphs' memory.
                gc.collect()
            try:
                module = _Pass(renderer, shading, need, light_d is not None, T_thresh, N, dtype)
                fn, params = functional_pass(module)
                aliases = tuple(p.detach().requires_grad_() for p in params)
                keys = list(_OUT_KEYS if need else _OUT_KEYS[:4])  # normals when needed
                self.graphs[key] = (self._capture(fn, args + aliases), keys, params)
                self.captures += 1
            except RuntimeError as e:
                self._disable(f"capture failed ({str(e).strip().splitlines()[0]})")
                return renderer.network_pass(*eager)
            self.recent.append(True)
            n_captures = sum(self.recent)
            if n_captures > self.max_captures:
                self._disable(
                    f"{n_captures} captures in the last {len(self.recent)} passes (the sample counts rarely repeat)"
                )
                return renderer.network_pass(*eager)
        else:
            self.recent.append(False)
        self.graphs.move_to_end(key)
        fn, keys, params = self.graphs[key]
        out = dict(zip(keys, fn(*args, *params)))
        out["weights"] = out["weights"][:M]  # the padding rows' weights are 0
        return out

    def _capture(self, fn: Callable[..., tuple], args: tuple) -> Callable[..., tuple]:
        """``fn`` with its forward and backward replayed from CUDA graphs captured on ``args``."""
        # All graphs share one memory pool: a graph's temporaries may then overlap another's
        # saved activations, which is safe because a training step replays one graph's forward
        # and then its backward before any other graph runs (outputs are read in that step).
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.autocast("cuda", enabled=False):  # make_graphed_callables refuses autocast's cache
            return torch.cuda.make_graphed_callables(fn, args, allow_unused_input=True, pool=self.pool)
