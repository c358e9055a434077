"""Compositing against hand-computed cases; run and run_cuda agree on an analytic field."""

import dataclasses
import math

import pytest
import torch

from nerf.network_base import FieldNetwork
from nerf.provider import circle_poses, get_rays, intrinsics_from_fovy
from nerf.renderer import NeRFRenderer, composite
from raymarching import composite_rays_train
from tests.conftest import nerf_configs


def test_composite_two_samples_by_hand():
    sig = torch.tensor([[math.log(2.0), math.log(4.0)]])  # alphas 1/2 and 3/4 with dt = 1
    col = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    z = torch.tensor([[1.0, 2.0]])
    w, ws, depth, img = composite(sig, col, z, torch.ones(1, 2))
    assert torch.allclose(w, torch.tensor([[0.5, 0.375]]), atol=1e-6)
    assert torch.allclose(ws, torch.tensor([0.875]))
    assert torch.allclose(depth, torch.tensor([0.5 * 1 + 0.375 * 2]))
    assert torch.allclose(img, torch.tensor([[0.5, 0.375, 0.0]]))
    # The packed (ray-marching) compositor gives the same numbers.
    w2, ws2, d2, img2 = composite_rays_train(
        sig[0], col[0], torch.tensor([[1.0, 1.0], [2.0, 1.0]]), torch.tensor([[0, 2]])
    )
    assert torch.allclose(w2, w[0]) and torch.allclose(img2, img) and torch.allclose(d2, depth)


def _opt(**kw):
    base = dict(
        bound=1.0,
        grid_size=32,
        density_thresh=10.0,
        density_activation="exp",
        min_near=0.01,
        cuda_ray=False,
        num_steps=128,
        upsample_steps=64,
        max_steps=512,
        dt_gamma=0.0,
        grid_update_frac=1.0,
        bg_radius=-1,
        blob_density=0.0,
        blob_radius=0.2,
    )
    base.update(kw)
    return nerf_configs(**base)


class _IdentityEncoder(torch.nn.Module):
    """Positions as features: a field whose only parameters are its small MLP."""

    output_dim = 3

    def forward(self, x, bound=1.0, max_level=None):
        return x


def _mlp_field(cfgs, normal_method: str = "fd") -> FieldNetwork:
    return FieldNetwork(*cfgs, _IdentityEncoder(), 16, 2, normal_method=normal_method)


class Ball(NeRFRenderer):
    """A red ball of radius 0.5 with a large constant density (an analytic field)."""

    bg_net = None

    def __init__(self, cfgs):
        super().__init__(cfgs[1], cfgs[2])

    def density(self, x):
        inside = (x.norm(dim=-1) < 0.5).float()
        return {"sigma": 200.0 * inside, "albedo": torch.tensor([1.0, 0.0, 0.0]).expand(x.shape[0], 3)}

    def forward(self, x, d, l=None, ratio=1.0, shading="albedo", need_normal=False):
        out = self.density(x)
        normal = torch.nn.functional.normalize(x, dim=-1) if (need_normal or shading != "albedo") else None
        return out["sigma"], out["albedo"], normal


def _blob_scene(**kw) -> tuple[FieldNetwork, torch.Tensor, torch.Tensor]:
    """A --cuda_ray MLP field with a strong blob (an opaque core, so rays stop early and pruning
    has something to drop), its occupancy grid refreshed, in training mode; and one 16x16
    view's rays o, d [1,256,3]. Seeds the generator with 0 first."""
    torch.manual_seed(0)
    field = _mlp_field(_opt(cuda_ray=True, blob_density=12.0, blob_radius=0.3, max_steps=256, **kw))
    for _ in range(4):
        field.update_extra_state()
    field.train()
    poses = circle_poses(torch.tensor([3.2]), torch.tensor([80.0]), torch.tensor([20.0]))
    o, d = get_rays(poses, intrinsics_from_fovy(torch.tensor([40.0]), 16, 16), 16, 16)
    return field, o, d


def _render(model, H=24):
    poses = circle_poses(torch.tensor([3.2]), torch.tensor([90.0]), torch.tensor([0.0]))
    o, d = get_rays(poses, intrinsics_from_fovy(torch.tensor([40.0]), H, H), H, H)
    return model.render(o, d, bg_color=torch.ones(3), need_normal=True)


