"""Training orchestration: ``Trainer.train_step`` and the loops, checkpoints, logs, videos.

The Trainer orchestrates; the renderer renders (``nerf/renderer.py``) and the guidance
scores (``guidance/``). Everything random draws from torch's global generator, whose state
is saved in each checkpoint, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import glob
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.config import option
from common.files import atomic_write
from common.rng import forked_rng
from guidance.base import GuidanceConfig

from .graphed import thaw
from .losses import LossConfig
from .mesh import MeshConfig
from .optimizer import EMA, Adan
from .provider import (
    BACK,
    BOTTOM,
    FRONT,
    INTERP_VIEWS,
    OVERHEAD,
    SIDE,
    SIDE_OTHER,
    CameraConfig,
    NeRFDataset,
    safe_normalize,
    view_prompt,
)


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses or gradients."""


@dataclass
class _StepRecord:
    """A training step's results on their way to the host: [ok, complete, loss, *parts] values."""

    step: int  # global step index (before the step)
    shading: str
    names: list[str]
    values: torch.Tensor
    event: torch.cuda.Event | None  # recorded after the copy (CUDA only)


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


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    return (img.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


def _normalize_depth(depth: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Min-max normalise depth over covered pixels (uncovered -> 0)."""
    d = depth.clone()
    if mask.any():
        lo, hi = d[mask].min(), d[mask].max()
        d = (d - lo) / (hi - lo + 1e-8)
    return torch.where(mask, d, torch.zeros_like(d))


def write_image(path: str | os.PathLike, arr: np.ndarray) -> None:
    import imageio.v2 as imageio

    atomic_write(path, lambda tmp: imageio.imwrite(tmp, arr))


def write_video(path: str | os.PathLike, frames: list[np.ndarray], fps: int = 25) -> bool:
    """Write an mp4 atomically; without an ffmpeg backend, warn once and return False (the
    frames are written as PNGs anyway)."""
    import imageio.v2 as imageio

    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        tqdm.write("[video] imageio-ffmpeg is not installed: mp4 skipped, PNG frames kept")
        return False
    atomic_write(path, lambda tmp: imageio.mimwrite(tmp, frames, fps=fps, quality=8, macro_block_size=1))
    return True


def weight_entropy(
    weights: torch.Tensor,
    n_pruned: int | torch.Tensor = 0,
    n_padding: int | torch.Tensor = 0,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Mean binary entropy (bits) of per-sample weights [M] clamped to [eps, 1 - eps].

    ``n_pruned`` samples that were dropped with weight 0 (``--prune_samples``) count with their
    constant entropy, so the mean is the one over every marched sample; the last ``n_padding``
    rows of ``weights`` are padding (``--graph_render``) and do not count. Either count may be
    a device tensor (no sync).

    >>> float(weight_entropy(torch.tensor([0.5]))), float(weight_entropy(torch.tensor([0.5]), 1))
    (1.0, 0.5000902414321899)
    >>> round(float(weight_entropy(torch.tensor([0.5, 0.0]), 1, torch.tensor(1))), 6)  # a padding row
    0.50009
    """
    a = weights.float().clamp(eps, 1 - eps)
    h = -a * torch.log2(a) - (1 - a) * torch.log2(1 - a)
    h0 = -eps * math.log2(eps) - (1 - eps) * math.log2(1 - eps)
    # Padding rows have weight 0, so each added h0 to the sum.
    count = h.numel() + n_pruned - n_padding
    count = count.clamp(min=1) if isinstance(count, torch.Tensor) else max(count, 1)
    return (h.sum() + (n_pruned - n_padding) * h0) / count


class Trainer:
    """Orchestrates training, validation, testing and checkpoints of one workspace."""

    name = "df"

    def __init__(
        self,
        cfg: TrainerConfig,
        model: torch.nn.Module,
        guidance: dict[str, torch.nn.Module],
        device: torch.device,
        *,
        losses: LossConfig = LossConfig(),
        cond: GuidanceConfig = GuidanceConfig(),
        options: dict | None = None,
    ):
        self.cfg, self.losses, self.cond = cfg, losses, cond
        # The run's whole option set, for the log and each checkpoint's record (never read).
        self.options = dict(options or {})
        self.device = device
        self.model = model.to(device)
        self.guidance = guidance
        self.workspace = Path(cfg.workspace)
        self.ckpt_dir = self.workspace / "checkpoints"
        for sub in ("checkpoints", "validation", "results", "run"):
            (self.workspace / sub).mkdir(parents=True, exist_ok=True)
        self.log_path = self.workspace / f"log_{self.name}.txt"

        # Precision: fp16 autocast with a GradScaler, or bf16 autocast without one.
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

        if cfg.optim == "adan":
            # Adan takes 5x the base rate; the hash grid gets a further 10x (get_params).
            self.optimizer = Adan(
                model.get_params(5 * cfg.lr), eps=1e-8, weight_decay=2e-5, max_grad_norm=5.0
            )
        else:
            self.optimizer = torch.optim.Adam(model.get_params(cfg.lr), betas=(0.9, 0.99), eps=1e-15)
        if getattr(model, "lr_decay", False):
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda it: 0.1 ** min(it / cfg.iters, 1.0)
            )
        else:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: 1.0)
        self.ema = EMA(model.parameters(), cfg.ema_decay) if cfg.ema_decay > 0 else None
        # With Adan the skip of a non-finite step is decided on the device, so on a GPU the
        # host reads each step's loss back one step later instead of waiting for it: the next
        # step's host work (batch, launches) overlaps the GPU's work on this one.
        self.defer_sync = device.type == "cuda"
        self._pending: _StepRecord | None = None

        self.epoch = 0
        self.global_step = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.incomplete_total = 0  # steps skipped because a --graph_render replay lost samples
        self.writer = None
        self.embeddings: dict[str, torch.Tensor] = {}
        self.log(f"[command] {' '.join(sys.argv)}")
        self.log(f"[options] {self.options}")
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.log(
            f"[model] {type(model).__module__}.{type(model).__name__}: {n_params:,} trainable parameters"
        )

    # --- logging ------------------------------------------------------------------------
    def log(self, msg: str, echo: bool = False) -> None:
        if echo:
            tqdm.write(msg)
        with open(self.log_path, "a") as f:
            f.write(msg + "\n")

    def _tb(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.workspace / "run" / self.name))
        return self.writer

    # --- prompts --------------------------------------------------------------------------
    def prepare_embeddings(self) -> None:
        """Embed the prompt, its view variants and the negative prompt once (disk-cached)."""
        cond = self.cond
        if "SD" not in self.guidance or cond.text is None:
            return
        sd = self.guidance["SD"]
        names = ["uncond", "default"] + list(INTERP_VIEWS)
        dirs = {"front": FRONT, "side": SIDE, "back": BACK, "overhead": OVERHEAD, "bottom": BOTTOM}
        prompts = [cond.negative, cond.text] + [view_prompt(cond.text, dirs[v]) for v in INTERP_VIEWS]
        # Loading a text encoder initialises weights from the global RNG: keep it out of the
        # training stream so a cached run and a fresh one draw the same random numbers.
        with forked_rng(self.device):
            embeds = sd.get_text_embeds(prompts)
        self.embeddings = {n: embeds[i : i + 1] for i, n in enumerate(names)}
        sd.release_text_encoder()

    def text_embeddings_for(self, data: dict) -> torch.Tensor:
        """[2B,77,D]: the negative prompt for each view, then the view-dependent prompt."""
        cond, E = self.cond, self.embeddings
        B = data["polar"].shape[0]
        if cond.view_prompt == "interp":
            w = data["view_weights"]  # interp_view_weights, computed with the cameras
            stack = torch.cat([E[v] for v in INTERP_VIEWS])  # [5,77,D]
            cond = torch.einsum("bk,kld->bld", w.to(stack.dtype), stack)
        elif cond.view_prompt == "discrete":
            by_class = {
                FRONT: "front",
                SIDE: "side",
                SIDE_OTHER: "side",
                BACK: "back",
                OVERHEAD: "overhead",
                BOTTOM: "bottom",
            }
            cond = torch.cat([E[by_class[int(d)]] for d in data["dir"]])
        else:
            cond = E["default"].expand(B, -1, -1)
        return torch.cat([E["uncond"].expand(B, -1, -1), cond])

    # --- one iteration ----------------------------------------------------------------------
    def progress(self, step: int | None = None) -> float:
        """Fraction of the run done at ``step`` (default: now), for schedules
        (``--exp_start_iter``/``--exp_end_iter``)."""
        cfg = self.cfg
        start = cfg.exp_start_iter or 0
        end = cfg.exp_end_iter or cfg.iters
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
        cfg, model = self.cfg, self.model
        ratio = self.progress()
        if cfg.progressive_level:
            model.max_level = min(1.0, 0.25 + 2.0 * ratio)
        shading, ambient, as_latent = self.shading_for_step(ratio)
        rays_o, rays_d = data["rays_o"], data["rays_d"]
        B, H, W = rays_o.shape[0], data["H"], data["W"]
        campos = data["poses"][:, :3, 3]
        light_d = safe_normalize(campos + torch.randn_like(campos))  # a light near the camera
        if model.bg_net is not None and torch.rand(()).item() > 0.5:
            bg_color = None  # the background network
        else:
            bg_color = torch.rand(B, 1, 3, device=self.device)  # one random solid colour per view
        out = model.render(
            rays_o,
            rays_d,
            light_d=light_d,
            ambient_ratio=ambient,
            shading=shading,
            bg_color=bg_color,
            perturb=True,
            need_normal=self.losses.lambda_2d_normal_smooth > 0,
        )
        image = out["image"].reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
        if as_latent:
            pred = torch.cat([image, out["weights_sum"].reshape(B, 1, H, W)], 1)
        else:
            pred = image
        if cfg.grad_clip_rgb > 0 and pred.requires_grad:
            limit = (
                cfg.grad_clip_rgb * self.scaler.get_scale() if self.scaler.is_enabled() else cfg.grad_clip_rgb
            )
            pred.register_hook(lambda g: g.clamp(-limit, limit))

        parts: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=self.device)
        if "SD" in self.guidance:
            parts["sds"] = self.guidance["SD"].train_step(
                self.text_embeddings_for(data),
                pred,
                guidance_scale=self.cond.guidance_scale,
                as_latent=as_latent,
                grad_scale=self.losses.lambda_guidance,
                save_guidance_path=save_guidance_path,
            )
            loss = loss + parts["sds"]

        # Regularizers.
        if self.losses.lambda_entropy > 0 and "weights" in out:
            entropy = weight_entropy(out["weights"], out.get("n_pruned", 0), out.get("n_padding", 0))
            parts["entropy"] = (
                self.losses.lambda_entropy * min(1.0, 2 * self.global_step / cfg.iters) * entropy
            )
        if self.losses.lambda_opacity > 0:
            parts["opacity"] = self.losses.lambda_opacity * (out["weights_sum"].float() ** 2).mean()
        if self.losses.lambda_orient > 0 and "loss_orient" in out:
            parts["orient"] = self.losses.lambda_orient * out["loss_orient"]
        if self.losses.lambda_2d_normal_smooth > 0 and "normal_image" in out:
            n = out["normal_image"].reshape(B, H, W, 3)
            tv = ((n[:, 1:] - n[:, :-1]) ** 2).mean() + ((n[:, :, 1:] - n[:, :, :-1]) ** 2).mean()
            parts["normal_2d"] = self.losses.lambda_2d_normal_smooth * tv
        if self.losses.lambda_3d_normal_smooth > 0:
            ws = out["weights_sum"].reshape(-1).detach()
            hit = ws > 0.5
            if hit.any():
                depth = out["depth"].reshape(-1).detach()[hit] / ws[hit]
                x = rays_o.reshape(-1, 3)[hit] + rays_d.reshape(-1, 3)[hit] * depth[:, None]
                n1 = model.normal(x)
                n2 = model.normal(x + torch.randn_like(x) * 0.01)
                parts["normal_3d"] = self.losses.lambda_3d_normal_smooth * (n1 - n2).abs().mean()
        enc = getattr(model, "encoder", None)
        if self.losses.lambda_wd > 0 and hasattr(enc, "embeddings"):
            parts["wd"] = self.losses.lambda_wd * (enc.embeddings.float() ** 2).mean()
        if self.losses.lambda_tv > 0 and hasattr(enc, "embeddings"):
            # TV of the grid features: differences between neighbours one finest cell apart.
            x = (torch.rand(4096, 3, device=self.device) * 2 - 1) * model.bound
            step = 2 * model.bound / model.field_cfg.grid_finest
            dx = F.one_hot(torch.randint(0, 3, (4096,), device=self.device), 3).float() * step
            parts["tv"] = (
                self.losses.lambda_tv
                * min(1.0, 2 * ratio)
                * (enc(x, model.bound) - enc(x + dx, model.bound)).pow(2).mean()
            )
        for k, v in parts.items():
            if k != "sds":
                loss = loss + v
        # Detached 0-d tensors, not floats: train_one_step reads them all in one device->host copy.
        # "complete" (--graph_render): False when the fixed-size render had too few rows.
        return loss, {
            **{k: v.detach() for k, v in parts.items()},
            "shading": shading,
            "complete": out.get("complete"),
        }

    def autocast(self) -> torch.autocast:
        """The run's autocast context (``--fp16``/``--bf16``; disabled in float32)."""
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        )

    def _grads_finite_flag(self) -> torch.Tensor:
        """0-d bool tensor on the device: every gradient is finite (no host sync)."""
        grads = [
            p.grad
            for g in self.optimizer.param_groups
            for p in g["params"]
            if p.grad is not None and p.grad.numel()
        ]
        if not grads:
            return torch.ones((), dtype=torch.bool, device=self.device)
        # Each gradient's largest |entry| in one multi-tensor kernel (not two launches per
        # tensor): finite exactly when every entry is, as a max carries NaN and inf through and,
        # unlike a sum of squares, cannot overflow.
        peaks = torch._foreach_norm(grads, ord=float("inf"))
        return torch.isfinite(
            torch.stack([x if x.dtype == torch.float32 else x.float() for x in peaks])
        ).all()

    def _gated(self) -> bool:
        """The optimizer can skip a non-finite step on the device (Adan on fp32 parameters)."""
        return isinstance(self.optimizer, Adan) and self.optimizer.can_gate()

    def train_one_step(self, data: dict) -> dict | None:
        """One optimisation step. Non-finite losses/gradients skip the step (counted);
        ``--max_nonfinite`` of them in a row stop the run.

        Returns the parts of a finished step (loss, each term, ``ok``, ``step``): this step's,
        or with ``defer_sync`` the previous step's (None after the first; ``flush()`` gives
        the last). With Adan the skip is decided on the device, so the host reads the loss
        back one step late, while the GPU works, instead of waiting for it every step."""
        cfg, model = self.cfg, self.model
        model.train()
        if model.cuda_ray and self.global_step % model.cfg.update_extra_interval == 0:
            with self.autocast():
                model.update_extra_state()
        self.optimizer.zero_grad(set_to_none=True)
        save_path = None
        if cfg.save_guidance and self.global_step % cfg.save_guidance_interval == 0:
            save_path = str(self.workspace / "guidance" / f"step_{self.global_step:07d}.png")
        with self.autocast():
            loss, parts = self.train_step(data, save_guidance_path=save_path)
        complete = parts.pop("complete", None)
        # Backward runs before the loss is checked (a non-finite loss gives non-finite
        # gradients, so the step is skipped all the same); the loss, its parts and the
        # finiteness flag come back in a single device->host copy.
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        finite = torch.isfinite(loss.detach()) & self._grads_finite_flag()
        if complete is not None:
            # A graph-replayed render that lost samples is skipped like a non-finite step: its
            # gradient is never applied, and the decision stays on the device.
            finite = finite & complete
        rec = self._readback(finite, loss, parts, complete)
        done: _StepRecord | dict | None
        if self._gated():
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_value_(model.parameters(), cfg.grad_clip)
            # = scaler.step(optimizer) with the found-inf decision left on the device.
            self.optimizer.step(ok=finite)
            self.scaler.update()  # lowers the loss scale after an overflow, as GradScaler does
            if self.ema is not None:
                self.ema.update(ok=finite)
            if self.defer_sync:
                done, self._pending = self._pending, rec  # read back at the next step
            else:
                done = rec
        else:
            done = self._finish(rec)  # the host decides: one sync per step
            if done["ok"]:
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_value_(model.parameters(), cfg.grad_clip)
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update()
            else:
                self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update()
        self.lr_scheduler.step()
        self.global_step += 1
        return self._finish(done) if isinstance(done, _StepRecord) else done

    def flush(self) -> dict | None:
        """The parts of a step still being read back (``defer_sync``), or None."""
        rec, self._pending = self._pending, None
        return None if rec is None else self._finish(rec)

    def _readback(
        self, finite: torch.Tensor, loss: torch.Tensor, parts: dict, complete: torch.Tensor | None = None
    ) -> _StepRecord:
        """Start copying the step's flags, loss and parts to the host (no wait on a GPU)."""
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
        return _StepRecord(self.global_step, parts.get("shading", ""), names, values, event)

    def _finish(self, rec: _StepRecord) -> dict:
        """Read a step's values (waiting for its copy), count skips; may stop the run."""
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
        if self.nonfinite_run >= self.cfg.max_nonfinite:
            raise TrainingDiverged(
                f"{self.nonfinite_run} non-finite steps in a row at step {rec.step}; stopped. "
                f"The last good checkpoint is kept in {self.ckpt_dir}. Try --precision fp32, a lower --lr "
                f"or --grad_clip 1"
            )
        return parts

    # --- loops ------------------------------------------------------------------------------
    def _log_step(self, parts: dict, bar: tqdm, losses: list[float]) -> None:
        """Progress bar, loss list and (every 10 steps or on a skip) TensorBoard for one
        finished step."""
        step = parts["step"]
        if parts["ok"]:
            losses.append(parts["loss"])
        if step % 10 == 0 or not parts["ok"]:
            w = self._tb()
            for k, v in parts.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    w.add_scalar(f"train/{k}", v, step)
            w.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], step)
            if self.model.cuda_ray:
                w.add_scalar("train/occupancy", self.model.occupancy(), step)
        bar.set_postfix(loss=f"{parts['loss']:.4g}", it_s=f"{bar.format_dict.get('rate') or 0:.2f}")

    def train(
        self, train_set: NeRFDataset, valid_set: NeRFDataset | None, test_set: NeRFDataset | None
    ) -> None:
        cfg = self.cfg
        per_epoch = train_set.size
        max_epoch = math.ceil(cfg.iters / per_epoch)
        kill_at = int(os.environ.get("DREAMFUSION_KILL_AFTER_STEP", "0"))  # fault injection for tests
        self.prepare_embeddings()
        start = time.time()
        try:
            self._train_epochs(train_set, valid_set, test_set, max_epoch, per_epoch, kill_at)
        finally:
            thaw()  # --graph_render froze the run's objects for cheap collections: not past the run
        self.log(f"[done] {self.global_step} steps in {time.time() - start:.1f} s", echo=not cfg.quiet)

    def _train_epochs(
        self, train_set, valid_set, test_set, max_epoch: int, per_epoch: int, kill_at: int
    ) -> None:
        cfg = self.cfg
        while self.epoch < max_epoch and self.global_step < cfg.iters:
            self.epoch += 1
            steps = min(per_epoch, cfg.iters - self.global_step)
            bar = tqdm(
                total=steps,
                desc=f"epoch {self.epoch}/{max_epoch}",
                dynamic_ncols=True,
                leave=False,
                disable=cfg.quiet,
            )
            t0, losses = time.time(), []
            # The epoch's cameras are drawn a block at a time (one vectorised draw instead of
            # a hundred small ops per step); a resumed run redraws the same ones.
            g0 = self.global_step
            progressive = train_set.cameras.progressive_view
            progress = [self.progress(g0 + i) if progressive else None for i in range(steps)]
            for data in train_set.iter_train_batches(progress):
                parts = self.train_one_step(data)
                if parts is not None:
                    self._log_step(parts, bar, losses)
                bar.update(1)
                if kill_at and self.global_step == kill_at:
                    os._exit(3)
            parts = self.flush()
            if parts is not None:
                self._log_step(parts, bar, losses)
            bar.close()
            mean_loss = float(np.mean(losses)) if losses else float("nan")
            mem = ""
            if self.device.type == "cuda":
                mem = (
                    f", peak {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB allocated, "
                    f"{torch.cuda.max_memory_reserved(self.device) / 2**30:.2f} GiB reserved"
                )
            self.log(
                f"[epoch {self.epoch}] step {self.global_step} loss {mean_loss:.5g} "
                f"({steps / max(time.time() - t0, 1e-9):.2f} it/s, skipped {self.nonfinite_total}"
                f"{f' + {self.incomplete_total} incomplete renders' if self.incomplete_total else ''}{mem})",
                echo=not cfg.quiet,
            )
            self.save_checkpoint()
            last = self.global_step >= cfg.iters
            if valid_set is not None and (self.epoch % cfg.eval_interval == 0 or last):
                self.evaluate(valid_set)
            if test_set is not None and (self.epoch % cfg.test_interval == 0 or last):
                self.test(test_set)

    def _render_frame(self, data: dict, shading: str = "albedo", need_normal: bool = False) -> dict:
        with torch.no_grad(), self.autocast():
            out = self.model.render(
                data["rays_o"],
                data["rays_d"],
                shading=shading,
                bg_color=None,
                perturb=False,
                need_normal=need_normal,
                max_ray_batch=self.model.cfg.max_ray_batch,
            )
        H, W = data["H"], data["W"]
        ws = out["weights_sum"].reshape(H, W).float()
        res = {
            "rgb": out["image"].reshape(H, W, -1)[..., :3].float(),
            "depth": _normalize_depth(out["depth"].reshape(H, W).float() / ws.clamp(min=1e-6), ws > 0.05),
            "alpha": ws,
        }
        if "normal_image" in out:
            n = out["normal_image"].reshape(H, W, 3).float()
            white = torch.ones_like(n)
            res["normal"] = (n + ws[..., None]) / 2 + (1 - ws[..., None]) * white
        return res

    def _with_ema(self):
        trainer = self

        class _Swap:
            def __enter__(self):
                if trainer.ema is not None:
                    trainer.ema.swap()

            def __exit__(self, *exc):
                if trainer.ema is not None:
                    trainer.ema.swap()

        return _Swap()

    def evaluate(self, valid_set: NeRFDataset) -> None:
        """Validation frames (EMA weights, albedo) around the default view; RNG untouched."""
        self.model.eval()
        rows = []
        with (
            forked_rng(self.device),
            self._with_ema(),
        ):
            for i in range(len(valid_set)):
                r = self._render_frame(valid_set.circle_batch(i), need_normal=True)
                stem = self.workspace / "validation" / f"{self.name}_ep{self.epoch:04d}_{i:04d}"
                write_image(f"{stem}_rgb.png", _to_uint8(r["rgb"]))
                write_image(f"{stem}_depth.png", _to_uint8(r["depth"]))
                row = [r["rgb"], r["depth"][..., None].expand(-1, -1, 3)]
                if "normal" in r:
                    write_image(f"{stem}_normal.png", _to_uint8(r["normal"]))
                    row.append(r["normal"])
                rows.append(torch.cat(row, 0))
        sheet = torch.cat(rows, 1)  # one column per view: rgb / depth / normal
        sheet_path = self.workspace / "validation" / f"{self.name}_ep{self.epoch:04d}_sheet.png"
        write_image(sheet_path, _to_uint8(sheet))
        self._tb().add_image("val/sheet", sheet.permute(2, 0, 1).clamp(0, 1).cpu(), self.global_step)
        self.save_checkpoint(best=True)
        self.write_index(sheet=sheet_path)
        self.model.train()

    def test(self, test_set: NeRFDataset, write_frames: bool = True) -> dict[str, Path]:
        """A 360-degree turntable: rgb, depth and normal videos (mp4) and frames (EMA weights)."""
        self.model.eval()
        frames: dict[str, list[np.ndarray]] = {"rgb": [], "depth": [], "normal": []}
        frame_dir = self.workspace / "results" / f"{self.name}_ep{self.epoch:04d}_frames"
        if write_frames:
            frame_dir.mkdir(parents=True, exist_ok=True)
        with (
            forked_rng(self.device),
            self._with_ema(),
        ):
            for i in tqdm(range(len(test_set)), desc="test video", leave=False, disable=self.cfg.quiet):
                r = self._render_frame(test_set.circle_batch(i), need_normal=True)
                for k in frames:
                    arr = _to_uint8(r[k] if k != "depth" else r[k][..., None].expand(-1, -1, 3))
                    frames[k].append(arr)
                    if write_frames:
                        write_image(frame_dir / f"{i:04d}_{k}.png", arr)
        paths = {}
        for k, fr in frames.items():
            p = self.workspace / "results" / f"{self.name}_ep{self.epoch:04d}_{k}.mp4"
            if write_video(p, fr):
                paths[k] = p
        written = [str(p) for p in paths.values()] + ([f"frames in {frame_dir}"] if write_frames else [])
        self.log(f"[test] wrote {', '.join(written) or 'nothing'}", echo=not self.cfg.quiet)
        self.write_index(videos=paths)
        self.model.train()
        return paths

    def write_index(
        self, sheet: Path | None = None, videos: dict[str, Path] | None = None, mesh: dict | None = None
    ):
        """``<workspace>/README.md`` links the latest results (contact sheet, videos, mesh)."""
        index = self.workspace / "README.md"
        links = getattr(self, "_links", {})
        if sheet is not None:
            links["validation contact sheet"] = sheet
        for k, p in (videos or {}).items():
            links[f"test video ({k})"] = p
        for k, p in (mesh or {}).items():
            links[f"mesh ({k})"] = p
        self._links = links
        lines = [f"# {self.cond.text or 'run'}", "", f"step {self.global_step}, epoch {self.epoch}", ""]
        lines += [f"- [{k}]({os.path.relpath(p, self.workspace)})" for k, p in links.items()]
        atomic_write(index, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))

    def six_views(self, cameras: CameraConfig) -> list[Path]:
        """PNGs of the front, right, back, left, top and bottom views (EMA weights)."""
        from .provider import circle_poses, get_rays, intrinsics_from_fovy

        o, H, W = cameras, cameras.H, cameras.W
        views = {
            "front": (90.0, 0.0),
            "right": (90.0, 90.0),
            "back": (90.0, 180.0),
            "left": (90.0, -90.0),
            "top": (1e-3, 0.0),
            "bottom": (180 - 1e-3, 0.0),
        }
        paths = []
        self.model.eval()
        with (
            forked_rng(self.device),
            self._with_ema(),
        ):
            for name, (theta, phi) in views.items():
                poses = circle_poses(
                    torch.tensor([o.default_radius]), torch.tensor([theta]), torch.tensor([phi]), self.device
                )
                intr = intrinsics_from_fovy(torch.tensor([o.default_fovy], device=self.device), H, W)
                rays_o, rays_d = get_rays(poses, intr, H, W)
                r = self._render_frame({"rays_o": rays_o, "rays_d": rays_d, "H": H, "W": W})
                path = self.workspace / "results" / f"{self.name}_ep{self.epoch:04d}_{name}.png"
                write_image(path, _to_uint8(r["rgb"]))
                paths.append(path)
        return paths

    def save_mesh(self, o: MeshConfig = MeshConfig()) -> dict:
        """Export the field (EMA weights) as a textured mesh into ``<workspace>/mesh``."""
        from .mesh import export_mesh

        model = self.model
        model.eval()

        def density_fn(x):
            return model.density(x)["sigma"].float()

        def albedo_fn(x):
            return model.density(x)["albedo"].float()

        mean = float(model.mean_density) if getattr(model, "cuda_ray", False) else None
        with self._with_ema():
            paths = export_mesh(
                density_fn,
                albedo_fn,
                self.workspace / "mesh",
                bound=model.bound,
                resolution=o.mcubes_resolution,
                density_thresh=model.density_thresh,
                mean_density=mean,
                decimate_target=int(o.decimate_target),
                texture_size=o.texture_size,
                formats=tuple(o.mesh_format),
                device=self.device,
                progress=not self.cfg.quiet,
            )
        self.log(f"[mesh] wrote {', '.join(str(p) for p in paths.values())}", echo=not self.cfg.quiet)
        self.write_index(mesh=paths)
        return paths

    # --- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict:
        opt_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.options.items()}
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "nonfinite_total": self.nonfinite_total,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "opt": opt_dict,
        }

    def save_checkpoint(self, best: bool = False) -> Path:
        """Full state as ``df_ep{epoch:04d}.pth`` (the last ``--keep_ckpts`` are kept), or with
        ``best`` the EMA weights alone as ``df.pth`` (what export and later stages read)."""
        if best:
            with self._with_ema():
                state = {
                    "epoch": self.epoch,
                    "global_step": self.global_step,
                    "model": {k: v.clone() for k, v in self.model.state_dict().items()},
                }
            path = self.ckpt_dir / f"{self.name}.pth"
            atomic_save(state, path)
            return path
        path = self.ckpt_dir / f"{self.name}_ep{self.epoch:04d}.pth"
        atomic_save(self.state(), path)
        old = sorted(glob.glob(str(self.ckpt_dir / f"{self.name}_ep*.pth")))
        for p in old[: -self.cfg.keep_ckpts]:
            os.remove(p)
        return path

    def load_checkpoint(self, spec: str) -> Path | None:
        """``latest`` (newest full checkpoint, falling back to older ones if it is unreadable),
        ``scratch`` (none), ``best`` (df.pth, weights only) or a path. Returns the file used."""
        if spec == "scratch":
            return None
        if spec in ("latest", "latest_model"):
            cands = sorted(glob.glob(str(self.ckpt_dir / f"{self.name}_ep*.pth")), reverse=True)
            if not cands:
                self.log("[checkpoint] none found, training from scratch", echo=not self.cfg.quiet)
                return None
            errors = []
            for c in cands:
                try:
                    ckpt = load_checkpoint(c, self.device)
                except CheckpointError as e:
                    errors.append(str(e))
                    self.log(f"[checkpoint] {e}; trying an older one", echo=True)
                    continue
                self._restore(ckpt, model_only=spec == "latest_model")
                return Path(c)
            raise CheckpointError("; ".join(errors))
        path = self.ckpt_dir / f"{self.name}.pth" if spec == "best" else Path(spec)
        ckpt = load_checkpoint(path, self.device)
        self._restore(ckpt, model_only="optimizer" not in ckpt)
        return path

    def _restore(self, ckpt: dict, model_only: bool = False) -> None:
        missing, unexpected = self.model.load_state_dict(ckpt["model"], strict=False)
        if unexpected or [m for m in missing if not m.startswith("encoder_bg")]:
            raise CheckpointError(
                f"checkpoint does not match this model (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}): was it trained with other options?"
            )
        self.epoch = int(ckpt.get("epoch", 0))
        self.global_step = int(ckpt.get("global_step", 0))
        if self.ema is not None:
            # A weights-only checkpoint holds EMA weights already: start the average there.
            self.ema.shadow = [p.detach().clone() for p in self.ema.params]
        if model_only:
            return
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.nonfinite_total = int(ckpt.get("nonfinite_total", 0))
        torch.set_rng_state(ckpt["rng_cpu"].cpu())
        if torch.cuda.is_available() and ckpt.get("rng_cuda"):
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng_cuda"]])
        self.log(
            f"[checkpoint] resumed at epoch {self.epoch}, step {self.global_step}", echo=not self.cfg.quiet
        )
