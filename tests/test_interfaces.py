"""The two plug-in points: a representation that is not a NeRF and a prior that is not Stable
Diffusion go through a whole ``Trainer.train`` (steps, checkpoints, validation, test video,
resume) with nothing but the ``Representation`` and ``Guidance`` interfaces, as a DMTet stage
or Zero-1-to-3 will."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from guidance.base import CAMERA_KEYS, Guidance, GuidanceConfig
from nerf.mesh import MeshConfig
from nerf.provider import CameraConfig, NeRFDataset
from nerf.representation import Representation
from nerf.trainer import Trainer, TrainerConfig

TARGET = torch.tensor([0.8, 0.2, 0.1])


class ColourBall(nn.Module):
    """A ball of radius 0.5 whose one colour is learnt: a stand-in for a mesh stage."""

    lr_decay = False
    state_optional = ()

    def __init__(self):
        super().__init__()
        self.logit = nn.Parameter(torch.zeros(3))
        self.steps_seen: list[int] = []

    def render_batch(self, data, *, shading="albedo", ambient_ratio=1.0, need_normal=False, training=False):
        o, d = data["rays_o"], data["rays_d"]  # [B,N,3]
        B, H, W = o.shape[0], data["H"], data["W"]
        b = (o * d).sum(-1)
        hit = (b * b - (o * o).sum(-1) + 0.25 > 0).float()  # [B,N]: the ray meets the ball
        bg = torch.rand(B, 1, 3) if training else torch.ones(B, 1, 3)
        rgb = hit[..., None] * torch.sigmoid(self.logit) + (1 - hit[..., None]) * bg  # [B,N,3]
        opacity = hit.reshape(B, 1, H, W)
        out = {"rgb": rgb.reshape(B, H, W, 3).permute(0, 3, 1, 2), "opacity": opacity}
        out["depth"] = opacity * 2.5
        if need_normal:
            out["normal"] = torch.zeros(B, 3, H, W)
        return out

    def regularizers(self, out, data, losses, *, progress, elapsed):
        return {"opacity": 1e-3 * out["opacity"].mean()}

    def get_params(self, lr):
        return [{"params": [self.logit], "lr": lr}]

    def before_step(self, step, progress, *, progressive_level=False):
        self.steps_seen.append(step)

    def stats(self):
        return {"colour_r": float(torch.sigmoid(self.logit.detach())[0])}

    def export_mesh(self, folder, cfg, *, progress=False):
        path = Path(folder) / "ball.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(" ".join(f"{v:.3f}" for v in torch.sigmoid(self.logit).tolist()))
        return {"txt": path}


class ColourPrior:
    """Scores renders by their distance to one colour where the object is."""

    def __init__(self):
        self.prepared: list[str | None] = []

    def prepare(self, cond: GuidanceConfig) -> None:
        self.prepared.append(cond.text)

    def train_step(self, pred_rgb, cameras, *, as_latent=False, grad_scale=1.0, save_guidance_path=None):
        assert set(CAMERA_KEYS) <= set(cameras) and pred_rgb.shape[1] == (4 if as_latent else 3)
        rgb = pred_rgb[:, :3]
        return grad_scale * ((rgb - TARGET[None, :, None, None]) ** 2).mean()


def _run(ws: Path, iters: int, ckpt: str = "latest") -> tuple[Trainer, ColourBall, ColourPrior]:
    cams = CameraConfig(w=8, h=8, W=8, H=8, dataset_size_train=4, dataset_size_valid=2, dataset_size_test=3)
    cfg = TrainerConfig(
        workspace=str(ws), iters=iters, lr=0.05, optim="adam", latent_iter_ratio=0.0, quiet=True, ckpt=ckpt
    )
    torch.manual_seed(0)
    model, prior = ColourBall(), ColourPrior()
    trainer = Trainer(cfg, model, {"colour": prior}, torch.device("cpu"), cond=GuidanceConfig(text="red"))
    trainer.load_checkpoint(cfg.ckpt)
    sets = [NeRFDataset(cams, type=t, device=torch.device("cpu")) for t in ("train", "val", "test")]
    trainer.train(*sets)
    return trainer, model, prior


def test_a_representation_and_a_prior_of_our_own_train_through_the_interfaces(tmp_path):
    assert isinstance(ColourBall(), Representation) and isinstance(ColourPrior(), Guidance)
    trainer, model, prior = _run(tmp_path / "ws", iters=12)
    assert prior.prepared == ["red"] and model.steps_seen == list(range(12))
    # The prior's loss pulled the ball's colour towards the target.
    start = ((torch.sigmoid(torch.zeros(3)) - TARGET) ** 2).sum()
    assert ((torch.sigmoid(model.logit) - TARGET) ** 2).sum() < 0.5 * start
    ws = tmp_path / "ws"
    assert (ws / "checkpoints" / "df.pth").exists() and list((ws / "results").glob("*_rgb.mp4"))
    index = (ws / "README.md").read_text()
    assert "validation contact sheet" in index and "test video (rgb)" in index
    paths = trainer.save_mesh(MeshConfig())
    assert paths["txt"].read_text().count(" ") == 2 and "mesh (txt)" in (ws / "README.md").read_text()
    # Resuming from the last checkpoint continues the count and ends where one run ends.
    _, whole, _ = _run(tmp_path / "ws2", iters=16)
    _, resumed, _ = _run(tmp_path / "ws", iters=16)
    assert resumed.steps_seen == list(range(12, 16))
    assert torch.equal(resumed.logit, whole.logit)


def test_a_killed_writes_temporary_files_are_removed_at_start(tmp_path):
    """A kill -9 during an atomic write leaves its hidden temporary file; the next run on the
    workspace removes it (and says so), but never a live process's."""
    import os
    import subprocess
    import sys

    ws = tmp_path / "ws"
    (ws / "checkpoints").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    stale = ws / "checkpoints" / f".df_ep0003.tmp{int(dead.stdout)}.pth"
    live = ws / "checkpoints" / f".df_ep0004.tmp{os.getpid()}.pth"
    kept = ws / "checkpoints" / "df_ep0002.pth"
    for p in (stale, live, kept):
        p.write_bytes(b"x")
    Trainer(TrainerConfig(workspace=str(ws), quiet=True), ColourBall(), {}, torch.device("cpu"))
    assert not stale.exists() and live.exists() and kept.exists()
    assert "removed checkpoints/.df_ep0003" in (ws / "log_df.txt").read_text()
