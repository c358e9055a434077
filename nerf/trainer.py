"""Training orchestration: ``Trainer.train_step``, ``train_one_step`` and the loops.

The Trainer talks to the model through ``nerf.representation.Representation`` and to the priors
through ``guidance.base.Guidance``. Regularizers: ``nerf/losses.py``; the non-finite step gate:
``nerf/step_gate.py``; checkpoints (``TrainerCheckpoints``): ``nerf/checkpoint.py``; the log,
images, videos and the workspace index (``TrainerOutputs``): ``nerf/outputs.py``. Everything
random draws from torch's global generator, whose state each checkpoint saves.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from common.config import option
from guidance.base import Guidance, GuidanceConfig

from .checkpoint import TrainerCheckpoints
from .fast.graphed import collector_frozen
from .losses import LossConfig
from .optimizer import EMA, Adan
from .outputs import TrainerOutputs, WorkspaceIndex
from .provider import NeRFDataset
from .representation import Representation
from .step_gate import StepGate, grads_finite_flag, readback


@dataclass(frozen=True)
class TrainerConfig:
    """The run: workspace, schedule, optimiser, precision, checkpoints, shading schedule."""

    workspace: str = option("workspace", "output folder")
    iters: int = option(10000, "training iterations")
    lr: float = option(1e-3, "base learning rate (Adan uses 5x; the grid a further 10x)")
    ckpt: str = option("latest", "latest | scratch | best | latest_model | PATH")
    optim: str = option("adan", "optimizer", choices=["adan", "adam"])
    precision: str = option(
        "fp32",
        "fp16: autocast + GradScaler; bf16: autocast; CUDA only (fp32 on CPU)",
        choices=["fp32", "fp16", "bf16"],
    )
    ema_decay: float = option(
        0.99, "EMA of the weights, updated every step (0 = off); validation and test render the EMA weights"
    )
    grad_clip: float = option(-1.0, "clip gradient values (negative = off)")
    grad_clip_rgb: float = option(-1.0, "clip the gradient on the rendered image (negative = off)")
    max_nonfinite: int = option(20, "stop after this many non-finite steps in a row")
    keep_ckpts: int = option(2, "full checkpoints kept")
    eval_interval: int = option(1, "validate every N epochs")
    test_interval: int = option(100, "write the test video every N epochs (and at the end)")
    exp_start_iter: int | None = option(None, "start of the schedules (default 0)")
    exp_end_iter: int | None = option(None, "end of the schedules (default --iters)")
    quiet: bool = option(False, "no progress bars or per-epoch lines")
    save_guidance: bool = option(False, "write [render, noisy, x0] strips to workspace/guidance/")
    save_guidance_interval: int = option(10, "period of --save_guidance in steps")
    progressive_level: bool = option(
        False, "coarse-to-fine: the fraction of encoder levels in use is min(1, 0.25 + 2 * progress)"
    )
    latent_iter_ratio: float = option(
        0.2, "fraction of the run that feeds normal shading + mask to the prior as its latent"
    )
    albedo_iter_ratio: float = option(
        0.0, "fraction of the run (counted from the start) with albedo-only shading"
    )
    min_ambient_ratio: float = option(0.1, "lower bound of the random ambient ratio")
    textureless_ratio: float = option(0.2, "probability of textureless shading")


class Trainer(TrainerCheckpoints, TrainerOutputs):
    """Trains one ``Representation`` with the ``guidance`` priors in one workspace."""

    name = "df"

    def __init__(
        self,
        cfg: TrainerConfig,
        model: Representation,
        guidance: dict[str, Guidance],
        device: torch.device,
        *,
        losses: LossConfig = LossConfig(),
        cond: GuidanceConfig = GuidanceConfig(),
        options: dict | None = None,
    ):
        self.cfg, self.losses, self.cond, self.device = cfg, losses, cond, device
        # The run's whole option set, for the log and each checkpoint's record (never read).
        self.options = dict(options or {})
        self.model, self.guidance = model.to(device), guidance
        self.workspace = Path(cfg.workspace)
        self.ckpt_dir = self.workspace / "checkpoints"
        self._open_workspace()  # its folders and log (TrainerOutputs)
        # Precision: fp16 autocast with a GradScaler, or bf16 autocast without one.
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        if cfg.optim == "adan":  # 5x the base rate; the hash grid a further 10x (get_params)
            groups = model.get_params(5 * cfg.lr)
            self.optimizer = Adan(groups, eps=1e-8, weight_decay=2e-5, max_grad_norm=5.0)
        else:
            self.optimizer = torch.optim.Adam(model.get_params(cfg.lr), betas=(0.9, 0.99), eps=1e-15)
        decay = model.lr_decay  # 10x over the run, or none
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: 0.1 ** min(it / cfg.iters, 1.0) if decay else 1.0
        )
        self.ema = EMA(model.parameters(), cfg.ema_decay) if cfg.ema_decay > 0 else None
        # With Adan a non-finite step is skipped on the device, so on a GPU the host reads each
        # step's loss back one step late: the next step's host work overlaps the GPU's work.
        self.defer_sync = device.type == "cuda"
        self.gate = StepGate(cfg.max_nonfinite, self.log, self.ckpt_dir)
        self.index = WorkspaceIndex(self.workspace)
        self.epoch = self.global_step = 0
        self._log_start()

    # --- the guidance ------------------------------------------------------------------------
    def prepare_guidance(self) -> None:
        """Each prior prepares its conditioning once (prompt embeddings, disk-cached)."""
        for g in self.guidance.values():
            g.prepare(self.cond)

    def guidance_losses(self, pred: torch.Tensor, data: dict, as_latent: bool, save_path: str | None):
        """{part name: loss} of each prior on renders ``pred`` [B,3|4,H,W] of ``data``'s cameras:
        "sds" for Stable Diffusion (the reference's name), ``sds_<name>`` for the others."""
        kw = dict(as_latent=as_latent, grad_scale=self.losses.lambda_guidance, save_guidance_path=save_path)
        return {
            "sds" if name == "SD" else f"sds_{name}": g.train_step(pred, data, **kw)
            for name, g in self.guidance.items()
        }

    # --- one iteration ------------------------------------------------------------------------
    def progress(self, step: int | None = None) -> float:
        """Fraction of the schedules (``--exp_start_iter``..``--exp_end_iter``) done at ``step``."""
        cfg = self.cfg
        start, end = cfg.exp_start_iter or 0, cfg.exp_end_iter or cfg.iters
        step = self.global_step if step is None else step
        return min(max((step - start) / max(end - start, 1), 0.0), 1.0)

    def shading_for_step(self, ratio: float) -> tuple[str, float, bool]:
        """(shading, ambient ratio, as_latent) of this step: the latent warm-up renders normals
        + mask as the latent; then albedo; then random ambient with lambertian or textureless."""
        cfg = self.cfg
        if ratio < cfg.latent_iter_ratio:
            return "normal", 1.0, True
        if ratio < cfg.albedo_iter_ratio:
            return "albedo", 1.0, False
        ambient = cfg.min_ambient_ratio + (1 - cfg.min_ambient_ratio) * torch.rand(()).item()
        shading = "textureless" if torch.rand(()).item() < cfg.textureless_ratio else "lambertian"
        return shading, ambient, False

    def train_step(self, data: dict, save_guidance_path: str | None = None) -> tuple[torch.Tensor, dict]:
        """Render one batch of random cameras and score it: returns (loss, parts)."""
        cfg, losses, ratio = self.cfg, self.losses, self.progress()
        shading, ambient, as_latent = self.shading_for_step(ratio)
        need_normal = losses.lambda_2d_normal_smooth > 0
        out = self.model.render_batch(
            data, shading=shading, ambient_ratio=ambient, need_normal=need_normal, training=True
        )
        pred = torch.cat([out["rgb"], out["opacity"]], 1) if as_latent else out["rgb"]
        if cfg.grad_clip_rgb > 0 and pred.requires_grad:
            clip = cfg.grad_clip_rgb
            limit = clip * self.scaler.get_scale() if self.scaler.is_enabled() else clip
            pred.register_hook(lambda g: g.clamp(-limit, limit))
        parts: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=self.device)
        for k, v in self.guidance_losses(pred, data, as_latent, save_guidance_path).items():
            parts[k] = v
            loss = loss + v
        scored = set(parts)
        # The entropy ramps in over the first half of the steps, the grid TV of the schedule.
        elapsed = self.global_step / cfg.iters
        parts.update(self.model.regularizers(out, data, losses, progress=ratio, elapsed=elapsed))
        for k, v in parts.items():
            if k not in scored:
                loss = loss + v
        # Detached 0-d tensors, not floats: train_one_step reads them all in one device->host copy.
        # "complete" (--graph_render): False when the fixed-size render had too few rows.
        detached = {k: v.detach() for k, v in parts.items()}
        return loss, {**detached, "shading": shading, "complete": out.get("complete")}

    def autocast(self) -> torch.autocast:
        """The run's autocast context (``--fp16``/``--bf16``; disabled in float32)."""
        dtype, enabled = self.amp_dtype or torch.float32, self.amp_dtype is not None
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled)

    def train_one_step(self, data: dict) -> dict | None:
        """One optimisation step; a non-finite loss or gradient skips it (``StepGate``). Returns
        the parts of a finished step (loss, each term, ``ok``, ``step``): this step's, or with
        ``defer_sync`` the previous step's (None after the first; ``flush()`` gives the last)."""
        cfg, model = self.cfg, self.model
        model.train()
        with self.autocast():
            model.before_step(self.global_step, self.progress(), progressive_level=cfg.progressive_level)
        self.optimizer.zero_grad(set_to_none=True)
        save_path = None
        if cfg.save_guidance and self.global_step % cfg.save_guidance_interval == 0:
            save_path = str(self.workspace / "guidance" / f"step_{self.global_step:07d}.png")
        with self.autocast():
            loss, parts = self.train_step(data, save_guidance_path=save_path)
        complete = parts.pop("complete", None)
        # Backward before the loss is checked (a non-finite loss gives non-finite gradients); the
        # loss, its parts and the finiteness flag come back in a single device->host copy.
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        finite = torch.isfinite(loss.detach()) & grads_finite_flag(self.optimizer, self.device)
        if complete is not None:  # a graphed render that lost samples is skipped alike, on the device
            finite = finite & complete
        rec = readback(self.global_step, finite, loss, parts, complete)
        step = dict(optimizer=self.optimizer, scaler=self.scaler, ema=self.ema, grad_clip=cfg.grad_clip)
        done = self.gate.update(rec, finite, params=model.parameters(), defer=self.defer_sync, **step)
        self.lr_scheduler.step()
        self.global_step += 1
        return done

    def flush(self) -> dict | None:
        """The parts of a step still being read back (``defer_sync``), or None."""
        return self.gate.flush()

    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA weights in the model inside the block (nothing to swap without EMA)."""
        if self.ema is not None:
            self.ema.swap()
        try:
            yield
        finally:
            if self.ema is not None:
                self.ema.swap()

    # --- loops ----------------------------------------------------------------------------------
    def train(self, train_set: NeRFDataset, valid_set: NeRFDataset | None, test_set: NeRFDataset | None):
        """Train to ``--iters`` steps: a checkpoint each epoch, validation and test videos."""
        cfg, per_epoch = self.cfg, train_set.size
        max_epoch = math.ceil(cfg.iters / per_epoch)
        kill_at = int(os.environ.get("DREAMFUSION_KILL_AFTER_STEP", "0"))  # fault injection for tests
        self.prepare_guidance()
        start = time.time()
        # Graph captures (--graph_render, --graph_pass) freeze the run's objects for cheap
        # collections, for the loop's duration only.
        with collector_frozen():
            while self.epoch < max_epoch and self.global_step < cfg.iters:
                self.epoch += 1
                steps = min(per_epoch, cfg.iters - self.global_step)
                desc = f"epoch {self.epoch}/{max_epoch}"
                bar = tqdm(total=steps, desc=desc, dynamic_ncols=True, leave=False, disable=cfg.quiet)
                t0, losses, g0 = time.time(), [], self.global_step
                # The epoch's cameras in one vectorised draw (a resumed run redraws the same ones).
                progressive = train_set.cameras.progressive_view
                progress = [self.progress(g0 + i) if progressive else None for i in range(steps)]
                for data in train_set.iter_train_batches(progress):
                    if (parts := self.train_one_step(data)) is not None:
                        self._log_step(parts, bar, losses)
                    bar.update(1)
                    if kill_at and self.global_step == kill_at:
                        os._exit(3)
                if (parts := self.flush()) is not None:
                    self._log_step(parts, bar, losses)
                bar.close()
                self._log_epoch(steps, time.time() - t0, losses)
                self.save_checkpoint()
                last = self.global_step >= cfg.iters
                if valid_set is not None and (self.epoch % cfg.eval_interval == 0 or last):
                    self.evaluate(valid_set)
                if test_set is not None and (self.epoch % cfg.test_interval == 0 or last):
                    self.test(test_set)
        self.log(f"[done] {self.global_step} steps in {time.time() - start:.1f} s", echo=not cfg.quiet)
