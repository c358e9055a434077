"""What a run writes besides checkpoints: its log, validation contact sheets, turntable videos,
six views, the mesh and the workspace's README index. Every file is written atomically.

The functions render through ``Representation.render_batch`` (``nerf/representation.py``) with
the weights the model holds; ``TrainerOutputs``, the Trainer's side of them, swaps the EMA
weights in, puts the model in eval mode and forks the RNG around them.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.files import atomic_write, remove_stale_temps
from common.rng import forked_rng

from .mesh import MeshConfig
from .provider import CameraConfig, NeRFDataset

Autocast = Callable[[], AbstractContextManager]  # the run's autocast context (Trainer.autocast)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """[...] values in [0,1] (clamped) -> uint8 array.

    >>> to_uint8(torch.tensor([0.0, 0.5, 2.0])).tolist()
    [0, 128, 255]
    """
    return (img.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


def normalize_depth(depth: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Min-max normalise depth [H,W] over the covered pixels ``mask`` [H,W] (uncovered -> 0).

    >>> normalize_depth(torch.tensor([1.0, 3.0, 9.0]), torch.tensor([True, True, False])).tolist()
    [0.0, 1.0, 0.0]
    """
    d = depth.clone()
    if mask.any():
        lo, hi = d[mask].min(), d[mask].max()
        d = (d - lo) / (hi - lo + 1e-8)
    return torch.where(mask, d, torch.zeros_like(d))


def write_image(path: str | os.PathLike, arr: np.ndarray) -> None:
    """Write an image (PNG by the suffix) atomically; ``arr`` [H,W] or [H,W,3] uint8."""
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


def render_frame(
    model, data: dict, autocast: Autocast, shading: str = "albedo", need_normal: bool = False
) -> dict[str, torch.Tensor]:
    """One camera's frame without gradients: ``rgb`` [H,W,3], ``depth`` [H,W] (normalised
    over the covered pixels), ``alpha`` [H,W], and with normals ``normal`` [H,W,3] in [0,1]
    (white where uncovered)."""
    with torch.no_grad(), autocast():
        out = model.render_batch(data, shading=shading, need_normal=need_normal)
    ws = out["opacity"][0, 0].float()
    res = {
        "rgb": out["rgb"][0].permute(1, 2, 0)[..., :3].float(),
        "depth": normalize_depth(out["depth"][0, 0].float() / ws.clamp(min=1e-6), ws > 0.05),
        "alpha": ws,
    }
    if "normal" in out:
        n = out["normal"][0].permute(1, 2, 0).float()
        white = torch.ones_like(n)
        res["normal"] = (n + ws[..., None]) / 2 + (1 - ws[..., None]) * white
    return res


def validation_sheet(
    model, valid_set: NeRFDataset, folder: Path, stem: str, autocast: Autocast
) -> tuple[torch.Tensor, Path]:
    """Render the validation views (albedo) and write each one's rgb, depth and normal PNGs
    (``<stem>_{i:04d}_rgb.png`` ...) and the contact sheet ``<stem>_sheet.png``: one column per
    view, rgb / depth / normal. Returns the sheet [3H,V*W,3] and its path."""
    rows = []
    for i in range(len(valid_set)):
        r = render_frame(model, valid_set.circle_batch(i), autocast, need_normal=True)
        view = folder / f"{stem}_{i:04d}"
        write_image(f"{view}_rgb.png", to_uint8(r["rgb"]))
        write_image(f"{view}_depth.png", to_uint8(r["depth"]))
        row = [r["rgb"], r["depth"][..., None].expand(-1, -1, 3)]
        if "normal" in r:
            write_image(f"{view}_normal.png", to_uint8(r["normal"]))
            row.append(r["normal"])
        rows.append(torch.cat(row, 0))
    sheet = torch.cat(rows, 1)
    path = folder / f"{stem}_sheet.png"
    write_image(path, to_uint8(sheet))
    return sheet, path


