"""Ground truth, captions, data and metrics of the shapes world (CPU, small images)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from nerf.provider import circle_poses, get_rays, intrinsics_from_fovy
from shapes.dataset import ShapesData, all_captions, full_caption
from shapes.metrics import (
    colour_error,
    eval_cameras,
    gt_albedo_bank,
    mask_iou,
    match_distances,
    r_precision,
    rescaled_silhouette_iou,
    silhouette_iou,
)
from shapes.scene import (
    BENCHMARK,
    CAPTIONS,
    COLOURS,
    HELD_OUT,
    OBJECTS,
    TRAIN_PAIRS,
    render_gt,
)

PRIOR = Path(__file__).resolve().parents[1] / "pretrained" / "builtin"


def rays(polar: float, azimuth: float, H: int, radius: float = 3.2, fovy: float = 20.0):
    poses = circle_poses(torch.tensor([radius]), torch.tensor([polar]), torch.tensor([azimuth]))
    return get_rays(poses, intrinsics_from_fovy(torch.tensor([fovy]), H, H), H, H)


def test_sphere_silhouette_matches_projected_disc():
    H = 128
    o, d = rays(90.0, 0.0, H)
    area = float(render_gt(0, 0, o, d)["mask"].sum())
    # A sphere of radius 0.5 seen from 3.2 projects to a disc of angular radius asin(r/D).
    r_px = math.tan(math.asin(0.5 / 3.2)) / math.tan(math.radians(10.0)) * H / 2
    assert area == pytest.approx(math.pi * r_px**2, rel=0.01)


def test_sphere_depth_and_normal_match_analytic_intersection():
    o, d = rays(80.0, 30.0, 32)
    out = render_gt(0, 0, o, d)
    b = (o * d).sum(-1)
    disc = b * b - ((o * o).sum(-1) - 0.25)
    t = -b - disc.clamp(min=0).sqrt()
    m = out["mask"]
    assert torch.equal(m[disc > 1e-3], torch.ones_like(m[disc > 1e-3]))
    assert not bool(m[disc < -1e-3].any())
    err = (out["depth"][m] - t[m]).abs()
    # Tracing stops within 1e-4 of the surface; along grazing rays that is a bit more in t.
    assert float(err.max()) < 3e-3 and float(err.mean()) < 5e-4
    n = (o + t[..., None] * d) / 0.5
    assert float((out["normal"][m] - n[m]).abs().max()) < 1e-2


def test_cube_front_view_is_a_square_of_the_right_size():
    H = 64
    o, d = rays(90.0, 0.0, H)
    m = render_gt(1, 0, o, d)["mask"].reshape(H, H)
    rows, cols = m.any(1).nonzero().squeeze(1), m.any(0).nonzero().squeeze(1)
    height, width = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
    # The front face (z = 0.325) is nearest: half side 0.325 at distance 3.2 - 0.325.
    side_px = 0.325 / (3.2 - 0.325) / math.tan(math.radians(10.0)) * H
    assert abs(height - side_px) <= 1.5 and abs(width - side_px) <= 1.5
    assert float(m.float().mean()) == pytest.approx(side_px**2 / H**2, rel=0.06)


def door_pixels(azimuth: float) -> int:
    o, d = rays(90.0, azimuth, 64)
    out = render_gt(6, 7, o, d, bg=torch.zeros(1, 3))
    door = torch.tensor([0.35, 0.2, 0.1])
    return int(((out["albedo"] - door).abs().amax(-1) < 1e-6).sum())


def test_house_door_visible_from_front_only():
    assert door_pixels(0.0) > 40
    assert door_pixels(180.0) == 0


def test_mug_handle_on_the_right_in_front_view():
    H = 64
    o, d = rays(90.0, 0.0, H)
    m = render_gt(5, 0, o, d)["mask"].reshape(H, H)
    # Camera right is +x at azimuth 0: the handle widens the right half only.
    assert int(m[:, H // 2 :].sum()) > int(m[:, : H // 2].sum()) + 50


def test_shading_formula():
    o, d = rays(90.0, 0.0, 4)
    light = torch.tensor([[0.0, 0.0, 1.0]])
    out = render_gt(0, 3, o, d, light_dir=light, ambient=0.25, bg=torch.zeros(1, 3))
    m = out["mask"][0]
    lam = (out["normal"][0] @ light[0]).clamp(min=0)
    expect = COLOURS[3] * (0.25 + 0.75 * lam[:, None])
    assert torch.allclose(out["rgb"][0][m], expect[m], atol=1e-5)


def test_captions_and_pairs():
    assert len(CAPTIONS) == 80 and len(set(CAPTIONS)) == 80
    assert "an orange cube" in CAPTIONS and "a red sphere" in CAPTIONS
    assert "a orange cube" not in CAPTIONS
    assert len(HELD_OUT) == 10 and sorted(o for o, _ in HELD_OUT) == list(range(10))
    assert len(TRAIN_PAIRS) == 70 and not set(TRAIN_PAIRS) & set(HELD_OUT)
    assert len(BENCHMARK) == 20 and len(set(BENCHMARK)) == 20
    assert (OBJECTS.index("mug"), 0) in BENCHMARK  # mug = 5, colour (5 + 3) % 8 = red
    assert full_caption(1, 1, 0) == "an orange cube, front view"
    assert full_caption(7, 0, 2) == "a red snowman, back view"


def test_dataset_excludes_held_out_and_captions_match():
    data = ShapesData(6, res=16, supersample=1, seed=1)
    b = data.sample(400)
    assert b["image"].shape == (400, 3, 16, 16)
    assert 0 <= float(b["image"].min()) and float(b["image"].max()) <= 1
    pairs = set(zip(b["obj"].tolist(), b["colour"].tolist()))
    assert not pairs & set(HELD_OUT)
    caps = all_captions()
    for i in range(5):
        o, c, v = int(b["obj"][i]), int(b["colour"][i]), int(b["view"][i])
        assert caps[int(b["caption_id"][i])] == full_caption(o, c, v)
    # Polar 45..105 with angle_overhead 30: never overhead or bottom.
    assert int(b["view"].max()) <= 3


def test_iou_and_colour_error_on_hand_made_cases():
    a = torch.zeros(2, 16, dtype=torch.bool)
    a[:, :8] = True
    assert torch.allclose(mask_iou(a, a), torch.ones(2))
    b = torch.zeros_like(a)
    b[:, 4:12] = True
    assert torch.allclose(mask_iou(a, b), torch.full((2,), 4 / 12))
    assert silhouette_iou(a.float(), a) == 1.0
    alb = torch.rand(2, 16, 3)
    assert colour_error(alb, alb, a) == 0.0
    assert colour_error(alb + 0.1, alb, a) == pytest.approx(0.1, abs=1e-6)


def test_r_precision_gt_vs_gt_is_one():
    cams = eval_cameras(H=24)
    bank_m, bank_a = gt_albedo_bank(cams["rays_o"], cams["rays_d"])
    for target in (0, 13, 42, 79):
        frac, _ = r_precision(bank_m[target], bank_a[target], target, bank_m, bank_a)
        assert frac == 1.0
    # Retrieval is shading invariant: a shaded copy of the orange mug still retrieves it.
    t = 5 * 8 + 1
    frac, _ = r_precision(bank_m[t], bank_a[t] * 0.4, t, bank_m, bank_a)
    assert frac == 1.0
    # A wrong colour is retrieved as that colour.
    frac, got = r_precision(bank_m[t], bank_a[t - 1], t, bank_m, bank_a)
    assert frac == 0.0 and bool((got == t - 1).all())


def test_match_distance_zero_for_identical_and_positive_otherwise():
    cams = eval_cameras(H=16)
    m, a = gt_albedo_bank(cams["rays_o"][:1], cams["rays_d"][:1])
    d = match_distances(m[:, 0], a[:, 0], m[:, 0], a[:, 0])
    # ~1e-3: the sqrt of float cancellation in the expanded square (matrix-product form).
    assert torch.allclose(d.diagonal(), torch.zeros(80), atol=3e-3)
    off = d + torch.eye(80) * 10
    assert float(off.min()) > 0.05


def test_rescaled_iou_recovers_scale():
    cams = eval_cameras(H=24)
    o, d = cams["rays_o"][:2], cams["rays_d"][:2]
    # A cube 1.25x too large: raw IoU is poor, the rescaled one finds s ~ 1.25.
    big = render_gt(1, 0, o / 1.25, d)["mask"].float()
    assert silhouette_iou(big, render_gt(1, 0, o, d)["mask"]) < 0.8
    iou, s = rescaled_silhouette_iou(big, 1, o, d, scales=torch.linspace(0.8, 1.5, 15))
    assert iou > 0.97 and s == pytest.approx(1.25, abs=0.03)


def test_eval_cameras():
    cams = eval_cameras(H=8)
    assert cams["rays_o"].shape == (8, 64, 3)
    assert torch.allclose(cams["rays_o"][:, 0].norm(dim=-1), torch.full((8,), 3.2))
    assert cams["azimuth"].tolist() == [0, 45, 90, 135, 180, 225, 270, 315]


@pytest.mark.skipif(not (PRIOR / "model_index.json").is_file(), reason="no pretrained/builtin")
def test_prior_loads_and_unet_runs():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(PRIOR, subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(PRIOR, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(PRIOR, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(PRIOR, subfolder="vae")
    sched = DDIMScheduler.from_pretrained(PRIOR, subfolder="scheduler")
    assert sched.config.beta_schedule == "scaled_linear"
    assert sched.config.prediction_type == "epsilon"
    ids = tok(
        ["an orange cube, front view", ""],
        padding="max_length",
        max_length=tok.model_max_length,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        states = text(ids)[0]
        z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        assert z.shape == (1, 4, 16, 16)
        eps = unet(z.repeat(2, 1, 1, 1), torch.tensor([500, 500]), encoder_hidden_states=states)
    assert eps.sample.shape == (2, 4, 16, 16)
    assert bool(torch.isfinite(eps.sample).all())
    size = sum(f.stat().st_size for f in PRIOR.rglob("*") if f.is_file())
    assert size <= 50e6
