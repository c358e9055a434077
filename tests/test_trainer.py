"""Trainer.train_one_step: reading a step's loss back one step late changes nothing else."""

import math

import pytest
import torch

from main import configs_from, parse_args
from nerf.fields import build_field
from nerf.provider import NeRFDataset
from nerf.step_gate import grads_finite_flag
from nerf.trainer import Trainer
from tests.conftest import TINY_RUN


def _trainer(tmp_path, device: str, defer: bool, nan_steps: set[int], monkeypatch, tag: str = ""):
    ws = tmp_path / f"ws{defer}{tag}"
    opt, _ = parse_args(["--text", "a cube", "--workspace", str(ws), "-O", *TINY_RUN])
    opt.precision = "fp32"
    opt.graph_render = False  # these tests are about the readback; --graph_render has its own
    cfg = configs_from(opt)
    torch.manual_seed(0)
    model = build_field(cfg.field, cfg.renderer, cfg.nerf_speed)
    # Regularizers only: no guidance.
    trainer = Trainer(cfg.trainer, model, {}, torch.device(device), losses=cfg.losses, cond=cfg.cond)
    trainer.defer_sync = defer
    real = Trainer.train_step

    def flaky(self, data, save_guidance_path=None):
        loss, parts = real(self, data, save_guidance_path)
        return (loss * float("nan"), parts) if self.global_step in nan_steps else (loss, parts)

    monkeypatch.setattr(Trainer, "train_step", flaky)
    data = NeRFDataset(cfg.cameras, type="train", size=10, device=torch.device(device))
    return trainer, data


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_deferred_readback_gives_the_same_run(tmp_path, monkeypatch, device):
    nan_steps = {0, 3, 4}
    runs = {}
    for key, defer in (("sync", False), ("defer", True), ("again", False)):
        trainer, data = _trainer(tmp_path, device, defer, nan_steps, monkeypatch, tag=key)
        out = [trainer.train_one_step(data.train_batch()) for _ in range(7)]
        last = trainer.flush()
        runs[key] = (trainer, out, last)
    (t_sync, sync_out, sync_last), (t_def, def_out, def_last) = runs["sync"], runs["defer"]
    t_again, again_out = runs["again"][0], runs["again"][1]
    # The same parameters and EMA, step for step (the skip is decided on the device). The GPU's
    # atomic adds sum in any order, so two runs without deferral differ too (Adan magnifies
    # the differences of near-zero gradients): the deferred run may be at most twice as far from
    # the first run as the repeat is. On the CPU the repeat is exact, so this is bit for bit.
    pairs = [
        *zip(t_sync.model.parameters(), t_def.model.parameters(), t_again.model.parameters()),
        *zip(t_sync.ema.shadow, t_def.ema.shadow, t_again.ema.shadow),
    ]
    for a, b, c in pairs:
        spread = (a - c).norm().item()
        if device == "cpu":
            assert spread == 0 and torch.equal(a, b)
        else:
            assert (a - b).norm().item() <= 2 * spread + 1e-6 * a.norm().item(), (spread, (a - b).norm())
    assert sync_last is None and def_out[0] is None
    # Deferred results arrive one step late, the last from flush().
    assert [p["step"] for p in sync_out] == [p["step"] for p in def_out[1:] + [def_last]] == list(range(1, 8))
    # Losses as the parameters: exact on the CPU; on a GPU the deferred run's may be at most
    # twice as far from the first run's as the repeat's are (the largest step's spread).
    deferred = def_out[1:] + [def_last]
    spread = max((abs(p["loss"] - r["loss"]) for p, r in zip(sync_out, again_out) if p["ok"]), default=0.0)
    for p, q in zip(sync_out, deferred):
        assert p["ok"] == q["ok"] == (p["step"] - 1 not in nan_steps)
        if not p["ok"]:
            assert math.isnan(p["loss"]) and math.isnan(q["loss"])
        elif device == "cpu":
            assert p["loss"] == q["loss"]
        else:
            assert abs(p["loss"] - q["loss"]) <= 2 * spread + 1e-6 * abs(p["loss"]), (p, q, spread)
    assert t_sync.gate.nonfinite_total == t_def.gate.nonfinite_total == 3
    assert t_sync.gate.nonfinite_run == t_def.gate.nonfinite_run == 0
    # The skipped steps changed nothing: Adan counted only the 4 applied ones.
    emb = t_def.model.encoder.embeddings
    assert int(t_def.optimizer.state[emb]["step"]) == 4


