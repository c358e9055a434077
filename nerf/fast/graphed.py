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

``GraphedRender`` does the same for the whole training render (``--graph_render``), captured at
fixed sizes (``nerf/fast/fixed_render.py``). A run that captures graphs enters
``collector_frozen()`` around its training loop (see there).
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import NeRFSpeedConfig
from .fixed_render import train_render_fixed

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


def functional_pass(
    module: nn.Module, n_args: int = 6
) -> tuple[Callable[..., tuple], tuple[torch.Tensor, ...]]:
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

    def fn(*a):
        return torch.func.functional_call(module, dict(zip(names, a[n_args:])), a[:n_args])

    return fn, tuple(p for _, p in named)


class _Collector:
    """What ``collector_frozen`` shares with the captures (``_GraphSet._graphed``)."""

    armed = False  # inside collector_frozen(): the first capture freezes the collector
    frozen = False  # gc.freeze() done by a capture


@contextlib.contextmanager
def collector_frozen() -> Iterator[None]:
    """Inside this block, the first CUDA graph capture moves every object alive then out of
    Python's cyclic collector (``gc.collect()``, then ``gc.freeze()``); on exit they are given
    back (``gc.unfreeze()``). Enter it around a training loop that may capture graphs
    (``--graph_render``, ``--graph_pass``): ``Trainer.train``, bench_sds's variants.

    Why: a dropped graph frees its memory only through ``gc.collect()`` (graphed functions sit
    in reference cycles), and a full collection walks every tracked object: in bench_sds's
    process, which holds a compiled UNet, a drop's collection took about a second. The objects
    alive at the first capture (models, compiled code) live as long as the run; frozen, later
    collections skip them. The freeze is process-wide, hence scoped to this block: outside it
    captures freeze nothing (and a drop's collection walks everything). Nested blocks unfreeze
    at the outermost exit.

    >>> with collector_frozen():
    ...     pass  # no capture in here: nothing was frozen
    >>> _Collector.armed, _Collector.frozen
    (False, False)
    """
    outer = _Collector.armed
    _Collector.armed = True
    try:
        yield
    finally:
        _Collector.armed = outer
        if not outer and _Collector.frozen:
            gc.unfreeze()
            _Collector.frozen = False


def _freeze_at_first_capture() -> None:
    """Inside ``collector_frozen()``, at the first capture: collect, then freeze what is left."""
    if _Collector.armed and not _Collector.frozen:
        gc.collect()
        gc.freeze()
        _Collector.frozen = True


@contextlib.contextmanager
def _cache_kept() -> Iterator[None]:
    """``torch.cuda.empty_cache`` does nothing inside: what a capture needs.

    ``torch.cuda.graph`` empties the CUDA caching allocator's cache before each capture (two per
    ``make_graphed_callables``), to give the graph as much memory as possible. These captures do
    not need it (their pool is private; a drop empties the cache itself, ``_GraphSet._drop``), and
    the blocks given back would be allocated again, with a device sync, at the next steps.
    """
    empty_cache = torch.cuda.empty_cache
    torch.cuda.empty_cache = lambda: None
    try:
        yield
    finally:
        torch.cuda.empty_cache = empty_cache