def test_run_and_run_cuda_agree_on_an_analytic_ball():
    torch.manual_seed(0)
    plain = Ball(_opt()).eval()
    marched = Ball(_opt(cuda_ray=True)).eval()
    for _ in range(8):  # jittered refreshes: the decayed max marks every cell the ball touches
        marched.update_extra_state()
    a, b = _render(plain), _render(marched)
    # Ball silhouette: radius 0.5 at distance 3.2 with a 40-degree field of view.
    mask_a, mask_b = a["weights_sum"] > 0.5, b["weights_sum"] > 0.5
    assert (mask_a != mask_b).float().mean() < 0.03
    expected = math.pi * (0.5 / math.sqrt(3.2**2 - 0.25) / math.tan(math.radians(20)) * 12) ** 2
    assert abs(mask_a.sum().item() - expected) / expected < 0.1
    both = mask_a & mask_b
    # Away from the silhouette (where grid cells are partly inside the ball) depths agree.
    H = 24
    jj, ii = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(H) + 0.5, indexing="ij")
    rpix = math.sqrt(expected / math.pi)
    inner = (((ii - H / 2) ** 2 + (jj - H / 2) ** 2).sqrt() < 0.7 * rpix).reshape(1, -1)
    both = both & inner
    assert both.sum() > 20
    assert (a["image"][both] - b["image"][both]).abs().max() < 0.05
    depth_a = a["depth"][both] / a["weights_sum"][both]
    depth_b = b["depth"][both] / b["weights_sum"][both]
    assert (depth_a - depth_b).abs().max() < 0.05
    assert depth_a.min() > 2.65 and depth_a.max() < 3.2  # the front surface is at 2.7 on axis
    # Normals of the front face point towards the camera (+z).
    n = a["normal_image"][both]
    assert (n[:, 2] > 0).float().mean() > 0.95


def test_occupancy_grid_marks_the_ball_and_skips_empty_space():
    m = Ball(_opt(cuda_ray=True))
    m.update_extra_state()
    assert 0.0 < m.occupancy() < 0.2  # the ball is ~6.5% of the box
    m.cfg = dataclasses.replace(m.cfg, grid_update_frac=0.1)
    for _ in range(20):
        m.update_extra_state()  # partial refreshes keep the grid
    assert 0.0 < m.occupancy() < 0.2


def test_field_normals_methods_agree():
    opt = _opt(bg_radius=-1, blob_density=5.0, blob_radius=0.3)

    torch.manual_seed(0)
    fields = {m: _mlp_field(opt, m) for m in ("fd", "tetra", "autograd")}
    state = fields["fd"].state_dict()
    for f in fields.values():
        f.load_state_dict(state)
        f.eval()
    x = (torch.rand(64, 3) - 0.5) * 0.4
    ref = fields["autograd"].normal(x)
    for m in ("fd", "tetra"):
        cos = (fields[m].normal(x) * ref).sum(-1)
        assert cos.min() > 0.99, m
    # The blob dominates near the centre: normals point outwards.
    assert ((ref * torch.nn.functional.normalize(x, dim=-1)).sum(-1) > 0.9).float().mean() > 0.9


def test_shading_in_one_or_two_field_calls_gives_the_same_result():
    """forward() sends few samples and their stencil points through the field in one call,
    many in two: sigma, colour, normals and parameter gradients are the same either way."""
    opt = _opt(bg_radius=-1, blob_density=5.0, blob_radius=0.3)
    light = torch.nn.functional.normalize(torch.tensor([[0.3, 0.5, 1.0]]), dim=-1)
    for method in ("fd", "tetra"):
        torch.manual_seed(0)
        field = _mlp_field(opt, method)
        x = (torch.rand(50, 3) - 0.5) * 0.6
        res = []
        for limit in (10**9, 0):  # one call, then two
            field.merge_stencil_max = limit
            sigma, color, normal = field(x, x, light, 0.2, "lambertian")
            loss = sigma.sum() + color.sum() + (normal * light).sum()
            res.append((sigma, color, normal, torch.autograd.grad(loss, list(field.parameters()))))
        (s1, c1, n1, g1), (s2, c2, n2, g2) = res
        torch.testing.assert_close(s1, s2)
        torch.testing.assert_close(c1, c2)
        torch.testing.assert_close(n1, n2)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b)


