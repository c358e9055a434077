"""The non-finite step gate: a step whose loss or gradients are not finite is skipped, too many in
a row stop the run, and the host reads each step's results back in one copy (with Adan on a GPU
one step late, while the device works on the next step: ``Trainer.train_one_step``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .optimizer import Adan


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses or gradients."""


@dataclass
class StepRecord:
    """A training step's results on their way to the host: [ok, complete, loss, *parts] values."""

    step: int  # global step index (before the step)
    shading: str
    names: list[str]
    values: torch.Tensor
    event: torch.cuda.Event | None  # recorded after the copy (CUDA only)


def grads_finite_flag(optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    """0-d bool tensor on ``device``: every gradient of ``optimizer``'s parameters is finite (no
    host sync; parameters without a gradient do not count).

    >>> p = torch.nn.Parameter(torch.zeros(2))
    >>> p.grad = torch.tensor([1.0, float("inf")])
    >>> bool(grads_finite_flag(torch.optim.SGD([p], lr=1.0), torch.device("cpu")))
    False
    """
    grads = [
        p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None and p.grad.numel()
    ]
    if not grads:
        return torch.ones((), dtype=torch.bool, device=device)
    # Each gradient's largest |entry| in one multi-tensor kernel (not two launches per
    # tensor): finite exactly when every entry is, as a max carries NaN and inf through and,
    # unlike a sum of squares, cannot overflow.
    peaks = torch._foreach_norm(grads, ord=float("inf"))
    return torch.isfinite(torch.stack([x if x.dtype == torch.float32 else x.float() for x in peaks])).all()


def readback(
    step: int, finite: torch.Tensor, loss: torch.Tensor, parts: dict, complete: torch.Tensor | None = None
) -> StepRecord:
    """Start copying a step's flags (``finite``, ``complete``: 0-d bool), ``loss`` and the tensor
    values of ``parts`` (0-d each) to the host, in one copy; no wait on a GPU.

    >>> rec = readback(0, torch.tensor(True), torch.tensor(2.0), {"sds": torch.tensor(1.0)})
    >>> rec.values.tolist(), rec.names
    ([1.0, 1.0, 2.0, 1.0], ['sds'])
    """
    names = [k for k, v in parts.items() if isinstance(v, torch.Tensor)]
    whole = torch.ones_like(finite) if complete is None else complete
    values = torch.stack(
        [finite.float(), whole.float(), loss.detach().float(), *(parts[k].float() for k in names)]
    )
    event = None
    if values.is_cuda:
        values = values.to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    return StepRecord(step, parts.get("shading", ""), names, values, event)


class StepGate:
    """Applies or skips each step's update, counts the skipped steps of a run and stops it after
    ``max_nonfinite`` non-finite steps in a row. ``log(msg)`` writes the run's log; ``ckpt_dir``
    is named in the stop message."""

    def __init__(self, max_nonfinite: int, log: Callable[[str], None], ckpt_dir: Path):
        self.max_nonfinite, self.log, self.ckpt_dir = max_nonfinite, log, ckpt_dir
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.incomplete_total = 0  # steps skipped because a --graph_render replay lost samples
        self.pending: StepRecord | None = None  # a step still being read back

    def update(
        self,
        rec: StepRecord,
        finite: torch.Tensor,
        *,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        ema,
        params,
        grad_clip: float,
        defer: bool,
    ) -> dict | None:
        """Apply the step's (unscaled) gradients to ``params`` unless ``finite`` (0-d bool) is
        False, and return the parts of a finished step (``finish``). With Adan on fp32
        parameters the skip is decided on the device and, with ``defer``, this step's results
        are read at the next call, which returns the previous step's (None after the first;
        ``flush()`` gives the last); otherwise the host reads them now (one sync) and decides."""
        if isinstance(optimizer, Adan) and optimizer.can_gate():
            if grad_clip > 0:
                torch.nn.utils.clip_grad_value_(params, grad_clip)
            optimizer.step(ok=finite)  # = scaler.step(optimizer), the found-inf decision on the device
            scaler.update()  # lowers the loss scale after an overflow, as GradScaler does
            if ema is not None:
                ema.update(ok=finite)
            if not defer:
                return self.finish(rec)
            done, self.pending = self.pending, rec
            return None if done is None else self.finish(done)
        done = self.finish(rec)
        if done["ok"]:
            if grad_clip > 0:
                torch.nn.utils.clip_grad_value_(params, grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update()
        else:
            optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled():
            scaler.update()
        return done

    def flush(self) -> dict | None:
        """The parts of a step still being read back (``defer``), or None."""
        rec, self.pending = self.pending, None
        return None if rec is None else self.finish(rec)

    def finish(self, rec: StepRecord) -> dict:
        """Read a step's values (waiting for its copy), count a skip; may stop the run.
        Returns the step's parts plus ``shading``, ``step`` (steps done), ``ok``, ``loss``."""
        if rec.event is not None:
            rec.event.synchronize()
        ok_flag, whole, loss_value, *part_values = rec.values.tolist()
        ok = ok_flag > 0
        parts: dict = dict(zip(rec.names, part_values))
        parts.update(shading=rec.shading, step=rec.step + 1, ok=ok, loss=loss_value if ok else float("nan"))
        if ok:
            self.nonfinite_run = 0
            return parts
        if whole == 0:
            # Not a divergence: the graphed render is captured again larger (it says so).
            self.incomplete_total += 1
            self.log(f"[step {rec.step}] the graph-replayed render had too few rows: step skipped")
            return parts
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        self.log(
            f"[step {rec.step}] non-finite loss or gradient: step skipped "
            f"({self.nonfinite_run} in a row, {self.nonfinite_total} in all)"
        )
        if self.nonfinite_run >= self.max_nonfinite:
            raise TrainingDiverged(
                f"{self.nonfinite_run} non-finite steps in a row at step {rec.step}; stopped. "
                f"The last good checkpoint is kept in {self.ckpt_dir}. Try --precision fp32, a lower --lr "
                f"or --grad_clip 1"
            )
        return parts