class _GraphSet:
    """CUDA graphs (forward and backward) kept by key in one shared memory pool, the least
    recently used dropped first, and turned off for good, in one line, when a capture fails:
    what ``GraphedPasses`` and ``GraphedRender`` share.

    All graphs share one memory pool: a graph's temporaries may then overlap another's saved
    activations, which is safe because a training step replays one graph's forward and then its
    backward before any other graph runs (outputs are read in that step)."""

    option = ""  # the command-line option, for messages
    eager_part = ""  # what runs eagerly once graphs are off

    def __init__(self, max_graphs: int):
        self.max_graphs = max_graphs
        self.pool = None
        self.graphs: OrderedDict = OrderedDict()
        self.captures = 0  # graphs captured so far (for tests and benchmarks)
        self.capture_s = 0.0  # seconds spent capturing them and dropping them
        self.disabled = False  # a capture failed (or, for passes, captures came too often)

    def _say(self, what: str) -> None:
        print(f"[speed] --{self.option}: {what}", file=sys.stderr, flush=True)

    def _drop(self, key=None) -> None:
        """Drop ``key``'s graph (by default the least recently used one) and free its memory."""
        if key is None and self.graphs:
            key = next(iter(self.graphs))
        if self.graphs.pop(key, None) is not None:
            t0 = time.perf_counter()
            gc.collect()  # graphed functions sit in reference cycles: free their memory now
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # and give the dropped graph's pool back
            self.capture_s += time.perf_counter() - t0
        if not self.graphs:
            # The last graph of the pool is gone and so is the pool: capturing into its old
            # handle fails inside the caching allocator ("use_count > 0" assert).
            self.pool = None

    def _disable(self, why: str) -> None:
        """Eager from now on: drop every graph and its memory, and say why in one line."""
        self.disabled = True
        self.graphs.clear()
        self.pool = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._say(f"{why}; {self.eager_part} runs eagerly")

    def _capture_failed(self, e: Exception) -> None:
        # CUDA errors, and a kernel variant first compiled in the capture's warm-up.
        self._disable(f"capture failed ({(str(e).strip().splitlines() or [type(e).__name__])[0]})")

    def _graphed(self, fn: Callable[..., tuple], args: tuple) -> Callable[..., tuple]:
        """``fn`` with its forward and backward replayed from CUDA graphs captured on ``args``."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        t0 = time.perf_counter()
        _freeze_at_first_capture()  # inside collector_frozen() only
        with (
            torch.autocast("cuda", enabled=False),  # make_graphed_callables refuses autocast's cache
            _cache_kept(),
        ):
            graphed = torch.cuda.make_graphed_callables(fn, args, allow_unused_input=True, pool=self.pool)
        self.capture_s += time.perf_counter() - t0
        return graphed


def training_graphs(speed: NeRFSpeedConfig) -> tuple[GraphedPasses, GraphedRender]:
    """The renderer's graph sets, as ``speed`` sizes them (used while ``graph_pass`` and
    ``graph_render`` are on)."""
    passes = GraphedPasses(per_octave=int(speed.graph_buckets))
    renders = GraphedRender(
        headroom=float(speed.graph_render_headroom), max_work=int(speed.graph_render_max_work) or None
    )
    return passes, renders


class GraphedPasses(_GraphSet):
    """One CUDA graph (forward and backward) of the training network pass per shading, sample
    bucket and shape of the inputs; ``run`` has ``network_pass``'s signature and result.

    A replay's outputs live in the graph's memory: they hold until the next pass, so a training
    step reads them (loss, backward) before it renders again, as the Trainer does."""

    option, eager_part = "graph_pass", "the network pass"

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
        super().__init__(max_graphs)
        self.per_octave = per_octave
        self.min_uses = min_uses
        self.uses: Counter[tuple] = Counter()  # requests per key (cleared when large)
        self.eager_runs = 0  # passes run eagerly (their bucket not yet asked for min_uses times)
        # Churn guard: a run whose sample counts rarely repeat (random cameras on a changing
        # field) pays a capture at most steps and keeps a pool of dead graphs; more than
        # ``max_captures`` captures in the last ``window`` passes turn graphs off for good.
        self.window, self.max_captures = window, max_captures
        self.recent: deque[bool] = deque(maxlen=window)  # whether each recent pass captured

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
                self._drop()
            try:
                module = _Pass(renderer, shading, need, light_d is not None, T_thresh, N, dtype)
                fn, params = functional_pass(module)
                aliases = tuple(p.detach().requires_grad_() for p in params)
                keys = list(_OUT_KEYS if need else _OUT_KEYS[:4])  # normals when needed
                self.graphs[key] = (self._capture(fn, args + aliases), keys, params)
                self.captures += 1
            except Exception as e:
                self._capture_failed(e)
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
        return self._graphed(fn, args)


_RENDER_KEYS = (*_OUT_KEYS, "n_pruned", "n_padding", "complete", "totals")


class RenderKey(NamedTuple):
    """What a captured training render is specialised on (one graph per key)."""

    shading: str
    need: bool  # normals computed
    light: tuple[int, ...] | None  # the light's shape
    perturb: bool
    T_thresh: float
    dtype: torch.dtype | None  # autocast's
    rays: int
    max_level: float | None  # the encoder levels in use
    prune: bool


class _Render(nn.Module):
    """``train_render_fixed`` with fixed settings, as a module whose only parameters are
    the renderer's (for ``functional_pass``)."""

    def __init__(self, renderer: nn.Module, key: RenderKey, capacity: tuple[int, int]):
        super().__init__()
        self.renderer, self.key, self.capacity = renderer, key, capacity

    def forward(self, rays_o, rays_d, noise, light, ratio) -> tuple[torch.Tensor, ...]:
        k = self.key
        with torch.autocast(
            "cuda", dtype=k.dtype or torch.float32, enabled=k.dtype is not None, cache_enabled=False
        ):
            out = train_render_fixed(
                self.renderer,
                rays_o,
                rays_d,
                noise if k.perturb else None,
                light if k.light else None,
                ratio,
                k.shading,
                k.need,
                k.T_thresh,
                self.capacity,
            )
        return tuple(out[name] for name in _RENDER_KEYS if name in out)


