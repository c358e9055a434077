"""Trainer.train_one_step: reading a step's loss back one step late changes nothing else."""

import math

import pytest
import torch

from main import parse_args
from nerf.network_grid import NeRFNetwork
from nerf.provider import NeRFDataset
from nerf.utils import Trainer
from tests.conftest import TINY_RUN


def _trainer(tmp_path, device: str, defer: bool, nan_steps: set[int], monkeypatch):
    opt, _ = parse_args(["--text", "a cube", "--workspace", str(tmp_path / f"ws{defer}"), "-O", *TINY_RUN])
    opt.precision = "fp32"
    torch.manual_seed(0)
    model = NeRFNetwork(opt)
    trainer = Trainer(opt, model, {}, torch.device(device))  # regularizers only: no guidance
    trainer.defer_sync = defer
    real = Trainer.train_step

    def flaky(self, data, save_guidance_path=None):
        loss, parts = real(self, data, save_guidance_path)
        return (loss * float("nan"), parts) if self.global_step in nan_steps else (loss, parts)

    monkeypatch.setattr(Trainer, "train_step", flaky)
    data = NeRFDataset(type="train", H=opt.h, W=opt.w, size=10, device=torch.device(device))
    return trainer, data


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_deferred_readback_gives_the_same_run(tmp_path, monkeypatch, device):
    nan_steps = {0, 3, 4}
    runs = {}
    for defer in (False, True):
        trainer, data = _trainer(tmp_path, device, defer, nan_steps, monkeypatch)
        out = [trainer.train_one_step(data.train_batch()) for _ in range(7)]
        last = trainer.flush()
        runs[defer] = (trainer, out, last)
    (t_sync, sync_out, sync_last), (t_def, def_out, def_last) = runs[False], runs[True]
    # The same parameters, Adan state and EMA, step for step (the skip is decided on the device).
    # (Bit for bit on the CPU; the GPU's atomic adds may sum in another order.)
    tol = {"rtol": 0, "atol": 0} if device == "cpu" else {"rtol": 1e-3, "atol": 1e-5}
    for a, b in zip(t_sync.model.parameters(), t_def.model.parameters()):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(t_sync.ema.shadow, t_def.ema.shadow):
        torch.testing.assert_close(a, b, **tol)
    assert sync_last is None and def_out[0] is None
    # Deferred results arrive one step late, the last from flush().
    assert [p["step"] for p in sync_out] == [p["step"] for p in def_out[1:] + [def_last]] == list(range(1, 8))
    for p, q in zip(sync_out, def_out[1:] + [def_last]):
        assert p["ok"] == q["ok"] == (p["step"] - 1 not in nan_steps)
        assert (math.isnan(p["loss"]) and math.isnan(q["loss"])) or p["loss"] == pytest.approx(
            q["loss"], rel=1e-4
        )
    assert t_sync.nonfinite_total == t_def.nonfinite_total == 3
    assert t_sync.nonfinite_run == t_def.nonfinite_run == 0
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
    assert bool(trainer._grads_finite_flag())
    for bad in (float("nan"), float("inf"), -float("inf")):
        params[-1].grad = torch.zeros_like(params[-1])
        params[-1].grad.view(-1)[-1] = bad
        assert not bool(trainer._grads_finite_flag())