def turntable(
    model,
    test_set: NeRFDataset,
    folder: Path,
    stem: str,
    autocast: Autocast,
    *,
    write_frames: bool = True,
    quiet: bool = False,
) -> tuple[dict[str, Path], list[str]]:
    """The test cameras' rgb, depth and normal videos ``<stem>_{kind}.mp4`` and, with
    ``write_frames``, each frame as PNG in ``<stem>_frames/``. Returns ({kind: video path}
    written, a description of everything written for the log)."""
    frames: dict[str, list[np.ndarray]] = {"rgb": [], "depth": [], "normal": []}
    frame_dir = folder / f"{stem}_frames"
    if write_frames:
        frame_dir.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(len(test_set)), desc="test video", leave=False, disable=quiet):
        r = render_frame(model, test_set.circle_batch(i), autocast, need_normal=True)
        for k in frames:
            arr = to_uint8(r[k] if k != "depth" else r[k][..., None].expand(-1, -1, 3))
            frames[k].append(arr)
            if write_frames:
                write_image(frame_dir / f"{i:04d}_{k}.png", arr)
    paths = {}
    for k, fr in frames.items():
        p = folder / f"{stem}_{k}.mp4"
        if write_video(p, fr):
            paths[k] = p
    written = [str(p) for p in paths.values()] + ([f"frames in {frame_dir}"] if write_frames else [])
    return paths, written


SIX_VIEWS = {  # name: (polar, azimuth) in degrees
    "front": (90.0, 0.0),
    "right": (90.0, 90.0),
    "back": (90.0, 180.0),
    "left": (90.0, -90.0),
    "top": (1e-3, 0.0),
    "bottom": (180 - 1e-3, 0.0),
}


def six_views(
    model, cameras: CameraConfig, device: torch.device, folder: Path, stem: str, autocast: Autocast
) -> list[Path]:
    """PNGs ``<stem>_{view}.png`` of the ``SIX_VIEWS`` at the default radius and field of view."""
    from .provider import circle_poses, get_rays, intrinsics_from_fovy

    H, W = cameras.H, cameras.W
    paths = []
    for name, (theta, phi) in SIX_VIEWS.items():
        poses = circle_poses(
            torch.tensor([cameras.default_radius]), torch.tensor([theta]), torch.tensor([phi]), device
        )
        intr = intrinsics_from_fovy(torch.tensor([cameras.default_fovy], device=device), H, W)
        rays_o, rays_d = get_rays(poses, intr, H, W)
        data = {"rays_o": rays_o, "rays_d": rays_d, "poses": poses, "intrinsics": intr, "H": H, "W": W}
        r = render_frame(model, data, autocast)
        path = folder / f"{stem}_{name}.png"
        write_image(path, to_uint8(r["rgb"]))
        paths.append(path)
    return paths


