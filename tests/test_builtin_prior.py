"""The shipped built-in prior: loads through the real loading code and guides a real
text-to-3D run on the CPU to the right shape."""

from pathlib import Path

import pytest
import torch

from guidance.base import GuidanceConfig
from guidance.sd_utils import MODEL_KEYS, SDConfig, StableDiffusion

BUILTIN = Path(MODEL_KEYS["builtin"])
pytestmark = pytest.mark.skipif(not (BUILTIN / "unet").is_dir(), reason="pretrained/builtin is not present")


def test_builtin_prior_loads_through_stable_diffusion(embed_cache):
    sd = StableDiffusion(SDConfig(sd_version="builtin"), device="cpu")
    assert (sd.image_size, sd.latent_size) == (64, 16)
    emb = sd.get_text_embeds(["", "a red mug, front view"])
    loss = sd.sds_step(emb, torch.rand(1, 3, 32, 32, requires_grad=True), guidance_scale=20)
    assert torch.isfinite(loss)
    # The same class, so the same Guidance protocol: prepared once, then renders + cameras.
    sd.prepare(GuidanceConfig(text="a red mug", view_prompt="discrete", guidance_scale=20))
    cams = {"polar": torch.tensor([90.0]), "dir": torch.tensor([0]), "view_weights": torch.eye(5)[:1]}
    assert torch.isfinite(sd.train_step(torch.rand(1, 3, 32, 32, requires_grad=True), cams))


@pytest.mark.slow
def test_short_cpu_run_recovers_the_silhouette(tmp_path, monkeypatch):
    """300 SDS iterations on "a green sphere" (a training pair) at the built-in defaults."""
    monkeypatch.setenv("HOME", str(tmp_path))
    from main import main
    from scripts.eval_3d import render_result
    from shapes.metrics import eval_cameras, mask_iou
    from shapes.scene import trace

    args = [
        "--sd_version",
        "builtin",
        "--text",
        "a green sphere",
        "--workspace",
        str(tmp_path / "ws"),
        "-O",
        "--iters",
        "300",
        "--eval_interval",
        "100",
        "--test_interval",
        "100",
        "--dataset_size_test",
        "2",
        "--quiet",
        "--seed",
        "0",
    ]
    assert main(args) == 0
    alpha, albedo = render_result(args, torch.device("cpu"), 48)
    cams = eval_cameras(48)
    gt = trace(0, cams["rays_o"], cams["rays_d"])["mask"]
    iou = float(mask_iou(alpha > 0.5, gt).mean())
    assert iou > IOU_FLOOR, iou
    green = albedo[gt & (alpha > 0.5)].mean(0)
    assert green[1] > green[0] + 0.2 and green[1] > green[2] + 0.2  # it is green


IOU_FLOOR = 0.5


def test_the_prior_trainings_checkpoint_resumes_as_data_only(tmp_path):
    """scripts/train_prior.py's resume file holds state dicts, numbers and the loss log only:
    it loads with ``weights_only=True`` (a file from elsewhere never runs code)."""
    from types import SimpleNamespace

    from scripts.train_prior import save_ckpt

    nets = [torch.nn.Linear(3, 2) for _ in range(5)]
    vae = SimpleNamespace(state_dict=nets[0].state_dict, config=SimpleNamespace(scaling_factor=0.18))
    opt = torch.optim.AdamW([{"params": nets[1].parameters(), "lr": 1e-3, "base": 1e-3}])
    nets[1](torch.ones(1, 3)).sum().backward()
    opt.step()
    log = {"vae_curve": [[0, 0.5, 0.25, 0.1]], "unet_curve": [], "vae_seconds": 1.5}
    path = tmp_path / "ck" / "prior.pth"
    save_ckpt(str(path), vae, nets[1], nets[2], nets[3], nets[4], opt, 7, log)
    ck = torch.load(path, weights_only=True)
    assert ck["step"] == 7 and ck["log"] == log and ck["scaling_factor"] == 0.18
    assert torch.equal(ck["unet"]["weight"], nets[1].weight) and ck["opt"]["state"][0]["step"] == 1
