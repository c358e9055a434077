"""The PyTorch ray marcher (``raymarching._torch_impl``) on hand-computed cases (CPU, fast)."""

from __future__ import annotations

import inspect
import math
import types

import pytest
import torch

import raymarching
from raymarching import _torch_impl as rm

UNIT_BOX = torch.tensor([-1.0, -1, -1, 1, 1, 1])


def test_near_far_known_rays():
    o = torch.tensor([[0.0, 0, 3], [0.0, 0, 0], [3.0, 3, 0], [0.0, 5, 3]])
    d = torch.tensor([[0.0, 0, -1], [1.0, 0, 0], [-1.0, -1, 0], [0.0, 0, -1]])
    d = d / d.norm(dim=-1, keepdim=True)
    nears, fars = rm.near_far_from_aabb(o, d, UNIT_BOX, min_near=0.2)
    s2 = math.sqrt(2.0)
    # Straight through; from the centre (near clamped to min_near); diagonal; a miss.
    assert torch.allclose(nears, torch.tensor([2.0, 0.2, 2 * s2, 1e10]))
    assert torch.allclose(fars, torch.tensor([4.0, 1.0, 4 * s2, 1e10]))


def test_near_far_behind_camera_is_a_miss():
    nears, fars = rm.near_far_from_aabb(torch.tensor([[0.0, 0, 3]]), torch.tensor([[0.0, 0, 1]]), UNIT_BOX)
    assert nears.item() == 1e10 and fars.item() == 1e10