def test_gradient_finiteness_flag(tmp_path, monkeypatch):
    """One device flag for all gradients: NaN or inf anywhere clears it; huge finite values
    (whose sum of squares would overflow) and parameters without a gradient do not."""
    trainer, _ = _trainer(tmp_path, "cpu", False, set(), monkeypatch)
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.full_like(p, 3e38)
    params[0].grad = None
    assert bool(grads_finite_flag(trainer.optimizer, trainer.device))
    for bad in (float("nan"), float("inf"), -float("inf")):
        params[-1].grad = torch.zeros_like(params[-1])
        params[-1].grad.view(-1)[-1] = bad
        assert not bool(grads_finite_flag(trainer.optimizer, trainer.device))


@pytest.mark.parametrize("defer", [False, True])
def test_incomplete_graphed_render_skips_the_step(tmp_path, monkeypatch, defer, capsys):
    """A --graph_render replay that lost samples marks its outputs incomplete: the Trainer skips
    that step's update (on the device with Adan), logs it, and does not count it as a
    non-finite step (it is no divergence)."""
    from nerf.renderer import NeRFRenderer

    trainer, data = _trainer(tmp_path, "cpu", defer, set(), monkeypatch)
    real = NeRFRenderer.render
    clipped = {1}  # the second step's render "overflowed"

    def render(self, *a, **k):
        out = real(self, *a, **k)
        out["complete"] = torch.tensor(trainer.global_step not in clipped)
        return out

    monkeypatch.setattr(NeRFRenderer, "render", render)
    said: list[str] = []
    monkeypatch.setattr(trainer.gate, "log", lambda msg, **k: said.append(msg))
    for step in range(3):
        before = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train_one_step(data.train_batch())
        same = all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
        assert same == (step in clipped)  # the clipped render's gradient was not applied
    trainer.flush()
    gate = trainer.gate
    assert gate.incomplete_total == 1 and gate.nonfinite_total == gate.nonfinite_run == 0
    emb = trainer.model.encoder.embeddings
    assert int(trainer.optimizer.state[emb]["step"]) == 2  # Adan counted only the applied steps
    assert len(said) == 1 and "[step 1]" in said[0] and "too few rows: step skipped" in said[0]


@pytest.mark.parametrize("backbone", ["grid", "vanilla"])
def test_the_nerf_is_a_representation_with_its_regularizers_in_order(backbone):
    """Both backbones implement the Trainer's interface; every regularizer with a weight comes
    back, in the order the loss sums them, and a training render draws from the global RNG."""
    from nerf.fields import build_field
    from nerf.losses import LossConfig
    from nerf.network_base import FieldConfig
    from nerf.provider import CameraConfig
    from nerf.representation import Representation

    torch.manual_seed(0)
    field = build_field(FieldConfig(backbone=backbone, grid_levels=2, grid_log2_size=8))
    assert isinstance(field, Representation)
    data = NeRFDataset(CameraConfig(h=8, w=8), type="train", size=1).train_batch()
    out = field.render_batch(data, shading="lambertian", need_normal=True, training=True)
    assert out["rgb"].shape == (1, 3, 8, 8) and out["normal"].shape == (1, 3, 8, 8)
    losses = LossConfig(
        lambda_opacity=1.0,
        lambda_tv=1.0,
        lambda_wd=1.0,
        lambda_2d_normal_smooth=1.0,
        lambda_3d_normal_smooth=1.0,
    )
    parts = field.regularizers(out, data, losses, progress=0.5, elapsed=0.5)
    grid = ["wd", "tv"] if backbone == "grid" else []
    expected = ["entropy", "opacity", "orient", "normal_2d"] + grid
    assert [k for k in parts if k != "normal_3d"] == expected  # normal_3d only where rays hit
    assert all(v.dim() == 0 and torch.isfinite(v) for v in parts.values())
    assert field.stats() == {} and field.state_optional == ("encoder_bg",)


def test_nerf_configs_from_flat_values_or_parsed_options():
    """One builder of the field's configs for main.py, scripts and tests."""
    import main
    from nerf.representation import nerf_configs

    opt, _ = parse_args(["--text", "x", "--grid_levels", "4", "-O"])
    assert main.nerf_configs is nerf_configs
    field, render, speed = nerf_configs(opt)
    assert (field.grid_levels, render.cuda_ray) == (4, True)
    assert nerf_configs(opt, grid_levels=2)[0].grid_levels == 2
    with pytest.raises(TypeError, match="lr"):
        nerf_configs(lr=1.0)
