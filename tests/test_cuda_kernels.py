"""CUDA kernels against the PyTorch twins (run on CPU as the reference). Needs a GPU and nvcc.

Run with ``-s`` to see the measured errors and a small timing table.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_raymarching import _field, assert_mostly_equal, random_scene, render_inference

from cuda_kernels import build
from gridencoder import GridEncoder
from gridencoder import _cuda as gc
from gridencoder import _torch_impl as ge
from raymarching import _cuda as rc
from raymarching import _torch_impl as rm
from tests.conftest import nerf_configs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if build.find_nvcc() is None:
        pytest.skip("no CUDA compiler found (set CUDA_HOME or put nvcc on PATH)")
    mod = build.load_kernels()
    assert mod is not None, "the CUDA kernels failed to build"
    print(f"\n[kernels] loaded in {build.build_seconds:.1f} s from {build.cache_dir()}")
    return mod


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (0 for empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(got).all()
    return ((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def to_twin_order(rays_cuda, rays_twin, *arrays):
    """Reorder CUDA packed arrays into the twin's packing (same per-ray counts required)."""
    counts = rays_twin[:, 1].long()
    owner = torch.repeat_interleave(torch.arange(rays_twin.shape[0]), counts)
    within = torch.arange(owner.numel()) - torch.repeat_interleave(rays_twin[:, 0].long(), counts)
    idx = rays_cuda[:, 0].long().cpu()[owner] + within
    return [a.cpu()[idx] for a in arrays]


def test_near_far_morton_packbits_equal_twin():
    g = torch.Generator().manual_seed(0)
    o = torch.randn(5000, 3, generator=g) * 2
    d = torch.randn(5000, 3, generator=g)
    d = d / d.norm(dim=-1, keepdim=True)
    d[:10, 1:] = 0  # axis-aligned rays exercise the 1e-15 guard
    aabb = torch.tensor([-1.0, -1, -1, 1, 1, 1])
    ref = rm.near_far_from_aabb(o, d, aabb, 0.05)
    got = rc.near_far_from_aabb(o.to(DEV), d.to(DEV), aabb.to(DEV), 0.05)
    for a, b in zip(got, ref):
        assert torch.equal(a.cpu(), b)
    coords = torch.randint(0, 1024, (5000, 3), generator=g)
    assert torch.equal(rc.morton3D(coords.to(DEV)).cpu(), rm.morton3D(coords))
    idx = torch.randint(0, 2**30, (5000,), generator=g)
    assert torch.equal(rc.morton3D_invert(idx.to(DEV)).cpu(), rm.morton3D_invert(idx))
    grid = torch.rand(2, 32**3, generator=g)
    assert torch.equal(rc.packbits(grid.to(DEV), 0.7).cpu(), rm.packbits(grid, 0.7))


MARCH_CASES = [  # C, G, bound, dt_gamma, max_steps, perturb
    (1, 128, 1.0, 0.0, 1024, False),
    (1, 64, 1.0, 0.0, 512, True),
    (2, 64, 2.0, 0.0, 1024, True),
    (3, 32, 4.0, 0.0, 1024, False),
    (2, 64, 2.0, 1 / 128, 1024, True),
    # Sparse occupancy (p: random cells besides the blobs), so that whole 8^3 blocks are empty
    # and the CUDA walk skips them a block at a time.
    (1, 128, 1.0, 0.0, 1024, True, 1e-4),
    (2, 64, 2.0, 0.0, 1024, False, 0.0),
    (3, 32, 4.0, 0.0, 1024, True, 1e-4),
    (2, 64, 2.0, 1 / 128, 1024, True, 0.0),
]


def empty_block_fraction(bits: torch.Tensor) -> float:
    """Fraction of aligned 8^3-cell blocks (512 consecutive Morton bits) with no occupied cell."""
    return (bits.reshape(-1, 64) == 0).all(1).float().mean().item()


def march_inputs(C, G, bound, perturb, p=0.05, N=4096, seed=0):
    """A random scene's rays o, d, bitfield, nears, fars and jitter (None without perturb)."""
    o, d, bits = random_scene(N, C, G, bound, seed=seed + C * 7 + G, p=p)
    if p < 1e-3:
        assert empty_block_fraction(bits) > 0.3  # the case exercises block skipping
    aabb = torch.tensor([-bound] * 3 + [bound] * 3)
    nears, fars = rm.near_far_from_aabb(o, d, aabb, 0.05)
    noise = torch.rand(N, generator=torch.Generator().manual_seed(seed)) if perturb else None
    return o, d, bits, nears, fars, noise