class RenderSizes:
    """The sizes ``GraphedRender`` captures one setting at, from the sample counts it has seen:
    the largest (marched, kept) counts since the last decision, times ``headroom``, rounded up to
    a ``per_octave`` step (``sample_bucket``). The first ``warmup`` renders are eager; so are all
    renders while they need more than ``max_work`` rows of field evaluation (None: no limit),
    where the GPU, not the host, bounds the render and the launches saved matter little.

    >>> s = RenderSizes(headroom=1.1, per_octave=16, warmup=2, prune=True, window=3)
    >>> s.eager(1000, 300); s.ready()
    False
    >>> s.eager(1200, 250); s.ready(), s.capacity()
    (True, (1536, 512))
    >>> s.overflowed((1536, 512), 1400, 400)  # fits
    False
    >>> s.overflowed((1536, 512), 3072, 400)  # the march did not fit: kept scaled to all of it
    True
    >>> s.need, s.capacity()
    ([3072, 800], (3584, 1024))
    >>> cap = s.capacity()  # windows of 3 replays: the first still saw 3072, the second did not
    >>> [(s.overflowed(cap, 1400, 400), s.replayed(cap)) for _ in range(6)][2::3]
    [(False, False), (False, True)]
    >>> s.need, s.capacity()
    ([1400, 400], (1792, 512))

    With a work limit (rows: marched, plus 7 per kept sample for the merged fd call), and
    ``rearm``: after a render past the limit, that many small renders in a row before graphs
    again, twice as many after each further one, up to ``max_rearm`` (counts that straddle the
    limit, as in a fresh field's fog, stay eager instead of paying a capture and a lost step
    again and again):

    >>> s = RenderSizes(1.1, 16, warmup=2, prune=True, window=3, max_work=5000, rearm=3)
    >>> s.eager(1000, 300); s.eager(1200, 600); s.ready()  # 1200 + 7 * 600 rows: too many
    False
    >>> s.eager(1000, 300); s.eager(900, 300); s.ready()  # the last two: 1000 + 7 * 300 rows
    True
    >>> s.overflowed(s.capacity(), 2000, 700), s.ready()  # grown past the limit: eager again
    (True, False)
    >>> s.eager(900, 300); s.eager(900, 300); s.ready()  # two small ones are not enough now
    False
    >>> s.eager(900, 300); s.ready()
    True
    >>> s.overflowed(s.capacity(), 2000, 700), s.ready()  # past the limit again
    (True, False)
    >>> for _ in range(5): s.eager(900, 300)
    >>> s.ready()  # now six in a row are needed
    False
    >>> s.eager(900, 300); s.ready()
    True
    """

    def __init__(
        self,
        headroom: float,
        per_octave: int,
        warmup: int,
        prune: bool,
        window: int,
        normals: bool = True,
        max_work: int | None = None,
        rearm: int = 32,
        max_rearm: int = 1024,
    ):
        self.headroom, self.per_octave, self.prune, self.window = headroom, per_octave, prune, window
        self.normals, self.max_work, self.rearm, self.max_rearm = normals, max_work, rearm, max_rearm
        self.disarms = 0  # renders past the limit that turned graphs off (each doubles the rearm)
        self.need = [0, 0]  # largest (marched, kept) counts since the sizes were last set
        self.window_need = [0, 0]  # largest counts in the current window of replays
        self.replays = 0
        self.eager_counts: deque[tuple[int, int]] = deque(maxlen=max(warmup, 1))
        self.armed = False  # sizes set: capture at the next render (again, after an overflow)

    def work(self, m: int, k: int) -> int:
        """Rows of field evaluation of a render of m marched and k kept samples."""
        rows = 7 if self.normals else 1  # a sample and its six fd points in one call
        return m + rows * k if self.prune else rows * m

    def _small(self, m: int, k: int) -> bool:
        return self.max_work is None or self.work(m, k) <= self.max_work

    def _note(self, m: int, k: int) -> None:
        for counts in (self.need, self.window_need):
            counts[0], counts[1] = max(counts[0], m), max(counts[1], k)

    def eager(self, m: int, k: int) -> None:
        """Counts of an eager render: once the last ``warmup`` of them are small enough, the
        sizes are set from them."""
        self.eager_counts.append((m, k))
        if len(self.eager_counts) == self.eager_counts.maxlen:
            m, k = (max(c[i] for c in self.eager_counts) for i in (0, 1))
            if self._small(m, k):
                self.need, self.window_need, self.replays, self.armed = [m, k], [0, 0], 0, True

    def ready(self) -> bool:
        """Whether to render from a graph (captured at ``capacity()`` if there is none)."""
        return self.armed

    def capacity(self) -> tuple[int, int]:
        """(march rows, kept rows) to capture with."""
        h, b = self.headroom, self.per_octave
        return (sample_bucket(math.ceil(self.need[0] * h), b), sample_bucket(math.ceil(self.need[1] * h), b))

    def overflowed(self, cap: tuple[int, int], m: int, k: int) -> bool:
        """Counts of a replay at sizes ``cap``: whether samples were lost (capture again, or
        render eagerly when the counts outgrew ``max_work``)."""
        if m > cap[0]:
            # The pruning saw only the samples that fit: scale its count to all of them.
            k = math.ceil(k * m / cap[0])
        self._note(m, k)
        if not self._small(m, k):
            self.armed = False
            self.eager_counts = deque(maxlen=max(self.rearm_count(), 1))
            self.disarms += 1
        return m > cap[0] or (self.prune and k > cap[1])

    def rearm_count(self) -> int:
        """Small renders in a row needed before graphs again, after the next render past the limit."""
        return min(self.rearm << min(self.disarms, 30), max(self.max_rearm, self.rearm))

    def replayed(self, cap: tuple[int, int]) -> bool:
        """One more replay at sizes ``cap``; every ``window`` replays, whether to capture again
        smaller (every count of the window fit in half the rows: the scene thinned out)."""
        self.replays += 1
        if self.replays < self.window:
            return False
        self.replays = 0
        recent, self.window_need = self.window_need, [0, 0]
        small = 0 < recent[0] and 2 * recent[0] * self.headroom < cap[0]
        if self.prune:
            small = small or (0 < recent[1] and 2 * recent[1] * self.headroom < cap[1])
        if small:
            self.need = recent
        return small