class WorkspaceIndex:
    """``<workspace>/README.md``: links to the latest results (contact sheet, videos, mesh)."""

    def __init__(self, workspace: Path):
        self.workspace = workspace
        self.links: dict[str, Path] = {}

    def write(
        self,
        title: str,
        step: int,
        epoch: int,
        *,
        sheet: Path | None = None,
        videos: dict[str, Path] | None = None,
        mesh: dict | None = None,
    ) -> Path:
        """Add the given results to the links and rewrite the page."""
        if sheet is not None:
            self.links["validation contact sheet"] = sheet
        for k, p in (videos or {}).items():
            self.links[f"test video ({k})"] = p
        for k, p in (mesh or {}).items():
            self.links[f"mesh ({k})"] = p
        lines = [f"# {title}", "", f"step {step}, epoch {epoch}", ""]
        lines += [f"- [{k}]({os.path.relpath(p, self.workspace)})" for k, p in self.links.items()]
        return atomic_write(self.workspace / "README.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))


class TrainerOutputs:
    """The Trainer's log, TensorBoard scalars and result files (mixed into ``nerf.trainer.Trainer``:
    uses its ``cfg``, ``cond``, ``model``, ``device``, ``workspace``, ``log_path``, ``name``,
    ``epoch``, ``global_step``, ``optimizer``, ``gate``, ``index``, ``autocast()``,
    ``ema_weights()`` and ``save_checkpoint()``). Results render the EMA weights in eval mode
    without moving the run's random stream."""

    writer = None

    def _open_workspace(self) -> None:
        for sub in ("checkpoints", "validation", "results", "run"):
            (self.workspace / sub).mkdir(parents=True, exist_ok=True)
        self.log_path = self.workspace / f"log_{self.name}.txt"
        for p in remove_stale_temps(self.workspace):  # left by a killed run's unfinished writes
            self.log(
                f"[workspace] removed {p.relative_to(self.workspace)}, the temporary file of an unfinished write"
            )

    def _log_start(self) -> None:
        """The run's first log lines: its command, options and model."""
        self.log(f"[command] {' '.join(sys.argv)}")
        self.log(f"[options] {self.options}")
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        name = f"{type(self.model).__module__}.{type(self.model).__name__}"
        self.log(f"[model] {name}: {n_params:,} trainable parameters")

    def log(self, msg: str, echo: bool = False) -> None:
        """Append ``msg`` to the workspace's log (and print it with ``echo``)."""
        if echo:
            tqdm.write(msg)
        with open(self.log_path, "a") as f:
            f.write(msg + "\n")

    def _tb(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.workspace / "run" / self.name))
        return self.writer

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
            for k, v in self.model.stats().items():
                w.add_scalar(f"train/{k}", v, step)
        bar.set_postfix(loss=f"{parts['loss']:.4g}", it_s=f"{bar.format_dict.get('rate') or 0:.2f}")

    def _log_epoch(self, steps: int, seconds: float, losses: list[float]) -> None:
        """The ``[epoch N]`` line (scripts/bench_run.py parses it)."""
        mean_loss = float(np.mean(losses)) if losses else float("nan")
        mem = ""
        if self.device.type == "cuda":
            mem = (
                f", peak {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB allocated, "
                f"{torch.cuda.max_memory_reserved(self.device) / 2**30:.2f} GiB reserved"
            )
        g = self.gate
        self.log(
            f"[epoch {self.epoch}] step {self.global_step} loss {mean_loss:.5g} "
            f"({steps / max(seconds, 1e-9):.2f} it/s, skipped {g.nonfinite_total}"
            f"{f' + {g.incomplete_total} incomplete renders' if g.incomplete_total else ''}{mem})",
            echo=not self.cfg.quiet,
        )

    @contextlib.contextmanager
    def _inference(self):
        """Eval mode, a forked RNG and the EMA weights inside the block."""
        self.model.eval()
        with forked_rng(self.device), self.ema_weights():
            yield
        self.model.train()

    def _stem(self) -> str:
        return f"{self.name}_ep{self.epoch:04d}"

    def evaluate(self, valid_set: NeRFDataset) -> None:
        """Validation frames and contact sheet (albedo) around the default view; then the EMA
        weights as ``df.pth`` and the index."""
        with self._inference():
            folder = self.workspace / "validation"
            sheet, path = validation_sheet(self.model, valid_set, folder, self._stem(), self.autocast)
        self._tb().add_image("val/sheet", sheet.permute(2, 0, 1).clamp(0, 1).cpu(), self.global_step)
        self.save_checkpoint(best=True)
        self.write_index(sheet=path)

    def test(self, test_set: NeRFDataset, write_frames: bool = True) -> dict[str, Path]:
        """A 360-degree turntable: rgb, depth and normal videos (mp4) and frames."""
        with self._inference():
            paths, written = turntable(
                self.model,
                test_set,
                self.workspace / "results",
                self._stem(),
                self.autocast,
                write_frames=write_frames,
                quiet=self.cfg.quiet,
            )
        self.log(f"[test] wrote {', '.join(written) or 'nothing'}", echo=not self.cfg.quiet)
        self.write_index(videos=paths)
        return paths

    def six_views(self, cameras: CameraConfig) -> list[Path]:
        """PNGs of the front, right, back, left, top and bottom views."""
        with self._inference():
            folder = self.workspace / "results"
            return six_views(self.model, cameras, self.device, folder, self._stem(), self.autocast)

    def save_mesh(self, cfg: MeshConfig = MeshConfig()) -> dict[str, Path]:
        """Export the representation (EMA weights) as a textured mesh into ``<workspace>/mesh``."""
        self.model.eval()
        with self.ema_weights():
            paths = self.model.export_mesh(self.workspace / "mesh", cfg, progress=not self.cfg.quiet)
        self.log(f"[mesh] wrote {', '.join(str(p) for p in paths.values())}", echo=not self.cfg.quiet)
        self.write_index(mesh=paths)
        return paths

    def write_index(self, **links) -> None:
        """``<workspace>/README.md`` with the latest results (``WorkspaceIndex.write``'s links)."""
        self.index.write(self.cond.text or "run", self.global_step, self.epoch, **links)
