"""The camera convention: y up, the camera at azimuth 0 sits on +z and sees the front."""

import pytest
import torch

from nerf.provider import (
    BACK,
    FRONT,
    OVERHEAD,
    SIDE,
    SIDE_OTHER,
    CameraConfig,
    CameraRanges,
    NeRFDataset,
    circle_poses,
    get_rays,
    get_view_direction,
    interp_view_weights,
    intrinsics_from_fovy,
    rand_poses,
)


def _project(point, theta, phi, H=64, W=64, fovy=20.0, radius=3.2):
    """Pixel (row, col) where the ray closest to ``point`` starts; brute force over rays."""
    poses = circle_poses(torch.tensor([radius]), torch.tensor([theta]), torch.tensor([phi]))
    o, d = get_rays(poses, intrinsics_from_fovy(torch.tensor([fovy]), H, W), H, W)
    p = torch.tensor(point)
    v = p - o[0]
    t = (v * d[0]).sum(-1, keepdim=True)
    dist = (v - t * d[0]).norm(dim=-1)
    idx = int(dist.argmin())
    return divmod(idx, W)


def test_front_camera_sits_on_plus_z_and_looks_at_origin():
    poses = circle_poses(torch.tensor([3.2]), torch.tensor([90.0]), torch.tensor([0.0]))
    assert torch.allclose(poses[0, :3, 3], torch.tensor([0.0, 0.0, 3.2]), atol=1e-5)
    o, d = get_rays(poses, intrinsics_from_fovy(torch.tensor([20.0]), 2, 2), 2, 2)
    assert torch.allclose(d[0].mean(0) / d[0].mean(0).norm(), torch.tensor([0.0, 0.0, -1.0]), atol=1e-6)


def test_image_orientation_right_is_plus_x_and_top_is_plus_y():
    row, col = _project([0.4, 0.0, 0.0], 90.0, 0.0)
    assert col > 32 and abs(row - 31.5) <= 1  # +x on the right of the front view
    row, col = _project([0.0, 0.4, 0.0], 90.0, 0.0)
    assert row < 32 and abs(col - 31.5) <= 1  # +y at the top
    # From azimuth 90 (camera on +x) the object's front (+z) appears on the left.
    row, col = _project([0.0, 0.0, 0.4], 90.0, 90.0)
    assert col < 32


def test_polar_angle_zero_is_above():
    poses = circle_poses(torch.tensor([3.0]), torch.tensor([1e-3]), torch.tensor([0.0]))
    assert poses[0, 1, 3] > 2.99


def test_view_direction_classes_use_angle_front_and_overhead():
    th = torch.tensor([90.0, 90.0, 90.0, 90.0, 90.0, 20.0])
    ph = torch.tensor([0.0, 29.0, 31.0, 179.0, -90.0, 0.0])
    assert get_view_direction(th, ph, 30, 60).tolist() == [FRONT, FRONT, SIDE, BACK, SIDE_OTHER, OVERHEAD]
    # A wider front wedge reclassifies the 31-degree camera.
    assert get_view_direction(th, ph, 30, 90)[2].item() == FRONT
    assert get_view_direction(th, ph, 10, 60)[5].item() == FRONT


def test_interp_weights_are_continuous_and_normalised():
    phi = torch.linspace(-180, 180, 721)
    w = interp_view_weights(torch.full_like(phi, 90.0), phi, 30, 60)
    assert torch.allclose(w.sum(-1), torch.ones_like(phi))
    assert (w[1:] - w[:-1]).abs().max() < 0.02  # no jumps
    assert w[360, 0] == 1 and w[0, 2] == 1  # azimuth 0 is front, +-180 is back
    w0 = interp_view_weights(torch.tensor([90.0]), torch.tensor([45.0]), 30, 0)
    assert torch.allclose(w0[0, :2], torch.tensor([0.5, 0.5]))  # angle_front 0 = the reference's blend


def test_random_cameras_stay_in_their_ranges():
    torch.manual_seed(0)
    r = CameraRanges((3.0, 3.5), (45.0, 105.0), (-180.0, 180.0), (10.0, 30.0))
    cams = rand_poses(256, r)
    for key, (lo, hi) in (("radius", r.radius), ("theta", r.theta), ("fovy", r.fovy)):
        assert cams[key].min() >= lo and cams[key].max() <= hi
    assert torch.allclose(cams["poses"][:, :3, 3].norm(dim=-1), cams["radius"], atol=1e-4)


