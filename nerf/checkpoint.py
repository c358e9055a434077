"""Checkpoints: written atomically, read safely (tensors and plain containers only, never code).

A run keeps its last ``--keep_ckpts`` full checkpoints ``<name>_ep{epoch:04d}.pth`` (model,
optimizer, schedules, EMA, RNG states: a resumed run continues exactly where it stopped) and
the EMA weights alone as ``<name>.pth`` (what export and later stages read).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from pathlib import Path

import torch

from common.files import atomic_write


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read."""


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a crash never
    leaves a half-written checkpoint in place of a finished one."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str | os.PathLike, device="cpu") -> dict:
    """Load a checkpoint safely (tensors and plain containers only, never code)."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a checkpoint ({type(e).__name__})"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"checkpoint {path} has no model state")
    return ckpt


def run_state(
    counters: dict[str, int],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    scaler: torch.amp.GradScaler,
    ema,
    options: dict,
) -> dict:
    """A run's full state: ``counters`` (epoch, global_step, ...), then every component's
    state, torch's RNG states and the run's options (tuples as lists: plain containers)."""
    return {
        **counters,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "opt": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()},
    }


def save_run(state: dict, ckpt_dir: Path, name: str, epoch: int, keep: int) -> Path:
    """Write ``state`` as ``<name>_ep{epoch:04d}.pth`` and delete all but the newest ``keep``."""
    path = ckpt_dir / f"{name}_ep{epoch:04d}.pth"
    atomic_save(state, path)
    old = sorted(glob.glob(str(ckpt_dir / f"{name}_ep*.pth")))
    for p in old[:-keep]:
        os.remove(p)
    return path


def save_weights(model: torch.nn.Module, path: Path, *, epoch: int, global_step: int) -> Path:
    """The model's current weights alone (a copy: the caller may swap weights back at once)."""
    state = {
        "epoch": epoch,
        "global_step": global_step,
        "model": {k: v.clone() for k, v in model.state_dict().items()},
    }
    atomic_save(state, path)
    return path


def read(
    spec: str, ckpt_dir: Path, name: str, device, log: Callable[..., None], quiet: bool = False
) -> tuple[dict, Path, bool] | None:
    """The checkpoint ``spec`` names, as (checkpoint, its path, model_only), or None for none.

    ``scratch``: none. ``latest``/``latest_model``: the newest full checkpoint, falling back to
    older ones while they are unreadable (``log(msg, echo=)`` says so; all unreadable:
    ``CheckpointError``), none if there is none (said unless ``quiet``); ``latest_model`` restores its model alone. ``best``: ``<name>.pth``
    (weights only). Anything else: a path."""
    if spec == "scratch":
        return None
    if spec in ("latest", "latest_model"):
        cands = sorted(glob.glob(str(ckpt_dir / f"{name}_ep*.pth")), reverse=True)
        if not cands:
            log("[checkpoint] none found, training from scratch", echo=not quiet)
            return None
        errors = []
        for c in cands:
            try:
                return load_checkpoint(c, device), Path(c), spec == "latest_model"
            except CheckpointError as e:
                errors.append(str(e))
                log(f"[checkpoint] {e}; trying an older one", echo=True)
        raise CheckpointError("; ".join(errors))
    path = ckpt_dir / f"{name}.pth" if spec == "best" else Path(spec)
    ckpt = load_checkpoint(path, device)
    return ckpt, path, "optimizer" not in ckpt


def restore_model(model: torch.nn.Module, ckpt: dict, optional: tuple[str, ...] = ()) -> None:
    """Load ``ckpt``'s model state; state keys starting with an ``optional`` prefix may be
    missing. A checkpoint of another model raises ``CheckpointError``."""
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if unexpected or [m for m in missing if not m.startswith(optional)]:
        raise CheckpointError(
            f"checkpoint does not match this model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): was it trained with other options?"
        )


def restore_run(ckpt: dict, *, optimizer, lr_scheduler, scaler, ema) -> None:
    """Load a full checkpoint's optimizer, schedules, EMA and torch's RNG states."""
    optimizer.load_state_dict(ckpt["optimizer"])
    lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and ckpt.get("ema") is not None:
        ema.load_state_dict(ckpt["ema"])
    torch.set_rng_state(ckpt["rng_cpu"].cpu())
    if torch.cuda.is_available() and ckpt.get("rng_cuda"):
        torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng_cuda"]])


class TrainerCheckpoints:
    """The Trainer's checkpoints (mixed into ``nerf.trainer.Trainer``: uses its ``model``,
    ``optimizer``, ``lr_scheduler``, ``scaler``, ``ema``, ``gate``, ``options``, ``ckpt_dir``,
    ``name``, ``epoch``, ``global_step``, ``cfg``, ``device``, ``log`` and ``ema_weights()``)."""

    def _components(self) -> dict:
        return {
            "optimizer": self.optimizer,
            "lr_scheduler": self.lr_scheduler,
            "scaler": self.scaler,
            "ema": self.ema,
        }

    def state(self) -> dict:
        """The run's full state (``run_state``)."""
        counters = {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "nonfinite_total": self.gate.nonfinite_total,
        }
        return run_state(counters, model=self.model, options=self.options, **self._components())

    def save_checkpoint(self, best: bool = False) -> Path:
        """Full state as ``df_ep{epoch:04d}.pth`` (the last ``--keep_ckpts`` are kept), or with
        ``best`` the EMA weights alone as ``df.pth`` (what export and later stages read)."""
        if best:
            with self.ema_weights():
                path = self.ckpt_dir / f"{self.name}.pth"
                return save_weights(self.model, path, epoch=self.epoch, global_step=self.global_step)
        return save_run(self.state(), self.ckpt_dir, self.name, self.epoch, self.cfg.keep_ckpts)

    def load_checkpoint(self, spec: str) -> Path | None:
        """Restore the checkpoint ``spec`` names (``read``: latest, latest_model, scratch, best or
        a path); returns the file used, or None."""
        found = read(spec, self.ckpt_dir, self.name, self.device, self.log, self.cfg.quiet)
        if found is None:
            return None
        ckpt, path, model_only = found
        restore_model(self.model, ckpt, self.model.state_optional)
        self.epoch = int(ckpt.get("epoch", 0))
        self.global_step = int(ckpt.get("global_step", 0))
        if self.ema is not None:
            # A weights-only checkpoint holds EMA weights already: start the average there.
            self.ema.shadow = [p.detach().clone() for p in self.ema.params]
        if model_only:
            return path
        restore_run(ckpt, **self._components())
        self.gate.nonfinite_total = int(ckpt.get("nonfinite_total", 0))
        self.log(
            f"[checkpoint] resumed at epoch {self.epoch}, step {self.global_step}", echo=not self.cfg.quiet
        )
        return path