def march_both(C, G, bound, dt_gamma, max_steps, perturb, p=0.05, N=4096, seed=0, warp=True):
    o, d, bits, nears, fars, noise = march_inputs(C, G, bound, perturb, p, N, seed)
    ref = rm.march_rays_train(o, d, bound, bits, C, G, nears, fars, perturb, dt_gamma, max_steps, noise)
    got = rc.march_rays_train(
        o.to(DEV),
        d.to(DEV),
        bound,
        bits.to(DEV),
        C,
        G,
        nears.to(DEV),
        fars.to(DEV),
        perturb,
        dt_gamma,
        max_steps,
        None if noise is None else noise.to(DEV),
        warp,
    )
    return ref, got


@pytest.fixture(params=[True, False], ids=["warp", "walk"])
def march_mode(request):
    """Both CUDA training marches (``warp``): a warp per ray (the default with dt_gamma 0) and a
    thread walking each ray with empty-space skips (dt_gamma > 0 always walks)."""
    return request.param


@pytest.mark.parametrize("case", MARCH_CASES)
def test_march_rays_train_matches_twin(case, march_mode):
    ref, got = march_both(*case, warp=march_mode)
    xyzs, dirs, ts, rays = ref
    assert got[3].dtype == torch.int32 and got[0].shape == xyzs.shape
    bad = (got[3][:, 1].cpu() != rays[:, 1]).sum().item()
    print(f"\n[march {case}] M={xyzs.shape[0]} rays with other counts: {bad}")
    assert bad == 0
    # The non-empty slices tile [0, M) (each ray's samples contiguous).
    r = got[3].cpu()
    r = r[r[:, 1] > 0]
    r = r[torch.argsort(r[:, 0])]
    assert r[0, 0] == 0 and torch.equal(r[1:, 0], (r[:, 0] + r[:, 1])[:-1])
    gx, gd, gt = to_twin_order(got[3], rays, got[0], got[1], got[2])
    assert torch.equal(gt, ts) and torch.equal(gx, xyzs) and torch.equal(gd, dirs)


@pytest.mark.parametrize("channels", [3, 6, 20])  # 20: past the warp kernels' 16 registers
def test_composite_rays_train_forward_backward(channels):
    (_, _, ts, rays), (xyzs, _, ts_c, rays_c) = march_both(2, 64, 2.0, 0.0, 1024, True)
    g = torch.Generator().manual_seed(1)
    M, N = xyzs.shape[0], rays_c.shape[0]
    sig = torch.nn.functional.softplus(torch.randn(M, generator=g) * 3 + 2) * 10
    rgb = torch.rand(M, channels, generator=g)
    ups = [
        torch.randn(M, generator=g),
        torch.randn(N, generator=g),
        torch.randn(N, generator=g),
        torch.randn(N, channels, generator=g),
    ]
    # Both on the CUDA packing (the twin takes any ray order).
    s_ref, c_ref = sig.clone().requires_grad_(), rgb.clone().requires_grad_()
    ref = rm.composite_rays_train(s_ref, c_ref, ts_c.cpu(), rays_c.cpu())
    torch.autograd.backward(ref, ups)
    s_got, c_got = sig.to(DEV).requires_grad_(), rgb.to(DEV).requires_grad_()
    got = rc.composite_rays_train(s_got, c_got, ts_c, rays_c, 1e-4)
    torch.autograd.backward(got, [u.to(DEV) for u in ups])
    errs = {name: rel_err(a, b) for name, a, b in zip(("weights", "weights_sum", "depth", "image"), got, ref)}
    errs["grad_sigmas"] = rel_err(s_got.grad, s_ref.grad)
    errs["grad_rgbs"] = rel_err(c_got.grad, c_ref.grad)
    print(f"\n[composite C={channels}] " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) <= 1e-4


@pytest.mark.parametrize("case", [(2, 64, 2.0, 0.0, 1024, True), (1, 128, 1.0, 0.0, 1024, True, 1e-4)])
def test_prune_rays_train_matches_twin(case):
    """The prune kernels keep the same samples and pack the rays as the twin does, on the CUDA
    marcher's (arbitrary) ray order; the kept samples are each ray's front."""
    _, (xyzs, _, ts, rays) = march_both(*case)
    g = torch.Generator().manual_seed(3)
    M = xyzs.shape[0]
    sig = (torch.nn.functional.softplus(torch.randn(M, generator=g) * 3 + 1) * 30).to(DEV)
    for T_min in (1e-5, 1e-2):
        ref = rm.prune_rays_train(sig.cpu(), ts.cpu(), rays.cpu(), T_min)
        got = rc.prune_rays_train(sig, ts, rays, T_min)
        assert got[0].dtype == torch.int64 and got[1].dtype == torch.int32
        assert torch.equal(got[0].cpu(), ref[0]) and torch.equal(got[1].cpu(), ref[1])
        print(f"\n[prune T_min={T_min}] kept {got[0].numel()} of {M}")
        assert 0 < got[0].numel() < M


