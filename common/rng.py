"""A forked random stream: work inside it draws from torch's generators without moving the
run's own stream (model loading, validation frames, videos)."""

from __future__ import annotations

import contextlib

import torch


def forked_rng(device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.random.fork_rng`` over the CPU generator and, for a CUDA ``device``, its
    generator: what runs inside leaves the run's random stream where it was.

    >>> a = torch.get_rng_state()
    >>> with forked_rng("cpu"):
    ...     _ = torch.rand(3)
    >>> bool((torch.get_rng_state() == a).all())
    True
    """
    device = torch.device(device)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