def test_mlp_without_gradients_fuses_relu_and_gives_the_same_output(monkeypatch):
    """No-grad FusedReluMLP calls use one GEMM with a ReLU epilogue per hidden layer: same values as
    Linear + ReLU, also on a transposed (feature-major) input as the CUDA encoder returns."""
    from nerf.fast import field as fast_field

    if not fast_field.FUSED_RELU:
        pytest.skip("this torch has no _addmm_activation")
    torch.manual_seed(0)
    mlp = fast_field.FusedReluMLP(32, 4, 64, 3)
    calls = []
    real = torch._addmm_activation
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: calls.append(1) or real(*a, **k))
    for x in (torch.randn(300, 32), torch.randn(32, 300).t()):
        ref = mlp(x)  # gradients enabled: the unfused path
        with torch.no_grad():
            got = mlp(x)
        torch.testing.assert_close(got, ref.detach())
    assert len(calls) == 4  # two hidden layers, two inputs


def test_pruned_training_render_equals_the_full_one():
    """--prune_samples: same image, normals, orientation loss, entropy and parameter gradients."""
    from nerf.utils import weight_entropy

    field, o, d = _blob_scene(prune_samples=False)
    light = torch.tensor([[0.3, 0.5, 1.0]])
    results = {}
    for prune in (False, True):
        field.cfg = dataclasses.replace(field.cfg, prune_samples=prune)
        field.zero_grad()
        torch.manual_seed(1)  # the same jitter of the march
        out = field.render(o, d, light_d=light, ambient_ratio=0.2, shading="lambertian", perturb=True)
        ent = weight_entropy(out["weights"], out["n_pruned"])
        loss = out["image"].mean() + out["weights_sum"].mean() + out["loss_orient"] + ent
        loss.backward()
        grads = [p.grad.clone() for p in field.sigma_net.parameters()]
        results[prune] = (out, ent, grads)
    (full, ent_f, g_f), (pruned, ent_p, g_p) = results[False], results[True]
    assert full["n_pruned"] == 0
    n_all = full["weights"].numel()
    assert pruned["n_pruned"] > 0.3 * n_all  # most samples lie behind the opaque surface
    assert pruned["weights"].numel() + pruned["n_pruned"] == n_all
    for k in ("image", "depth", "weights_sum", "normal_image", "loss_orient"):
        assert torch.allclose(full[k], pruned[k], atol=1e-5, rtol=1e-4), k
    assert torch.allclose(ent_f, ent_p, rtol=1e-5)
    for a, b in zip(g_f, g_p):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-3)