def test_morton_known_values_and_round_trip():
    assert rm.morton3D(torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 3, 3]])).tolist() == [1, 2, 4, 63]
    G = 128
    assert rm.morton3D(torch.tensor([[G - 1] * 3])).item() == G**3 - 1
    coords = torch.randint(0, 1024, (1000, 3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(rm.morton3D_invert(rm.morton3D(coords)), coords)
    idx = torch.arange(8**3)
    assert torch.equal(rm.morton3D(rm.morton3D_invert(idx)), idx)  # a bijection on G^3


def test_packbits_bit_order():
    grid = torch.zeros(2, 8)
    grid[0, 0] = grid[0, 7] = grid[1, 3] = 2.0
    grid[1, 4] = 0.5  # not above the threshold
    assert rm.packbits(grid, 0.5).tolist() == [1 + 128, 8]


def _march(o, d, bits, C, G, bound, **kw):
    """The public march (its defaults; on CPU tensors it runs the twin)."""
    nears, fars = rm.near_far_from_aabb(o, d, torch.tensor([-bound] * 3 + [bound] * 3), 0.05)
    return raymarching.march_rays_train(o, d, bound, bits, C, G, nears, fars, **kw)


def test_full_grid_gives_the_documented_lattice():
    G, max_steps = 16, 1024
    bits = rm.packbits(torch.ones(G**3), 0.5)
    o, d = torch.tensor([[0.1, -0.2, 3.0]]), torch.tensor([[0.0, 0.0, -1.0]])
    xyzs, dirs, ts, rays = _march(o, d, bits, 1, G, 1.0, max_steps=max_steps)
    dt_min = 2 * math.sqrt(3) / max_steps
    # t_k = near + k*dt_min for every lattice point before far = 4 (near = 2).
    n = math.ceil((4.0 - 2.0) / dt_min)
    assert rays.tolist() == [[0, n]]
    expect = 2.0 + torch.arange(n, dtype=torch.float32) * torch.tensor(dt_min, dtype=torch.float32)
    assert torch.equal(ts[:, 0], expect)
    assert torch.allclose(ts[:, 1], torch.full((n,), dt_min))
    assert torch.allclose(xyzs, o + ts[:, :1] * d)
    assert torch.equal(dirs, d.expand(n, 3))


def test_lattice_is_capped_at_max_steps_and_jittered():
    # A bound-2 box is 4 long on this ray; 8 steps of 2 sqrt(3) / 8 cover only 3.46 of it.
    bits = rm.packbits(torch.ones(2, 8**3), 0.5)
    o, d = torch.tensor([[0.0, 0, 5]]), torch.tensor([[0.0, 0, -1]])
    _, _, ts, rays = _march(o, d, bits, 2, 8, 2.0, max_steps=8)
    assert rays.tolist() == [[0, 8]]
    dt = 2 * math.sqrt(3) / 8
    assert ts[-1, 0].item() == pytest.approx(3.0 + 7 * dt)
    _, _, ts2, _ = _march(o, d, bits, 2, 8, 2.0, max_steps=8, perturb=True, noise=torch.tensor([0.5]))
    assert ts2[0, 0].item() == pytest.approx(3.0 + 0.5 * dt)  # jitter of the start only
    assert torch.allclose(ts2[1:, 0] - ts2[:-1, 0], torch.full((7,), dt))


def test_dt_gamma_lattice_grows_geometrically():
    bits = rm.packbits(torch.ones(8**3), 0.5)
    o, d = torch.tensor([[0.0, 0, 3]]), torch.tensor([[0.0, 0, -1]])
    gamma, max_steps = 0.01, 64
    _, _, ts, _ = _march(o, d, bits, 1, 8, 1.0, dt_gamma=gamma, max_steps=max_steps)
    dt_min, dt_max = 2 * math.sqrt(3) / max_steps, 2 * math.sqrt(3) / 8
    t, expect = 2.0, []
    while t < 4.0 and len(expect) < max_steps:
        expect.append(t)
        t += min(max(t * gamma, dt_min), dt_max)
    assert ts[:, 0].tolist() == pytest.approx(expect, rel=1e-6)


def test_empty_cells_are_skipped():
    G = 8
    cells = rm.morton3D_invert(torch.arange(G**3))
    grid = (cells[:, 2] >= G // 2).float()  # only the z > 0 half is occupied
    bits = rm.packbits(grid, 0.5)
    o, d = torch.tensor([[0.0, 0, 3], [0.0, 0, -3]]), torch.tensor([[0.0, 0, -1], [0.0, 0, 1]])
    xyzs, _, ts, rays = _march(o, d, bits, 1, G, 1.0)
    assert (xyzs[:, 2] >= 0).all()
    assert rays[:, 1].tolist() == [rays[0, 1].item()] * 2 and rays[0, 1] > 0
    empty = rm.packbits(torch.zeros(G**3), 0.5)
    assert _march(o, d, empty, 1, G, 1.0)[0].shape == (0, 3)


def _hand_composite(sig, rgb, t, dt):
    T, ws, dep, img, w = 1.0, 0.0, 0.0, [0.0] * len(rgb[0]), []
    for s, c, ti, dti in zip(sig, rgb, t, dt):
        a = 1 - math.exp(-s * dti)
        w.append(a * T)
        ws, dep = ws + a * T, dep + a * T * ti
        img = [x + a * T * ci for x, ci in zip(img, c)]
        T *= 1 - a
    return w, ws, dep, img


def test_composite_matches_hand_computation():
    sig, t, dt = [1.0, 2.0, 3.0], [1.0, 1.1, 1.3], [0.1, 0.2, 0.3]
    rgb = [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]
    ts = torch.tensor([[a, b] for a, b in zip(t, dt)] + [[5.0, 0.5], [5.5, 0.5]])
    sigmas = torch.tensor(sig + [4.0, 0.5])
    rgbs = torch.tensor(rgb + [[0.5, 0.5, 0.5], [1.0, 1, 1]])
    rays = torch.tensor([[2, 3], [0, 2]], dtype=torch.int32)  # ray 1's samples come first
    # Put ray 0's samples after ray 1's to check that packing order does not matter.
    perm = [3, 4, 0, 1, 2]
    w, ws, dep, img = rm.composite_rays_train(sigmas[perm], rgbs[perm], ts[perm], rays)
    hw, hws, hdep, himg = _hand_composite(sig, rgb, t, dt)
    assert w[2:].tolist() == pytest.approx(hw, rel=1e-5)
    assert ws[0].item() == pytest.approx(hws, rel=1e-5)
    assert dep[0].item() == pytest.approx(hdep, rel=1e-5)
    assert img[0].tolist() == pytest.approx(himg, rel=1e-5)
    hw1, hws1, _, _ = _hand_composite([4.0, 0.5], [[0.5] * 3, [1.0] * 3], [5.0, 5.5], [0.5, 0.5])
    assert ws[1].item() == pytest.approx(hws1, rel=1e-5)


def test_composite_early_termination():
    sigmas = torch.tensor([1e4, 1.0, 1.0])
    ts = torch.tensor([[1.0, 0.1], [1.1, 0.1], [1.2, 0.1]])
    w, ws, dep, _ = rm.composite_rays_train(
        sigmas, torch.ones(3, 3), ts, torch.tensor([[0, 3]]), T_thresh=1e-4
    )
    assert w.tolist() == [1.0, 0.0, 0.0] and ws.item() == 1.0 and dep.item() == 1.0


def test_composite_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    sig = (torch.rand(5, generator=g, dtype=torch.float64) * 5).requires_grad_()
    rgb = torch.rand(5, 3, generator=g, dtype=torch.float64).requires_grad_()
    ts = torch.tensor([[1.0, 0.1], [1.1, 0.2], [1.3, 0.3], [2.0, 0.2], [2.2, 0.4]], dtype=torch.float64)
    rays = torch.tensor([[0, 3], [3, 2]], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda s, c: rm.composite_rays_train(s, c, ts, rays), (sig, rgb))


def _field(xyz):
    """A smooth test density and colour."""
    return (torch.sin(3 * xyz).sum(-1) + 1.5).clamp(min=0) * 8, torch.sigmoid(2 * xyz)


def render_inference(
    o,
    d,
    bits,
    C,
    G,
    bound,
    T_thresh,
    march=rm.march_rays,
    composite=rm.composite_rays,
    dt_gamma=0.0,
    max_steps=1024,
    max_step=8,
):
    """The renderer's alive-ray loop, run until every ray is finished (``max_step``: the cap
    on samples per alive ray per round)."""
    N = o.shape[0]
    aabb = torch.tensor([-bound] * 3 + [bound] * 3, device=o.device)
    nears, fars = rm.near_far_from_aabb(o.cpu(), d.cpu(), aabb.cpu(), 0.05)
    nears, fars = nears.to(o.device), fars.to(o.device)
    ws, depth, image = (
        torch.zeros(N, device=o.device),
        torch.zeros(N, device=o.device),
        torch.zeros(N, 3, device=o.device),
    )
    alive = torch.arange(N, dtype=torch.int32, device=o.device)
    rays_t = nears.clone()
    rounds = []
    while alive.numel() > 0:
        n_alive = alive.numel()
        n_step = max(min(N // n_alive, max_step), 1)
        xyzs, dirs, ts = march(
            n_alive, n_step, alive, rays_t, o, d, bound, bits, C, G, nears, fars, dt_gamma, max_steps
        )
        sigma, rgb = _field(xyzs)
        rounds.append((xyzs, ts, rays_t.clone()))
        composite(n_alive, n_step, alive, rays_t, sigma, rgb, ts, ws, depth, image, fars, T_thresh)
        alive = alive[alive >= 0]
        assert len(rounds) < 10_000
    return ws, depth, image, rounds


def random_scene(N, C, G, bound, seed, p=0.05):
    """Rays from a sphere of radius 2.5*bound aimed into the box, and a blobby occupancy."""
    g = torch.Generator().manual_seed(seed)
    cells = rm.morton3D_invert(torch.arange(G**3)).float()
    dens = torch.zeros(C, G**3)
    for m in range(C):
        s = min(2**m, bound)
        xyz = ((cells + 0.5) / G * 2 - 1) * s
        centres = (torch.rand(6, 3, generator=g) * 2 - 1) * 0.7 * s
        near_blob = torch.cdist(xyz, centres).min(1).values < 0.35 * s
        dens[m] = near_blob.float() + (torch.rand(G**3, generator=g) < p).float()
    bits = rm.packbits(dens, 0.5)
    o = torch.randn(N, 3, generator=g)
    o = o / o.norm(dim=-1, keepdim=True) * bound * 2.5
    d = (torch.rand(N, 3, generator=g) * 2 - 1) * bound * 0.8 - o
    return o, d / d.norm(dim=-1, keepdim=True), bits


def test_inference_equals_training_on_a_random_grid():
    C, G, bound = 1, 16, 1.0  # the box's diagonal fits in max_steps, so no ray is capped
    o, d, bits = random_scene(200, C, G, bound, seed=3)
    nears, fars = rm.near_far_from_aabb(o, d, UNIT_BOX * bound, 0.05)
    xyzs, _, ts, rays = rm.march_rays_train(o, d, bound, bits, C, G, nears, fars, False, 0.0, 1024, None)
    sigma, rgb = _field(xyzs)
    _, ws, depth, image = rm.composite_rays_train(sigma, rgb, ts, rays, T_thresh=1e-4)
    inference = render_inference(o, d, bits, C, G, bound, T_thresh=1e-4)
    assert (ws > 0.1).sum() > 50  # the scene is not empty
    assert_mostly_equal(inference[:3], (ws, depth, image), "CPU")


def assert_mostly_equal(inference, training, label, atol=2e-4, max_fraction=0.01):
    """Training lattice points are t_0 + k dt; inference restarts from rays_t every window,
    so a point can differ by an ulp and, rarely, fall in the neighbouring cell. Rays must agree
    to atol except such rare ones."""
    ws_i, depth_i, image_i = inference
    ws, depth, image = training
    ok = ((ws_i - ws).abs() <= atol) & ((depth_i - depth).abs() <= 5 * atol)
    ok &= ((image_i - image).abs() <= atol).all(-1)
    bad = (~ok).sum().item()
    print(f"\n[inference vs training, {label}] rays off by more than {atol}: {bad}/{ok.numel()}")
    assert bad <= max_fraction * ok.numel()


@pytest.mark.parametrize("room", [1.5, 0.5])
def test_fixed_size_march_is_the_variable_one_padded_or_clipped(room):
    """march_rays_train_fixed (--graph_render): exactly `capacity` rows, the true total, zero
    padding in no ray; past the capacity every ray keeps a front part of its own samples."""
    o, d, bits = random_scene(512, 2, 32, 2.0, seed=5)
    nears, fars = rm.near_far_from_aabb(o, d, torch.tensor([-2.0] * 3 + [2.0] * 3), 0.05)
    noise = torch.rand(512, generator=torch.Generator().manual_seed(1))
    xyzs, _, ts, rays = rm.march_rays_train(o, d, 2.0, bits, 2, 32, nears, fars, True, 0.0, 256, noise)
    M = xyzs.shape[0]
    cap = int(M * room)
    fx, _, ft, frays, total = rm.march_rays_train_fixed(
        o, d, 2.0, bits, 2, 32, nears, fars, noise, 0.0, 256, cap
    )
    assert fx.shape == (cap, 3) and ft.shape == (cap, 2) and total.tolist() == [M]
    counts = frays[:, 1].long()
    assert int(counts.sum()) == min(M, cap) and int((frays[:, 0].long() + counts).max()) <= cap
    assert (counts <= rays[:, 1].long()).all() and (counts < rays[:, 1].long()).any() == (room < 1)
    for r in torch.nonzero(counts).squeeze(1).tolist():
        a, n, b = int(frays[r, 0]), int(counts[r]), int(rays[r, 0])
        assert torch.equal(ft[a : a + n], ts[b : b + n]) and torch.equal(fx[a : a + n], xyzs[b : b + n])
    if room > 1:
        assert not fx[M:].any() and not ft[M:].any()
        # The pruning at a fixed size keeps what the variable one keeps.
        sig = torch.nn.functional.softplus(torch.randn(cap, generator=torch.Generator().manual_seed(2))) * 40
        keep, new_rays = rm.prune_rays_train(sig[:M], ts, rays, 1e-4)
        fkeep, fnew, kept = rm.prune_rays_train_fixed(sig, ft, frays, 1e-4, keep.numel() + 7)
        assert kept.tolist() == [keep.numel()] and torch.equal(fkeep[: keep.numel()], keep)
        assert torch.equal(fnew, new_rays) and not fkeep[keep.numel() :].any()


class _OnGpu(torch.Tensor):
    """A CPU tensor that says it lives on a GPU: it takes the dispatch's CUDA branch."""

    @property
    def is_cuda(self) -> bool:
        return True


PUBLIC = [n for n in raymarching.__all__ if n not in ("cuda_backend", "set_backend")]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_function_cuda_and_twin_share_one_signature(name):
    """``raymarching.<name>`` and ``_cuda.<name>`` take the twin's arguments (its one typed
    signature); on CPU tensors the CUDA side declines (NotImplemented) without building."""
    from raymarching import _cuda as rc

    twin = inspect.signature(getattr(rm, name))
    assert inspect.signature(getattr(raymarching, name)) == twin == inspect.signature(getattr(rc, name))
    assert getattr(raymarching, name).__doc__ == getattr(rm, name).__doc__
    args = [torch.zeros(1, 3) if p.annotation == "Tensor" else 1 for p in twin.parameters.values()]
    required = [a for a, p in zip(args, twin.parameters.values()) if p.default is p.empty]
    assert getattr(rc, name)(*required) is NotImplemented
    with pytest.raises(TypeError):
        getattr(rc, name)(*args, no_such_argument=1)
    with pytest.raises(TypeError):
        getattr(rc, name)(*required[:-1])


def test_dispatch_hands_gpu_calls_to_cuda_by_name(monkeypatch):
    """A GPU tensor's call goes to ``_cuda.<name>`` with the arguments bound by name (defaults
    and the CUDA-only ``warp`` included); NotImplemented there runs the twin; CPU calls never
    reach it."""
    from cuda_kernels.backend import takes_args_of

    calls = []

    @takes_args_of(rm.march_rays_train)
    def kernel(a):
        calls.append((a.max_steps, a.warp, a.perturb, a.dt_gamma))
        return NotImplemented if a.warp else "kernel"

    monkeypatch.setattr(raymarching._backend, "_module", types.SimpleNamespace(march_rays_train=kernel))
    o, d = torch.tensor([[0.0, 0, 3]]), torch.tensor([[0.0, 0, -1]])
    n, f = rm.near_far_from_aabb(o, d, UNIT_BOX)
    bits = rm.packbits(torch.ones(8**3), 0.5)
    twin = rm.march_rays_train(o, d, 1.0, bits, 1, 8, n, f, max_steps=8)
    cpu = raymarching.march_rays_train(o, d, 1.0, bits, 1, 8, n, f, max_steps=8)
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(cpu, twin))
    gpu = o.as_subclass(_OnGpu)
    assert raymarching.march_rays_train(gpu, d, 1.0, bits, 1, 8, n, f, False, 0.0, 8, None, False) == "kernel"
    by_name = dict(rays_o=gpu, rays_d=d, bound=1.0, density_bitfield=bits, C=1, G=8, nears=n, fars=f)
    fallback = raymarching.march_rays_train(**by_name, max_steps=8)
    assert all(torch.equal(a, b) for a, b in zip(fallback, twin))
    assert calls == [(8, False, False, 0.0), (8, True, False, 0.0)]