class GraphedRender(_GraphSet):
    """The whole ``--cuda_ray`` training render (near/far, march, pruning pass, field, shading,
    composite), forward and backward, replayed from one CUDA graph per shading and setting.

    A 64x64 training render launches a few hundred small kernels and syncs twice (the sample
    counts of the march and of the pruning size their outputs): the host takes longer than the
    GPU. Replayed at fixed sizes it costs one launch each way and no sync. The sizes are the
    largest counts seen (first in ``warmup`` eager renders per setting) times ``headroom``,
    rounded up to a ``per_octave`` step; rows past the samples belong to no ray (weight 0, zero
    gradient), and the hash-grid and MLP kernels skip them (``live_count``: the counts stay on
    the device), while the pass's elementwise ops still touch them.

    No sync: each replay's true counts are read back a step later (pinned buffer + event). A
    render that needed more rows than it had (the rays that came last lost samples) says so on
    the device: its ``complete`` output is False, and the Trainer then skips that step's update
    on the device as it skips a non-finite one, so no gradient of a clipped render is applied.
    When the counts come back the overflow is counted in ``overflows``, reported in one line,
    and the setting is captured again larger. Sizes shrink again when ``window`` replays in a
    row needed less than half of them.

    Worth it where the render is bound by the host (a fitted scene's 64x64 lambertian render and
    backward: 4.4-5.5 -> 2.9-3.2 ms on an H100; its SDS step 18.5-21.2 -> 17.9-18.8 ms), not
    where the GPU is busy with padding (bench_sds's fresh field, without a work limit: 24.3 ->
    29.3 ms per step). Hence on under ``-O`` only up to ``max_work`` rows of field evaluation.
    """

    option, eager_part = "graph_render", "the training render"

    def __init__(
        self,
        headroom: float = 1.1,
        per_octave: int = 16,
        warmup: int = 2,
        max_graphs: int = 4,
        window: int = 500,
        max_work: int | None = None,
    ):
        super().__init__(max_graphs)
        self.headroom, self.per_octave, self.warmup = headroom, per_octave, warmup
        self.window, self.max_work = window, max_work
        self.sizes: dict[RenderKey, RenderSizes] = {}
        self.pending: deque = deque()  # (key, pinned host counts, event, capacity) in flight
        self.pinned: list[torch.Tensor] = []  # free pinned buffers for the counts
        self.overflows = 0  # replays whose samples did not fit (their outputs: complete False)

    def _poll(self, wait: bool = False) -> None:
        """Read back the counts of finished replays: grow a setting's sizes after an overflow."""
        while self.pending and (wait or self.pending[0][2].query()):
            key, host, event, cap = self.pending.popleft()
            event.synchronize()
            m, k = host.tolist()
            self.pinned.append(host)
            sizes = self.sizes[key]
            lost = sizes.overflowed(cap, m, k)
            self.overflows += lost
            # Replays still in flight after a drop used the same graph: say it once.
            said = key not in self.graphs or self.graphs[key][3] != cap
            if lost or not sizes.ready():
                self._drop(key)
            if said:
                continue
            if lost:
                then = f"captured again larger: {sizes.capacity()}" if sizes.ready() else "eager from now"
                self._say(
                    f"a {key.shading} render needed {m} samples ({k} kept) but had room for {cap[0]} "
                    f"({cap[1]}): its outputs are marked incomplete (training skips that step), {then}"
                )
            if not sizes.ready():
                self._say(
                    f"{key.shading} renders needing {sizes.work(m, k)} rows of field evaluation, more than "
                    f"--graph_render_max_work {sizes.max_work}, run eagerly until "
                    f"{sizes.eager_counts.maxlen} in a row need fewer"
                )

    def run(
        self,
        renderer: nn.Module,
        rays_o: torch.Tensor,
        rays_d: torch.Tensor,
        light_d: torch.Tensor | None,
        ambient_ratio: float,
        shading: str,
        perturb: bool,
        need: bool,
        T_thresh: float,
    ) -> dict:
        """``renderer.train_render``'s outputs (same arguments; rays_o, rays_d [N,3]), from a
        graph once the setting has one. ``weights`` then has padding rows (weight 0):
        ``n_padding`` of them, beside ``n_pruned`` (both device tensors)."""
        eager = (rays_o, rays_d, light_d, ambient_ratio, shading, perturb, need, T_thresh)
        if self.disabled:
            return renderer.train_render(*eager)[0]
        self._poll()
        dev = rays_o.device
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = RenderKey(
            shading,
            need,
            None if light_d is None else tuple(light_d.shape),
            bool(perturb),
            float(T_thresh),
            dtype,
            rays_o.shape[0],
            getattr(renderer, "max_level", None),
            renderer._prunes(need),
        )
        sizes = self.sizes.get(key)
        if sizes is None:
            sizes = self.sizes[key] = RenderSizes(
                self.headroom, self.per_octave, self.warmup, key.prune, self.window, key.need, self.max_work
            )
        if key not in self.graphs and not sizes.ready():
            out, m, k = renderer.train_render(*eager)
            sizes.eager(m, k)
            return out
        if key not in self.graphs:
            try:
                self._capture(renderer, key, rays_o, rays_d, light_d)
            except Exception as e:
                self._capture_failed(e)
                return renderer.train_render(*eager)[0]
        self.graphs.move_to_end(key)
        fn, names, params, cap, static = self.graphs[key]
        # The jitter the eager march would draw (the capture draws no random numbers).
        noise = torch.rand(rays_o.shape[0], device=dev) if perturb else static["noise"]
        light = light_d.float().contiguous() if light_d is not None else static["light"]
        ratio = torch.full((), float(ambient_ratio), device=dev)
        out = dict(zip(names, fn(rays_o.contiguous(), rays_d.contiguous(), noise, light, ratio, *params)))
        # The counts come back a step later, without a sync (pinned buffer + event).
        host = self.pinned.pop() if self.pinned else torch.empty(2, dtype=torch.int32, pin_memory=True)
        host.copy_(out.pop("totals"), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((key, host, event, cap))
        if len(self.pending) > 8:
            self._poll(wait=True)
        if sizes.replayed(cap):
            self._drop(key)  # captured again smaller at the next render
        return out

    def _capture(
        self, renderer: nn.Module, key: RenderKey, rays_o: torch.Tensor, rays_d: torch.Tensor, light_d
    ) -> None:
        """Capture ``key``'s render at its current capacity on copies of this step's inputs."""
        if len(self.graphs) >= self.max_graphs:
            self._drop()
        dev = rays_o.device
        cap = self.sizes[key].capacity()
        module = _Render(renderer, key, cap)
        fn, params = functional_pass(module, n_args=5)
        aliases = tuple(p.detach().requires_grad_() for p in params)
        light = light_d.float().contiguous() if light_d is not None else torch.zeros(1, 3, device=dev)
        static = {"noise": torch.zeros(rays_o.shape[0], device=dev), "light": light.clone()}
        args = (
            rays_o.detach().contiguous().clone(),
            rays_d.detach().contiguous().clone(),
            static["noise"].clone(),
            light.clone(),
            torch.full((), 0.5, device=dev),
        )
        names = [n for n in _RENDER_KEYS if key.need or n not in ("normal_image", "loss_orient")]
        self.graphs[key] = (self._graphed(fn, args + aliases), names, params, cap, static)
        self.captures += 1