@pytest.mark.parametrize("shading", ["lambertian", "albedo"])
def test_fixed_size_training_render_equals_the_variable_one(shading):
    """--graph_render's render at fixed sizes (padding rows in no ray): same image, normals,
    orientation loss, entropy and gradients as the variable-size one; the counts it reports."""
    from nerf.fast.fixed_render import train_render_fixed
    from nerf.utils import weight_entropy

    field, o, d = _blob_scene(prune_samples=True)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    light = torch.tensor([[0.3, 0.5, 1.0]])
    need = shading != "albedo"
    torch.manual_seed(1)
    noise = torch.rand(o.shape[0])
    torch.manual_seed(1)  # the same jitter: the variable march draws the same numbers
    ref, marched, kept = field.train_render(o, d, light, 0.2, shading, True, need, 1e-4)
    assert kept < marched if need else kept == marched
    cap = (marched + 37, kept + 11)
    got = train_render_fixed(field, o, d, noise, light, torch.tensor(0.2), shading, need, 1e-4, cap)
    assert got["totals"].tolist() == [marched, kept]
    rows = cap[1] if need else cap[0]
    assert got["weights"].shape == (rows,) and int(got["n_padding"]) == rows - kept
    assert int(got["n_pruned"]) == marched - kept == ref["n_pruned"]
    keys = ["image", "depth", "weights_sum"] + (["normal_image", "loss_orient"] if need else [])
    grads = []
    for out in (ref, got):
        for k in keys:
            torch.testing.assert_close(out[k], ref[k], atol=1e-6, rtol=1e-5)
        ent = weight_entropy(out["weights"], out["n_pruned"], out.get("n_padding", 0))
        loss = out["image"].mean() + out["weights_sum"].mean() + ent
        field.zero_grad()
        loss.backward()
        grads.append([p.grad.clone() for p in field.sigma_net.parameters()])
        torch.testing.assert_close(ent, weight_entropy(ref["weights"], ref["n_pruned"]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("warp", [False, True])
def test_march_warp_reaches_both_training_marches(warp, monkeypatch):
    """NeRFSpeedConfig.march_warp (--march_warp) is the ``warp`` of the eager and the
    fixed-size training march (the CUDA kernels' choice; the twin takes the same samples)."""
    import raymarching
    from nerf.fast.fixed_render import train_render_fixed

    field, o, d = _blob_scene(march_warp=warp)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    seen = []
    for name in ("march_rays_train", "march_rays_train_fixed"):
        real = getattr(raymarching, name)
        monkeypatch.setattr(
            raymarching, name, lambda *a, real=real, **k: seen.append(k["warp"]) or real(*a, **k)
        )
    _, marched, kept = field.train_render(o, d, None, 1.0, "albedo", True, False, 1e-4)
    train_render_fixed(field, o, d, None, None, 1.0, "albedo", False, 1e-4, (marched, kept))
    assert seen == [warp, warp]


def test_fixed_size_training_render_past_its_capacity_drops_samples_and_reports_the_totals():
    """Too small a march or pruning capacity: finite outputs of the fixed sizes, and the true
    totals (the march's always; the pruning's when the march fit) above the capacity."""
    from nerf.fast.fixed_render import train_render_fixed

    field, o, d = _blob_scene(prune_samples=True)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    light = torch.tensor([[0.3, 0.5, 1.0]])
    _, marched, kept = field.train_render(o, d, light, 0.2, "lambertian", False, True, 1e-4)
    for cap in ((marched // 2, kept), (marched, kept // 2)):
        got = train_render_fixed(field, o, d, None, light, 0.2, "lambertian", True, 1e-4, cap)
        assert int(got["totals"][0]) == marched
        if cap[0] == marched:  # the pruning saw every sample
            assert int(got["totals"][1]) == kept
        assert got["totals"][0] > cap[0] or got["totals"][1] > cap[1]
        assert got["weights"].shape == (cap[1],) and torch.isfinite(got["image"]).all()
        assert int(got["n_padding"]) >= 0 and int(got["n_pruned"]) >= 0


def test_inference_transmittance_threshold_trades_samples_for_a_bounded_error(monkeypatch):
    """--infer_T_thresh: stopping rays at transmittance 1e-2 leaves at most 1% of a pixel out."""
    import raymarching

    torch.manual_seed(0)
    model = Ball(_opt(cuda_ray=True)).eval()
    for _ in range(4):
        model.update_extra_state()
    orig, outs = raymarching.march_rays, {}
    for thr in (1e-4, 1e-2):
        counted = []

        def counting(n_alive, n_step, *a, counted=counted, **k):
            counted.append(n_alive * n_step)
            return orig(n_alive, n_step, *a, **k)

        monkeypatch.setattr(raymarching, "march_rays", counting)
        model.cfg = dataclasses.replace(model.cfg, infer_T_thresh=thr)
        outs[thr] = (_render(model), sum(counted))
    (exact, n_exact), (early, n_early) = outs[1e-4], outs[1e-2]
    assert n_early < n_exact  # fewer samples (12% here: an opaque ball stops early either way)
    assert (exact["image"] - early["image"]).abs().max() <= 1e-2 + 1e-6
    assert (exact["weights_sum"] - early["weights_sum"]).abs().max() <= 1e-2 + 1e-6


def test_a_batch_of_images_with_their_own_lights_equals_rendering_each_alone():
    for cuda_ray, training in ((False, False), (True, False), (True, True)):
        torch.manual_seed(0)
        field = _mlp_field(_opt(cuda_ray=cuda_ray, blob_density=8.0, blob_radius=0.3, max_steps=128))
        field.update_extra_state()
        field.train(training)  # training: packed samples whose lights are gathered by ray id
        poses = circle_poses(
            torch.tensor([3.2, 3.0]), torch.tensor([80.0, 60.0]), torch.tensor([20.0, -70.0])
        )
        o, d = get_rays(poses, intrinsics_from_fovy(torch.tensor([40.0, 30.0]), 12, 12), 12, 12)
        lights = torch.nn.functional.normalize(torch.tensor([[0.3, 0.5, 1.0], [-1.0, 0.2, 0.1]]), dim=-1)
        kw = dict(ambient_ratio=0.2, shading="lambertian", bg_color=torch.ones(3))
        both = field.render(o, d, light_d=lights, **kw)["image"]
        for b in range(2):
            alone = field.render(o[b : b + 1], d[b : b + 1], light_d=lights[b], **kw)["image"]
            assert torch.allclose(both[b], alone[0], atol=1e-5), (cuda_ray, training, b)
        assert (both[0] - both[1]).abs().max() > 0.05  # the lights (and views) differ


@pytest.mark.parametrize("activation", ["exp", "softplus"])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("shading", ["lambertian", "textureless", "normal", "albedo"])
def test_fused_mlp_head_equals_the_module_path(activation, autocast, pad, shading, monkeypatch):
    """FieldNetwork.fused_head (nerf/fast/field.py: FusedHead, with _MLPHead and _FDShade,
    autograd nodes with hand-written backwards) gives the module path's sigma, colour, normals and gradients (hash table and
    MLP) for every shading, in fp32 and under bf16 autocast, with and without the GPU path's
    padding (rows to a bucket size, 500 -> 512; the last layer's 4 output columns to 8)."""
    from nerf.fast import field as fast_field
    from nerf.network_grid import NeRFNetwork

    if not fast_field.FUSED_RELU:
        pytest.skip("this torch has no _addmm_activation")
    torch.manual_seed(0)
    opt = _opt(
        density_activation=activation,
        blob_density=5.0,
        blob_radius=0.4,
        grid_levels=4,
        grid_base=8,
        grid_log2_size=12,
        grid_finest=64,
        normal_method=None,
    )
    model = NeRFNetwork(*opt).train()
    with torch.no_grad():
        model.encoder.embeddings.uniform_(-0.5, 0.5)
    x = torch.rand(500, 3) * 1.6 - 0.8
    light = torch.tensor([[0.3, 0.5, 1.0]])
    wc, wn = torch.rand(500, 3), torch.randn(500, 3)  # loss weights: every output's gradient differs
    results = []
    head = model.fused_head
    head.pad_rows = pad  # the GPU path's row padding (bucket_rows), forced on CPU
    if pad:  # and the last layer's output padding (4 -> 8 columns)
        monkeypatch.setattr(fast_field, "_PAD_OUT_MIN_ROWS", 0)
    for fused in (False, True):
        model.fused_head = head if fused else None
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            sigma, color, normal = model(x, x, light, 0.2, shading, need_normal=True)
        loss = (
            (sigma.float() * 0.01).sum() + (color.float() * wc).square().sum() + (normal.float() * wn).sum()
        )
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((sigma, color, normal, grads))
    (s0, c0, n0, g0), (s1, c1, n1, g1) = results
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, s0, **tol)
    torch.testing.assert_close(c1.float(), c0.float(), **tol)
    torch.testing.assert_close(n1.float(), n0.float(), **tol)
    for a, b in zip(g1, g0):
        scale = b.abs().max().clamp(min=1e-12)
        assert ((a - b).abs().max() / scale).item() < (3e-2 if autocast else 1e-4)


def test_graph_pass_pads_buckets_and_captures_on_reuse(monkeypatch, capsys):
    """nerf/fast/graphed.py on the CPU, with the capture replaced by the module itself: the padded
    pass (rows in no ray) gives the eager pass's outputs and gradients; a bucket is captured on
    its second use, the least recently used graph is dropped, and a failed capture falls back
    to the eager pass for good, in one line."""
    import raymarching
    from nerf.fast.graphed import GraphedPasses, sample_bucket

    field, o, d = _blob_scene()
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    nears, fars = raymarching.near_far_from_aabb(o, d, field.aabb, field.min_near)
    xyzs, dirs, ts, rays = raymarching.march_rays_train(
        o, d, field.bound, field.density_bitfield, field.cascade, field.grid_size, nears, fars, True, 0.0, 256
    )
    assert sample_bucket(xyzs.shape[0]) > xyzs.shape[0]  # padding rows are exercised
    light = torch.tensor([[0.3, 0.5, 1.0]])

    def run(fn, shading):
        field.zero_grad(set_to_none=True)
        out = fn(field, xyzs, dirs, ts, rays, light, 0.2, shading, shading != "albedo", 1e-4, o.shape[0])
        loss = out["image"].mean() + out["weights"].square().sum()
        if "loss_orient" in out:
            loss = loss + out["loss_orient"] + out["normal_image"].mean()
        loss.backward()
        return out, [p.grad.clone() for p in field.sigma_net.parameters()]

    params = [p for p in field.parameters() if p.requires_grad]

    def capture(self, fn, args):
        # The capture sees fresh leaves on the parameters' storage, not the parameters.
        aliases = args[-len(params) :]
        assert all(a is not p and a.is_leaf and a.data_ptr() == p.data_ptr() for a, p in zip(aliases, params))
        return fn

    graphs = GraphedPasses(max_graphs=1, min_uses=2)
    monkeypatch.setattr(GraphedPasses, "_capture", capture)
    eager = {s: run(type(field).network_pass, s) for s in ("lambertian", "albedo")}
    for shading, captures in (
        ("lambertian", 0),
        ("lambertian", 1),
        ("lambertian", 1),
        ("albedo", 1),
        ("albedo", 2),
    ):
        out, grads = run(graphs.run, shading)
        ref, ref_grads = eager[shading]
        assert graphs.captures == captures and len(graphs.graphs) == min(captures, 1)
        assert out.keys() == ref.keys()
        for k in ref:
            assert torch.allclose(out[k], ref[k], atol=1e-6, rtol=1e-5), k
        for a, b in zip(grads, ref_grads):
            assert torch.allclose(a, b, atol=1e-7, rtol=1e-4)
    assert graphs.eager_runs == 2  # the first use of each bucket

    def broken(self, module, args):
        raise RuntimeError("capture broke")

    monkeypatch.setattr(GraphedPasses, "_capture", broken)
    graphs = GraphedPasses(min_uses=1)
    out, _ = run(graphs.run, "lambertian")
    assert graphs.disabled and torch.allclose(out["image"], eager["lambertian"][0]["image"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "capture broke" in err[0] and "runs eagerly" in err[0]

    # Churn guard: sample counts in a new bucket at every pass turn graphs off after
    # max_captures captures in the window, in one line, and the passes stay correct.
    monkeypatch.setattr(GraphedPasses, "_capture", capture)
    graphs = GraphedPasses(min_uses=1, window=8, max_captures=2)
    M, ref = xyzs.shape[0], eager["albedo"][0]
    extras = [0, M // 4, M // 2, M]  # rows in no ray appended: a new bucket each time
    assert len({sample_bucket(M + e) for e in extras}) == len(extras)
    for i, e in enumerate(extras):
        pad = [torch.nn.functional.pad(t, (0, 0, 0, e)) for t in (xyzs, dirs, ts)]
        out = graphs.run(field, *pad, rays, light, 0.2, "albedo", False, 1e-4, o.shape[0])
        assert torch.allclose(out["image"], ref["image"], atol=1e-6, rtol=1e-5)
        assert graphs.disabled == (i >= 2) and graphs.captures == min(i + 1, 3)
    assert not graphs.graphs
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 captures in the last 3 passes" in err[0]


def test_eval_normals_ground_truth_of_the_ball_on_a_box():
    """scripts/eval_normals.py's true normals: the ball's radial direction, a box face's axis,
    and box points near an edge too far from any defined surface to be evaluated."""
    from scripts.eval_normals import BALL_C, BALL_R, true_normals

    c = torch.tensor(BALL_C)
    d = torch.nn.functional.normalize(torch.tensor([[0.3, 1.0, -0.2]]), dim=-1)
    x = torch.cat([c + BALL_R * d, torch.tensor([[0.1, -0.25, 0.3], [0.39, -0.11, 0.0]])])
    n, ball, dist = true_normals(x)
    assert ball.tolist()[:2] == [True, False]
    torch.testing.assert_close(n[0], d[0])
    assert n[1].tolist() == [0.0, 0.0, 1.0] and float(dist[1]) < 1e-6
    assert float(dist[2]) > 0.02  # 0.01 from the +x face, 0.04 from the top: an edge, left out


class _DoneEvent:
    """torch.cuda.Event stand-in on the CPU: work is done as soon as it is recorded."""

    def record(self):
        pass

    def query(self):
        return True

    def synchronize(self):
        pass


def test_graph_render_sizes_overflows_and_work_limit_on_the_cpu(monkeypatch, capsys):
    """nerf/fast/graphed.py's GraphedRender on the CPU, with the capture replaced by the function
    itself: warm-up renders are eager, then the fixed-size render gives the eager outputs;
    an undersized capture loses samples, marks its outputs incomplete (on the device), is
    reported once (a step later) and captured again larger; renders above --graph_render_max_work stay eager."""
    from nerf.fast.graphed import GraphedRender, collector_frozen

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", lambda fn, args, **kw: fn)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "Event", _DoneEvent)
    field, o, d = _blob_scene(prune_samples=True)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    light = torch.tensor([[0.3, 0.5, 1.0]])

    def render(graphs, seed):
        args = (o, d, light, 0.2, "lambertian", True, True, 1e-4)
        torch.manual_seed(seed)
        if graphs is None:
            return field.train_render(*args)[0]
        graphs.pinned = [torch.zeros(2, dtype=torch.int32) for _ in range(4)]  # no pinned memory here
        return graphs.run(field, *args)

    import gc

    graphs = GraphedRender(warmup=2, headroom=1.2)
    with collector_frozen():
        for step in range(4):
            out, ref = render(graphs, step), render(None, step)
            assert graphs.captures == (0 if step < 2 else 1)
            for k in ("image", "depth", "weights_sum", "normal_image", "loss_orient"):
                torch.testing.assert_close(out[k], ref[k], atol=1e-6, rtol=1e-5)
            assert step < 2 or bool(out["complete"])
        # The first capture in the block froze the objects alive then (cheap collections at
        # each drop); leaving the block (the end of Trainer.train) undoes it.
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    assert graphs.overflows == 0 and capsys.readouterr().err == ""

    (key,) = graphs.sizes
    graphs._poll()  # the counts of the replays so far, before they are forgotten
    graphs.sizes[key].need = [n // 8 for n in graphs.sizes[key].need]
    graphs._drop(key)
    short = render(graphs, 9)  # captured too small: rays lose samples
    assert graphs.captures == 2 and graphs.overflows == 0  # not known yet on the host
    assert not bool(short["complete"])  # but marked on the device: training skips the step
    assert (short["weights_sum"] - render(None, 9)["weights_sum"]).abs().max() > 0.1
    out = render(graphs, 9)  # the counts of the last step are read: captured again larger
    assert graphs.overflows == 1 and graphs.captures == 3
    torch.testing.assert_close(out["image"], render(None, 9)["image"], atol=1e-6, rtol=1e-5)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "marked incomplete" in err[0] and "captured again larger" in err[0]
    assert gc.get_freeze_count() == 0  # captures outside collector_frozen() freeze nothing

    def broken(fn, args, **kw):
        raise ValueError("no kernel for this GPU")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", broken)
    failing = GraphedRender(warmup=1)
    for step in range(2):  # eager warm-up, then the failed capture: eager from then on
        torch.testing.assert_close(render(failing, step)["image"], render(None, step)["image"])
    assert failing.disabled and failing.captures == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "capture failed (no kernel for this GPU)" in err[0] and "runs eagerly" in err[0]

    gated = GraphedRender(warmup=1, max_work=1000)  # far below this render's rows
    for step in range(3):
        torch.testing.assert_close(render(gated, step)["image"], render(None, step)["image"])
    assert gated.captures == 0 and not gated.sizes[key].ready()
