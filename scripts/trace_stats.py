"""GPU busy time and idle gaps in a Chrome trace written by ``torch.profiler``.

A step is host-bound when the GPU waits between kernels; this says how much. Used by the
``--profile`` options of ``bench_sds.py`` and ``bench_render.py``, or on its own:

    python scripts/trace_stats.py prof.trace.json [--steps 5]

>>> import json, tempfile
>>> ev = [{"ph": "X", "cat": "kernel", "name": "a", "ts": 0, "dur": 10},
...       {"ph": "X", "cat": "kernel", "name": "b", "ts": 5, "dur": 10},
...       {"ph": "X", "cat": "kernel", "name": "c", "ts": 40, "dur": 10}]
>>> with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
...     json.dump({"traceEvents": ev}, f)
>>> s = gpu_busy(f.name)
>>> (s["span_ms"], s["busy_ms"], s["gaps"][0][1:])
(0.05, 0.025, ('b', 'c'))
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def gpu_busy(path: str | Path, top: int = 12) -> dict:
    """Span from the first GPU activity to the last, the union of busy intervals inside it
    (ms), and the ``top`` longest idle gaps as (ms, activity before, activity after)."""
    events = json.loads(Path(path).read_text())["traceEvents"]
    iv = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e.get("name", ""))
        for e in events
        if e.get("ph") == "X" and e.get("cat") in GPU_CATS
    )
    if not iv:
        return {"span_ms": 0.0, "busy_ms": 0.0, "gaps": []}
    busy, gaps = 0.0, []
    start, end, last = iv[0][0], iv[0][1], iv[0][2]
    for a, b, name in iv[1:]:
        if a > end:
            busy += end - start
            gaps.append(((a - end) / 1e3, last, name))
            start, end = a, b
        elif b > end:
            end = b
        if b >= end:
            last = name
    busy += end - start
    gaps.sort(key=lambda g: -g[0])
    return {"span_ms": (iv[-1][1] - iv[0][0]) / 1e3, "busy_ms": busy / 1e3, "gaps": gaps[:top]}


def summary(path: str | Path, steps: int = 1) -> str:
    """A few lines: per-step span and busy time, busy fraction, the longest gaps."""
    s = gpu_busy(path)
    if not s["span_ms"]:
        return f"{path}: no GPU activity"
    lines = [
        f"{Path(path).name}: GPU span {s['span_ms'] / steps:.2f} ms/step, busy {s['busy_ms'] / steps:.2f} "
        f"ms/step ({100 * s['busy_ms'] / s['span_ms']:.0f}%); longest idle gaps:"
    ]
    lines += [f"  {ms:.3f} ms after {a[:60]} before {b[:60]}" for ms, a, b in s["gaps"]]
    return "\n".join(lines)


def device_ms(event) -> float:
    """Self GPU time of a ``prof.key_averages()`` entry in ms, over all its calls (the attribute's
    name changed across torch versions)."""
    us = getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)
    return us / 1e3


def ms_by_kind(prof, kind, steps: int) -> dict[str, float]:
    """GPU ms per step of a profile's kernels, summed by ``kind(name)``.

    >>> from types import SimpleNamespace as E
    >>> prof = E(key_averages=lambda: [E(key="gemm_a", self_device_time_total=3000.0),
    ...     E(key="gemm_b", self_device_time_total=1000.0), E(key="relu", self_device_time_total=0)])
    >>> ms_by_kind(prof, lambda k: k.split("_")[0], steps=2)
    {'gemm': 2.0}
    """
    parts: dict[str, float] = {}
    for e in prof.key_averages():
        ms = device_ms(e)
        if ms > 0:
            parts[kind(e.key)] = parts.get(kind(e.key), 0.0) + ms / steps
    return parts


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=1, help="steps the trace holds (per-step figures)")
    a = ap.parse_args()
    print(summary(a.trace, a.steps))