def test_composite_rays_train_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    sig = (torch.rand(7, generator=g, dtype=torch.float64) * 5).to(DEV).requires_grad_()
    rgb = torch.rand(7, 3, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    ts = torch.tensor(
        [[1.0, 0.1], [1.1, 0.2], [1.3, 0.3], [2.0, 0.2], [2.2, 0.4], [3.0, 0.1], [3.1, 0.1]],
        dtype=torch.float64,
        device=DEV,
    )
    rays = torch.tensor([[4, 3], [0, 2], [2, 2]], dtype=torch.int32, device=DEV)
    assert torch.autograd.gradcheck(lambda s, c: rc.composite_rays_train(s, c, ts, rays, 1e-4), (sig, rgb))


@pytest.mark.parametrize(
    "case",
    [  # C, G, bound, dt_gamma, p (sparse: empty 8^3 blocks), the n_step cap
        (1, 64, 1.0, 0.0, 0.05, 8),
        (2, 64, 2.0, 0.0, 0.05, 8),
        (2, 32, 2.0, 1 / 128, 0.05, 8),
        (1, 128, 1.0, 0.0, 1e-4, 64),
        (2, 64, 2.0, 1 / 128, 0.0, 64),
    ],
)
def test_inference_matches_twin(case):
    C, G, bound, gamma, p, cap = case
    o, d, bits = random_scene(1024, C, G, bound, seed=5, p=p)
    if p < 1e-3:
        assert empty_block_fraction(bits) > 0.3
    ref = render_inference(o, d, bits, C, G, bound, 1e-3, dt_gamma=gamma, max_step=cap)
    got = render_inference(
        o.to(DEV),
        d.to(DEV),
        bits.to(DEV),
        C,
        G,
        bound,
        1e-3,
        march=rc.march_rays,
        composite=rc.composite_rays,
        dt_gamma=gamma,
        max_step=cap,
    )
    assert len(got[3]) == len(ref[3])
    for (x1, t1, r1), (x2, t2, r2) in zip(got[3], ref[3]):
        assert torch.equal(x1.cpu(), x2) and torch.equal(t1.cpu(), t2) and torch.equal(r1.cpu(), r2)
    errs = [rel_err(a, b) for a, b in zip(got[:3], ref[:3])]
    print(f"\n[inference {case}] rounds={len(ref[3])} ws/depth/image rel err {errs}")
    assert max(errs) <= 1e-4


def test_inference_equals_training_on_gpu():
    C, G, bound = 1, 64, 1.0
    o, d, bits = random_scene(2048, C, G, bound, seed=9)
    o, d, bits = o.to(DEV), d.to(DEV), bits.to(DEV)
    nears, fars = rc.near_far_from_aabb(o, d, torch.tensor([-1.0] * 3 + [1.0] * 3, device=DEV), 0.05)
    xyzs, _, ts, rays = rc.march_rays_train(
        o, d, bound, bits, C, G, nears, fars, False, 0.0, 1024, None, True
    )
    sig, rgb = _field(xyzs)
    _, ws, depth, image = rc.composite_rays_train(sig, rgb, ts, rays, 1e-4)
    inference = render_inference(
        o, d, bits, C, G, bound, 1e-4, march=rc.march_rays, composite=rc.composite_rays
    )
    assert_mostly_equal(inference[:3], (ws, depth, image), "GPU")


GRID_CASES = [  # D, L, F, log2_size, base, finest, interpolation, align, max_level
    (3, 16, 2, 19, 16, 2048, "smoothstep", False, None),
    (3, 16, 2, 15, 16, 512, "linear", True, None),
    (3, 8, 4, 14, 4, 256, "smoothstep", False, 5),
    (2, 8, 2, 12, 8, 512, "linear", False, None),
]


def grid_setup(D, L, F, log2, base, finest, align, N=20000, seed=0, dtype=torch.float32):
    scale = math.exp2(math.log2(finest / base) / (L - 1))
    offsets, points = ge.level_layout(D, L, scale, base, log2, align)
    g = torch.Generator().manual_seed(seed)
    emb = (torch.rand(offsets[-1], F, generator=g) * 2 - 1).to(dtype)
    x = torch.rand(N, D, generator=g).to(torch.float64 if dtype == torch.float64 else torch.float32)
    return offsets, points, scale, emb, x


@pytest.mark.parametrize("case", GRID_CASES)
def test_grid_encode_matches_twin(case):
    D, L, F, log2, base, finest, interp, align, max_level = case
    offsets, points, scale, emb, x = grid_setup(D, L, F, log2, base, finest, align)
    up = torch.randn(x.shape[0], L * F, generator=torch.Generator().manual_seed(1))
    e_ref, x_ref = emb.clone().requires_grad_(), x.clone().requires_grad_()
    ref = ge.grid_encode(x_ref, e_ref, offsets, points, scale, base, align, interp, max_level)
    ref.backward(up)
    e_got, x_got = emb.to(DEV).requires_grad_(), x.to(DEV).requires_grad_()
    got = gc.grid_encode(x_got, e_got, offsets, points, scale, base, align, interp, max_level)
    got.backward(up.to(DEV))
    errs = {
        "out": rel_err(got, ref),
        "grad_emb": rel_err(e_got.grad, e_ref.grad),
        "grad_x": rel_err(x_got.grad, x_ref.grad),
    }
    print(f"\n[grid {case}] " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert max(errs.values()) <= 1e-4


@pytest.mark.parametrize("count", [0, 1300, 2000])
def test_grid_encode_skips_rows_that_are_not_live(count):
    """live=(count, period) (--graph_render's padding rows): rows n with n % period < count are
    computed as without it; the others give zero features and pass no gradient (the embedding
    and input gradients are those of the live rows alone)."""
    offsets, points, scale, emb, x = grid_setup(3, 16, 2, 19, 16, 2048, False, N=7 * 2000)
    period = 2000
    live_rows = ((torch.arange(x.shape[0]) % period) < count).to(DEV)
    up = torch.randn(x.shape[0], 32, generator=torch.Generator().manual_seed(1)).to(DEV)
    outs = []
    for live in (None, (torch.tensor([count], dtype=torch.int32, device=DEV), period)):
        e, xx = emb.to(DEV).requires_grad_(), x.to(DEV).requires_grad_()
        out = gc.grid_encode(xx, e, offsets, points, scale, 16, False, "linear", live=live)
        # Without live rows, the upstream gradient of the padding rows is zero instead.
        (out * (up if live is not None else up * live_rows[:, None])).sum().backward()
        outs.append((out.detach(), e.grad, xx.grad))
    (ref, ref_e, ref_x), (got, got_e, got_x) = outs
    assert torch.equal(got[live_rows], ref[live_rows]) and not got[~live_rows].any()
    assert rel_err(got_e, ref_e) <= 1e-5 and rel_err(got_x, ref_x) <= 1e-5
    assert not got_x[~live_rows].any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grid_encode_low_precision_tables(dtype):
    offsets, points, scale, emb, x = grid_setup(3, 16, 2, 19, 16, 2048, False)
    ref = ge.grid_encode(x, emb.to(dtype).float(), offsets, points, scale, 16, False, "smoothstep")
    e_got = emb.to(dtype).to(DEV).requires_grad_()
    got = gc.grid_encode(x.to(DEV), e_got, offsets, points, scale, 16, False, "smoothstep")
    got.float().sum().backward()
    err = rel_err(got.float(), ref)
    print(f"\n[grid {dtype}] out rel err {err:.2e}")
    assert got.dtype == dtype and e_got.grad.dtype == dtype
    assert err <= (1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_grid_encode_half_features_from_a_float32_table(out_dtype):
    """out_dtype: features written in half precision (rounded once from the float32
    interpolation) and their half gradient read as is give what casting around the float32
    path gives."""
    offsets, points, scale, emb, x = grid_setup(3, 16, 2, 19, 16, 2048, False)
    x = x.to(DEV)
    up = torch.randn(x.shape[0], 32, generator=torch.Generator().manual_seed(3)).to(DEV).to(out_dtype)
    e_ref, e_got = emb.to(DEV).requires_grad_(), emb.to(DEV).requires_grad_()
    ref = gc.grid_encode(x, e_ref, offsets, points, scale, 16, False, "smoothstep")
    ref.backward(up.float())
    got = gc.grid_encode(x, e_got, offsets, points, scale, 16, False, "smoothstep", out_dtype=out_dtype)
    got.backward(up)
    assert got.dtype == out_dtype and e_got.grad.dtype == torch.float32
    assert torch.equal(got, ref.detach().to(out_dtype))
    assert rel_err(e_got.grad, e_ref.grad) <= 1e-6


@pytest.mark.parametrize("check", ["gradcheck", "gradgradcheck"])
def test_grid_encode_gradcheck_float64(check):
    """First derivatives in embeddings and inputs; second ones too (a create_graph backward, as
    training with autograd normals runs, goes through the twin's arithmetic)."""
    offsets, points = ge.level_layout(3, 3, 2.0, 2, 6)
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(offsets[-1], 2, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    x = (torch.rand(5, 3, generator=g, dtype=torch.float64) * 0.8 + 0.1).to(DEV).requires_grad_()
    for interp in ("linear", "smoothstep"):
        assert getattr(torch.autograd, check)(
            lambda e, xx, i=interp: gc.grid_encode(xx, e, offsets, points, 2.0, 2, False, i),
            (emb, x),
            atol=1e-6,
        )


def test_grid_encoder_module_normals_on_gpu():
    enc = GridEncoder(num_levels=8, base_resolution=8, log2_hashmap_size=14, desired_resolution=256)
    with torch.no_grad():
        enc.embeddings.uniform_(-1, 1)
    x = torch.rand(1000, 3) * 2 - 1
    outs = []
    for dev in ("cpu", DEV):
        enc = enc.to(dev)
        enc.embeddings.grad = None
        xx = x.to(dev).requires_grad_()
        y = enc(xx, bound=1.0)
        # A normal-like input gradient, with a graph (as training with autograd normals).
        (n,) = torch.autograd.grad(y.pow(2).sum(), xx, create_graph=True)
        n.pow(2).sum().backward()
        outs.append((y.detach().cpu(), n.detach().cpu(), enc.embeddings.grad.cpu()))
    for got, ref in zip(outs[1], outs[0]):
        assert rel_err(got, ref) <= 1e-4


@pytest.mark.parametrize("agg_mode,soa", [(0, False), (1, False), (0, True), (1, True)])
def test_grid_encode_backward_with_warp_groups_matches_twin(agg_mode, soa):
    """Points along rays (as the ray marcher emits them) share cells inside a warp at coarse
    levels: every way of merging the warp's atomics (and both feature layouts) must still give
    the twin's gradients."""
    offsets, points, scale, emb, _ = grid_setup(3, 16, 2, 19, 16, 2048, False)
    g = torch.Generator().manual_seed(7)
    o = torch.rand(37, 1, 3, generator=g)  # 37 rays of 1000 samples, 0.0005 apart
    d = torch.nn.functional.normalize(torch.randn(37, 1, 3, generator=g), dim=-1)
    x = (o * 0.5 + 0.25 + d * torch.linspace(0, 0.5, 1000)[None, :, None]).reshape(-1, 3).clamp(0, 1)
    x[5000:5003] = x[4999]  # a few identical points too
    up = torch.randn(x.shape[0], 32, generator=g)
    e_ref, x_ref = emb.clone().requires_grad_(), x.clone().requires_grad_()
    ge.grid_encode(x_ref, e_ref, offsets, points, scale, 16, False, "smoothstep").backward(up)
    for max_level in (None, 11):  # also with a warp straddling used and zeroed levels
        e_got, x_got = emb.to(DEV).requires_grad_(), x.to(DEV).requires_grad_()
        got = gc.grid_encode(
            x_got,
            e_got,
            offsets,
            points,
            scale,
            16,
            False,
            "smoothstep",
            max_level,
            agg_mode=agg_mode,
            soa=soa,
        )
        assert got.shape == (x.shape[0], 32)
        # The upstream gradient row-major, or feature-major (read in place by the kernel).
        up_dev = up.to(DEV) if max_level is None else up.t().contiguous().to(DEV).t()
        got.backward(up_dev)
        assert x_got.grad.abs().sum() > 0
        if max_level is None:
            ref = ge.grid_encode(x, emb, offsets, points, scale, 16, False, "smoothstep")
            assert rel_err(got, ref) <= 1e-4 and rel_err(x_got.grad, x_ref.grad) <= 1e-4
            err = rel_err(e_got.grad, e_ref.grad)
            print(f"\n[grid warp groups] grad_emb rel err {err:.2e}")
            assert err <= 1e-4
        else:
            e_lvl = emb.clone().requires_grad_()
            ge.grid_encode(x, e_lvl, offsets, points, scale, 16, False, "smoothstep", max_level).backward(up)
            assert rel_err(e_got.grad, e_lvl.grad) <= 1e-4


def test_fp16_inference_table_is_close_and_follows_updates():
    enc = GridEncoder(num_levels=16, base_resolution=16, log2_hashmap_size=19, desired_resolution=2048).to(
        DEV
    )
    with torch.no_grad():
        enc.embeddings.uniform_(-0.1, 0.1)
    x = torch.rand(4096, 3, device=DEV) * 2 - 1
    for _ in range(2):
        ref = enc(x).detach()  # fp32 table (gradients enabled)
        assert ref.dtype == torch.float32
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            got = enc(x)
        assert got.dtype == torch.float16 and rel_err(got, ref) <= 2e-3
        with torch.no_grad():
            enc.embeddings.add_(0.05)  # an optimizer step: the cached copy must follow


def test_pruned_training_render_on_gpu_equals_full():
    """--prune_samples on the real -O path (CUDA marcher, CUDA hash grid, fd normals)."""
    import argparse

    from main import parse_args
    from nerf.network_grid import NeRFNetwork
    from nerf.provider import circle_poses, get_rays, intrinsics_from_fovy

    torch.manual_seed(0)
    opt, _ = parse_args(["--text", "x", "-O", "--blob_density", "12", "--blob_radius", "0.3"])
    assert isinstance(opt, argparse.Namespace)
    model = NeRFNetwork(*nerf_configs(opt)).to(DEV)
    for _ in range(4):
        model.update_extra_state()
    model.train()
    poses = circle_poses(torch.tensor([3.2]), torch.tensor([80.0]), torch.tensor([20.0]), DEV)
    o, d = get_rays(poses, intrinsics_from_fovy(torch.tensor([20.0], device=DEV), 32, 32), 32, 32)
    light = torch.tensor([[0.3, 0.5, 1.0]], device=DEV)
    res = {}
    for prune in (False, True):
        model.opt.prune_samples = prune
        model.zero_grad()
        torch.manual_seed(1)
        out = model.render(o, d, light_d=light, ambient_ratio=0.2, shading="lambertian", perturb=True)
        (out["image"].mean() + out["loss_orient"]).backward()
        res[prune] = (
            out,
            model.encoder.embeddings.grad.clone(),
            model.sigma_net.layers[0].weight.grad.clone(),
        )
    (full, ge_f, gw_f), (pr, ge_p, gw_p) = res[False], res[True]
    print(f"\n[prune] {full['weights'].numel()} -> {pr['weights'].numel()} samples")
    assert pr["n_pruned"] > 0.3 * full["weights"].numel()
    assert rel_err(pr["image"], full["image"]) <= 1e-5
    assert rel_err(ge_p, ge_f) <= 1e-4 and rel_err(gw_p, gw_f) <= 1e-4


@pytest.mark.parametrize("shading", ["albedo", "lambertian", "textureless"])
def test_graphed_network_pass_equals_eager(shading):
    """--graph_pass: the training network pass replayed from CUDA graphs gives the eager pass's
    outputs and parameter gradients on the same packed samples, step after step (new samples,
    new weights, a new light and ambient ratio each time), under fp16 autocast as in training.

    The graph runs on rows padded to a bucket, so it is compared with the eager pass on the
    same padded rows. Gradient sums come out in any order (atomics); through the fd normals
    (differences of densities over 2 eps) that order moves a gradient by up to about 1% of its
    largest entry, so the gradients are held to twice what two eager passes differ by."""
    import torch.nn.functional as F

    from main import parse_args
    from nerf.fast.graphed import GraphedPasses, sample_bucket
    from nerf.network_grid import NeRFNetwork
    from nerf.provider import circle_poses, get_rays, intrinsics_from_fovy

    torch.manual_seed(0)
    opt, _ = parse_args(["--text", "x", "-O", "--blob_density", "12", "--blob_radius", "0.3"])
    model = NeRFNetwork(*nerf_configs(opt)).to(DEV)
    model.graphs = GraphedPasses(min_uses=1)  # capture at first use
    for _ in range(4):
        model.update_extra_state()
    model.train()
    intr = intrinsics_from_fovy(torch.tensor([20.0], device=DEV), 32, 32)
    eager_pass = model.network_pass
    seen = []  # the network pass's arguments in a render

    def run(fn, a, M):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            out = fn(*a)
        loss = out["image"].float().mean() + out["weights"][:M].float().square().mean()
        if "loss_orient" in out:
            loss = loss + out["loss_orient"] + out["normal_image"].float().mean()
        loss.backward()
        outs = {k: v.detach()[:M].clone() if k == "weights" else v.detach().clone() for k, v in out.items()}
        return outs, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for step in range(3):
        poses = circle_poses(torch.tensor([3.2]), torch.tensor([80.0]), torch.tensor([20.0 + step]), DEV)
        o, d = get_rays(poses, intr, 32, 32)
        light = F.normalize(torch.tensor([[0.3, 0.5 + step, 1.0]], device=DEV), dim=-1)
        seen.clear()
        model.network_pass = lambda *a: seen.append(a) or eager_pass(*a)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            model.render(o, d, light_d=light, ambient_ratio=0.1 + 0.2 * step, shading=shading, perturb=True)
        del model.network_pass
        args = seen[0]
        M = args[0].shape[0]
        pad = sample_bucket(M) - M
        padded = tuple(F.pad(t, (0, 0, 0, pad)) for t in args[:3]) + args[3:]

        e1, e1_grads = run(eager_pass, padded, M)
        _, e2_grads = run(eager_pass, padded, M)
        g, g_grads = run(lambda *a: model.graphs.run(model, *a), args, M)
        u, _ = run(eager_pass, args, M)  # unpadded: the padding rows change no output
        assert e1.keys() == g.keys() == u.keys() and len(e1_grads) == len(g_grads)
        for k in e1:
            assert g[k].shape == e1[k].shape, k
            assert rel_err(g[k].float(), e1[k].float()) <= 1e-3, k
            assert rel_err(u[k].float(), e1[k].float()) <= 1e-3, k
        for a, b, c in zip(e1_grads, e2_grads, g_grads):
            assert rel_err(c, a) <= max(1e-3, 2 * rel_err(b, a))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)  # the graph reads the live weights
    assert 1 <= model.graphs.captures <= 3 and not model.graphs.disabled


@pytest.mark.parametrize("fit", ["room", "overflow"])
def test_fixed_size_march_and_prune_match_twin(fit, march_mode):
    """march_rays_train_fixed / prune_rays_train_fixed (--graph_render): with room, the rays,
    samples and kept indices of the variable-size kernels plus zero padding in no ray; past the
    capacity, the true totals, clipped rays inside it, and each ray a prefix of its samples."""
    case = (2, 64, 2.0, 0.0, 1024, True)
    (_, _, ts_t, rays_t), (xyzs, _, ts, rays) = march_both(*case, warp=march_mode)  # twin, CUDA
    M = xyzs.shape[0]
    o, d, bits, nears, fars, noise = march_inputs(2, 64, 2.0, True)  # march_both's scene
    cap = M + 1000 if fit == "room" else M // 2
    args = (
        [t.to(DEV) for t in (o, d)] + [2.0, bits.to(DEV), 2, 64] + [t.to(DEV) for t in (nears, fars, noise)]
    )
    fx, _, ft, frays, total = rc.march_rays_train_fixed(*args, 0.0, 1024, cap, march_mode)
    assert fx.shape == (cap, 3) and ft.shape == (cap, 2) and total.tolist() == [M]
    counts = frays[:, 1].long().cpu()
    assert int((frays[:, 0].long().cpu() + counts).max()) <= cap and int(counts.sum()) == min(M, cap)
    assert (counts <= rays_t[:, 1].long()).all()
    if fit == "room":
        assert torch.equal(counts, rays_t[:, 1].long())
        assert not fx[M:].any() and not ft[M:].any()  # padding: zeros
    # Each ray's samples (all of them, or the front that fit) are the twin's.
    for r in torch.nonzero(counts).squeeze(1).tolist():
        a, n, at = int(frays[r, 0]), int(counts[r]), int(rays_t[r, 0])
        assert torch.equal(ft[a : a + n].cpu(), ts_t[at : at + n]), r
    # Pruning at a fixed size on the variable march's samples.
    g = torch.Generator().manual_seed(3)
    sig = (torch.nn.functional.softplus(torch.randn(M, generator=g) * 3 + 1) * 30).to(DEV)
    keep_ref, rays_ref = rm.prune_rays_train(sig.cpu(), ts.cpu(), rays.cpu(), 1e-5)
    K = keep_ref.numel()
    kcap = K + 300 if fit == "room" else K // 2
    keep, new_rays, kept = rc.prune_rays_train_fixed(sig, ts, rays, 1e-5, kcap)
    assert keep.shape == (kcap,) and kept.tolist() == [K]
    twin = rm.prune_rays_train_fixed(sig.cpu(), ts.cpu(), rays.cpu(), 1e-5, kcap)
    assert torch.equal(keep.cpu(), twin[0]) and torch.equal(new_rays.cpu(), twin[1])
    if fit == "room":
        assert torch.equal(keep[:K].cpu(), keep_ref) and torch.equal(new_rays.cpu(), rays_ref)


@pytest.mark.parametrize("shading", ["albedo", "lambertian"])
def test_graphed_training_render_equals_eager(shading, capsys):
    """--graph_render: the whole training render replayed from CUDA graphs gives the eager
    render's outputs, entropy and parameter gradients on the same jitter, step after step (new
    views, weights, light and ambient ratio), under fp16 autocast; an undersized capture is
    reported and captured again larger. Gradients are held to twice the spread of two eager
    renders (atomics sum in any order)."""
    import torch.nn.functional as F

    from main import parse_args
    from nerf.fast.graphed import GraphedRender
    from nerf.network_grid import NeRFNetwork
    from nerf.provider import circle_poses, get_rays, intrinsics_from_fovy
    from nerf.utils import weight_entropy

    torch.manual_seed(0)
    opt, _ = parse_args(["--text", "x", "-O", "--blob_density", "12", "--blob_radius", "0.3"])
    model = NeRFNetwork(*nerf_configs(opt)).to(DEV)
    # Room for every view here (their counts differ by up to 30%): a replay that overflows
    # drops samples by design, which the end of the test checks on its own.
    model.render_graphs = GraphedRender(warmup=1, headroom=2.0)
    for _ in range(4):
        model.update_extra_state()
    model.train()
    intr = intrinsics_from_fovy(torch.tensor([20.0], device=DEV), 32, 32)

    def step(graph, o, d, light, ratio, seed):
        model.graph_render = graph
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        with torch.autocast("cuda", dtype=torch.float16):
            out = model.render(o, d, light_d=light, ambient_ratio=ratio, shading=shading, perturb=True)
        ent = weight_entropy(out["weights"], out.get("n_pruned", 0), out.get("n_padding", 0))
        loss = out["image"].float().mean() + out["weights_sum"].float().mean() + ent
        if "loss_orient" in out:
            loss = loss + out["loss_orient"] + out["normal_image"].float().mean()
        loss.backward()
        keys = ("image", "depth", "weights_sum", "normal_image", "loss_orient")
        outs = {k: out[k].detach().float().clone() for k in keys if k in out}
        outs["entropy"] = ent.detach().clone()
        return outs, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for i in range(5):
        poses = circle_poses(torch.tensor([3.2]), torch.tensor([80.0]), torch.tensor([20.0 + 7 * i]), DEV)
        o, d = get_rays(poses, intr, 32, 32)
        light = F.normalize(torch.tensor([[0.3, 0.5 + i, 1.0]], device=DEV), dim=-1)
        ratio = 0.1 + 0.2 * i
        e1, e1_grads = step(False, o, d, light, ratio, 100 + i)
        _, e2_grads = step(False, o, d, light, ratio, 100 + i)
        g, g_grads = step(True, o, d, light, ratio, 100 + i)
        if i == 0:
            assert model.render_graphs.captures == 0  # the warm-up render was eager
            continue
        assert e1.keys() == g.keys() and len(e1_grads) == len(g_grads)
        for k in e1:
            assert rel_err(g[k], e1[k]) <= 1e-3, (i, k)
        for a, b, c in zip(e1_grads, e2_grads, g_grads):
            assert rel_err(c, a) <= max(1e-3, 2 * rel_err(b, a))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)  # the graph reads the live weights
    graphs = model.render_graphs
    assert graphs.captures == 1 and graphs.overflows == 0 and not graphs.disabled
    # Too small a capture: the overflow comes back a step later and the render is captured
    # again larger.
    key = next(iter(graphs.graphs))
    graphs._poll(wait=True)  # the counts of the replays so far, before they are forgotten
    graphs.sizes[key].need = [n // 4 for n in graphs.sizes[key].need]
    graphs._drop(key)
    for _ in range(3):
        step(True, o, d, light, 0.3, 7)
        torch.cuda.synchronize()
    assert graphs.overflows == 1 and graphs.captures == 3
    assert "captured again larger" in capsys.readouterr().err.lower()
    g, _ = step(True, o, d, light, 0.3, 7)
    e, _ = step(False, o, d, light, 0.3, 7)
    for k in e:
        assert rel_err(g[k], e[k]) <= 1e-3, k


def _time_ms(fn, reps=20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def test_timing_report():
    """Not a benchmark gate: prints medians for the sizes of a 64x64 training step."""
    o, d, bits = random_scene(4096, 1, 128, 1.0, seed=11)
    o, d, bits = o.to(DEV), d.to(DEV), bits.to(DEV)
    aabb = torch.tensor([-1.0] * 3 + [1.0] * 3, device=DEV)
    nears, fars = rc.near_far_from_aabb(o, d, aabb, 0.05)
    march = lambda: rc.march_rays_train(o, d, 1.0, bits, 1, 128, nears, fars, True, 0.0, 1024, None, True)  # noqa: E731
    xyzs, _, ts, rays = march()
    sig = torch.rand(xyzs.shape[0], device=DEV, requires_grad=True)
    rgb = torch.rand(xyzs.shape[0], 3, device=DEV, requires_grad=True)

    def composite():
        out = rc.composite_rays_train(sig, rgb, ts, rays, 1e-4)
        (out[1].sum() + out[3].sum()).backward()

    enc = GridEncoder(desired_resolution=2048).to(DEV)
    pts = torch.rand(2**18, 3, device=DEV) * 2 - 1

    def encode():
        enc(pts).sum().backward()

    rows = [
        ("march_rays_train 4096 rays G=128", march),
        ("composite_rays_train fwd+bwd", composite),
        ("grid encode fwd+bwd 2^18 pts L=16", encode),
    ]
    print(f"\n[timing] M={xyzs.shape[0]} samples")
    for name, fn in rows:
        print(f"[timing] {name}: {_time_ms(fn):.3f} ms")


def test_fd_normals_under_fp16_autocast_match_fp32():
    """The fd normals' density passes run in fp16 under -O: the directions stay those of fp32."""
    from main import parse_args
    from nerf.network_grid import NeRFNetwork

    torch.manual_seed(0)
    opt, _ = parse_args(["--text", "x", "-O"])
    model = NeRFNetwork(*nerf_configs(opt)).to(DEV).train()
    with torch.no_grad():
        model.encoder.embeddings.uniform_(-0.05, 0.05)  # a field with detail, not only the blob
    x = torch.nn.functional.normalize(torch.randn(20000, 3, device=DEV), dim=-1) * (
        0.05 + 0.25 * torch.rand(20000, 1, device=DEV)
    )
    ref = model.normal(x)
    with torch.autocast("cuda", dtype=torch.float16):
        got = model.normal(x)
    cos = (got.float() * ref).sum(-1)
    print(f"\n[fd normals fp16] cos min {cos.min():.4f}, 1st percentile {cos.quantile(0.01):.5f}")
    assert cos.quantile(0.01) > 0.99 and (cos > 0.9).float().mean() > 0.999