def test_progressive_view_starts_at_the_default_view():
    full = CameraRanges()
    default = CameraRanges((3.2, 3.2), (90.0, 90.0), (0.0, 0.0), (20.0, 20.0))
    assert full.towards(default, 0.0) == default
    assert full.towards(default, 1.0) == full


@pytest.mark.parametrize("kind", ["val", "test"])
def test_circle_dataset_walks_around(kind):
    ds = NeRFDataset(type=kind, H=4, W=4, size=4)
    az = [ds.circle_batch(i)["azimuth"].item() for i in range(4)]
    assert az == [0.0, 90.0, -180.0, -90.0]


def _dataset(**kw) -> NeRFDataset:
    cams = CameraConfig(**{**dict(batch_size=2, theta_range=(60.0, 120.0)), **kw})
    return NeRFDataset(cams, type="train", H=4, W=4, size=10)


def test_a_block_of_batches_follows_each_batchs_progress():
    """train_batches draws many batches in one call; each batch keeps its own progressive-view
    ranges (progress 0: the default view exactly) and its own view-prompt weights."""
    ds = _dataset()
    torch.manual_seed(0)
    batches = ds.train_batches([0.0, 1.0, 0.0, 0.5])
    assert len(batches) == 4
    for b in batches:
        assert b["rays_o"].shape == (2, 16, 3) and b["poses"].shape == (2, 4, 4)
        assert torch.equal(b["view_weights"], interp_view_weights(b["polar"], b["azimuth"], 30.0, 60.0))
    for b in (batches[0], batches[2]):
        assert torch.allclose(b["polar"], torch.tensor([90.0, 90.0]))
        assert torch.allclose(b["radius"], torch.tensor([3.2, 3.2]))
    assert ((batches[1]["polar"] >= 60) & (batches[1]["polar"] <= 120)).all()
    assert ((batches[3]["polar"] >= 75) & (batches[3]["polar"] <= 105)).all()  # halfway
    # A batch drawn alone comes from the same code: one batch per call.
    torch.manual_seed(1)
    one = ds.train_batch()
    torch.manual_seed(1)
    assert torch.equal(ds.train_batches([None])[0]["poses"], one["poses"])


def test_sphere_draws_are_chosen_per_batch():
    """uniform_sphere_rate picks whole batches (groups of batch_size cameras): with rate 1
    every camera is on the sphere (polar angles beyond the range occur), with rate 0 none."""
    torch.manual_seed(0)
    on = _dataset(uniform_sphere_rate=1.0, batch_size=64).train_batches([None] * 4)
    off = _dataset(uniform_sphere_rate=0.0, batch_size=64).train_batches([None] * 4)
    polar_on = torch.cat([b["polar"] for b in on])
    polar_off = torch.cat([b["polar"] for b in off])
    assert (polar_on < 60).any() and (polar_on <= 90).all()  # the upper hemisphere
    assert ((polar_off >= 60) & (polar_off <= 120)).all()
    # Mixed: a batch is entirely on the sphere or entirely in the ranges.
    torch.manual_seed(3)
    mixed = _dataset(uniform_sphere_rate=0.5, batch_size=256).train_batches([None] * 8)
    kinds = []
    for b in mixed:
        inside = ((b["polar"] >= 60) & (b["polar"] <= 120)).float().mean()
        assert inside == 1 or inside < 0.9  # 256 sphere draws fall outside [60, 120] often
        kinds.append(bool(inside == 1))
    assert any(kinds) and not all(kinds)


def test_iter_train_batches_draws_blocks_within_the_ray_budget(monkeypatch):
    """A block holds at most max_rays rays; every batch is yielded, in order."""
    from nerf import provider

    calls = []
    real = provider.rand_poses
    monkeypatch.setattr(
        provider, "rand_poses", lambda size, *a, **k: calls.append(size) or real(size, *a, **k)
    )
    ds = _dataset(batch_size=1)
    out = list(ds.iter_train_batches([0.0, 0.0, 0.0, 0.0, 1.0], max_rays=32))  # 2 batches of 16 rays
    assert calls == [2, 2, 1] and len(out) == 5
    assert torch.allclose(out[0]["polar"], torch.tensor([90.0]))
