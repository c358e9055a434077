"""nerf/fast/fused_mlp.py: the MLP + density/albedo head as Triton kernels (``--fused_mlp``) against
``_MLPHead`` (cuBLAS GEMMs, the reference), and the fallback where the kernels do not apply."""

from __future__ import annotations

import pytest
import torch

from nerf.fast import fused_mlp
from nerf.fast.field import _MLPHead
from tests.conftest import nerf_configs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _params(F: int, H: int, device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shapes = fused_mlp.param_shapes(F, H)
    scale = [F**-0.5, 0.1, H**-0.5, 0.1, H**-0.5, 0.1]
    return [(torch.randn(s, generator=g) * c).to(device).requires_grad_() for s, c in zip(shapes, scale)]


def test_fused_mlp_falls_back_off_the_gpu():
    """On the CPU (and without autocast, or for other MLP shapes) ``supported`` says no and a
    field with --fused_mlp gives exactly the cuBLAS head's output."""
    from nerf.network_grid import NeRFNetwork
    from tests.test_renderer import _opt

    assert not fused_mlp.supported(torch.zeros(3, 3), _params(32, 64, "cpu")[0::2])
    x = torch.rand(300, 3) * 1.6 - 0.8
    outs = []
    for on in (False, True):
        opt = _opt(
            grid_levels=4, grid_base=8, grid_log2_size=12, grid_finest=64, normal_method=None, fused_mlp=on
        )
        torch.manual_seed(0)
        model = NeRFNetwork(*opt)
        assert model.fused_head.triton == on
        outs.append(model.density(x)["sigma"])
    assert torch.equal(outs[0], outs[1])


def test_only_the_kernels_mlp_shapes_are_taken():
    """``shapes_ok``: the grid backbone's MLP and other power-of-two widths are; a width that is
    not a power of two, a fourth layer, other outputs, too wide an input or int32 overflow not."""

    def w(*shape):
        return torch.zeros(shape)

    assert fused_mlp.shapes_ok(10**6, [w(64, 32), w(64, 64), w(4, 64)])
    assert fused_mlp.shapes_ok(10, [w(16, 24), w(16, 16), w(4, 16)])
    assert fused_mlp.shapes_ok(10, [w(128, 128), w(128, 128), w(4, 128)])
    assert not fused_mlp.shapes_ok(10, [w(48, 32), w(48, 48), w(4, 48)])
    assert not fused_mlp.shapes_ok(10, [w(64, 32), w(64, 64), w(64, 64), w(4, 64)])
    assert not fused_mlp.shapes_ok(10, [w(64, 32), w(64, 64), w(3, 64)])
    assert not fused_mlp.shapes_ok(10, [w(64, 256), w(64, 64), w(4, 64)])
    assert not fused_mlp.shapes_ok(2**26, [w(64, 32), w(64, 64), w(4, 64)])


def test_kernels_that_fail_here_fall_back_in_one_line(capsys, monkeypatch):
    """``_probe``: kernels that raise (a GPU or Triton build they do not support) or return
    non-finite values on the test input turn the fused path off with one line, once per key."""
    monkeypatch.setattr(fused_mlp, "_PROBED", {})
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("PTX not supported\nmore detail")

    dev = torch.device("cpu")
    assert not fused_mlp._probe(("a",), "MLP", dev, broken)
    assert not fused_mlp._probe(("a",), "MLP", dev, broken)  # cached: not run again
    assert calls == [1]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "[speed] --fused_mlp: the Triton MLP kernels failed on cpu (PTX not supported); using the PyTorch path"
    ]
    assert not fused_mlp._probe(("b",), "MLP", dev, lambda: [torch.tensor([float("nan")])])
    assert "non-finite" in capsys.readouterr().err
    assert fused_mlp._probe(("c",), "MLP", dev, lambda: [torch.ones(2)])
    assert capsys.readouterr().err == ""


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["exp", "softplus"])
def test_triton_head_matches_cublas_head(dtype, activation):
    """sigma, albedo and every gradient (features, weights, biases) of the Triton kernels and of
    ``_MLPHead`` under the same autocast, each against a float64 evaluation of the same rounded
    inputs: the kernels are at most as far from it as cuBLAS (plus a small slack). Shapes: the
    grid backbone's (32 -> 64), a width that is not a power of two (24, padded to 32), a narrow
    and a wide MLP, a partial last tile, and a backward without the features' gradient."""
    if fused_mlp._kernels() is None:
        pytest.skip("Triton is not available")
    torch.manual_seed(0)
    for F, H, n in [(32, 64, 100_000), (32, 64, 77), (24, 32, 5000), (32, 128, 3000)]:
        for want_gx in (True, False):
            feat = (torch.randn(n, F, device="cuda") * 0.7).to(dtype).requires_grad_(want_gx)
            blob = torch.randn(n, device="cuda")
            params = _params(F, H, "cuda")
            g_sigma = torch.randn(n, device="cuda")
            g_albedo = torch.randn(n, 3, device="cuda").to(dtype)
            leaves = ([feat] if want_gx else []) + params

            def grads(sigma, albedo, leaves=leaves, g_sigma=g_sigma, g_albedo=g_albedo):
                loss = (sigma.double() * g_sigma.double()).sum() + (albedo.double() * g_albedo.double()).sum()
                return [sigma, albedo, *torch.autograd.grad(loss, leaves)]

            with torch.autocast("cuda", dtype=dtype):
                assert fused_mlp.supported(feat, params[0::2])
                tri = grads(*fused_mlp.mlp_head(feat, blob, activation, params))
                ref = grads(*_MLPHead.apply(feat, blob, n, activation, False, *params))
            # float64 of the same rounded inputs (weights rounded as autocast rounds them)
            f64 = feat.detach().double().requires_grad_(want_gx)
            p64 = [p.detach().to(dtype).double().requires_grad_() for p in params]
            exact = _MLPHead.apply(f64, blob.double(), n, activation, False, *p64)
            loss = (exact[0] * g_sigma.double()).sum() + (exact[1] * g_albedo.double()).sum()
            exact = [*exact, *torch.autograd.grad(loss, ([f64] if want_gx else []) + p64)]
            if n == 100_000 and want_gx:  # no atomics: the same inputs give the same gradients
                with torch.autocast("cuda", dtype=dtype):
                    again = grads(*fused_mlp.mlp_head(feat, blob, activation, params))
                assert all(torch.equal(a, b) for a, b in zip(again, tri))
            for i, (t, r, e) in enumerate(zip(tri, ref, exact)):
                assert t.shape == e.shape and t.dtype == r.dtype, (i, t.shape, e.shape, t.dtype, r.dtype)
                scale = e.abs().max().clamp(min=1e-12)
                err_t = ((t.double() - e).abs().max() / scale).item()
                err_r = ((r.double() - e).abs().max() / scale).item()
                assert err_t <= 2 * err_r + 4e-3, (F, H, n, want_gx, i, err_t, err_r)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("count", [0, 40, 1000, 1024])
def test_head_skips_rows_that_are_not_live(count):
    """live=(count, period) (--graph_render's padding rows, period-long segments as in a merged
    fd call): rows r with r % period < count as without it, the others zero with no gradient;
    the weight gradients are those of the live rows alone."""
    if fused_mlp._kernels() is None:
        pytest.skip("Triton is not available")
    torch.manual_seed(0)
    period, F, H = 1024, 32, 64
    n = 7 * period
    feat = (torch.randn(n, F, device="cuda") * 0.7).half().requires_grad_()
    blob = torch.randn(n, device="cuda")
    params = _params(F, H, "cuda")
    live_rows = (torch.arange(n, device="cuda") % period) < count
    g_sigma, g_albedo = torch.randn(n, device="cuda"), torch.randn(n, 3, device="cuda").half()
    outs = []
    for live in (None, (torch.tensor([count], dtype=torch.int32, device="cuda"), period)):
        with torch.autocast("cuda", dtype=torch.float16):
            sigma, albedo = fused_mlp.mlp_head(feat, blob, "exp", params, live)
        m = live_rows if live is None else torch.ones_like(live_rows)
        loss = (sigma * g_sigma * m).sum() + (albedo.float() * g_albedo.float() * m[:, None]).sum()
        outs.append([sigma, albedo, *torch.autograd.grad(loss, [feat, *params])])
    (ref_s, ref_a, *ref_g), (got_s, got_a, *got_g) = outs
    assert torch.equal(got_s[live_rows], ref_s[live_rows]) and not got_s[~live_rows].any()
    assert torch.equal(got_a[live_rows], ref_a[live_rows]) and not got_a[~live_rows].any()
    assert not got_g[0][~live_rows].any()
    for a, b in zip(got_g, ref_g):
        assert torch.allclose(a.float(), b.float(), atol=1e-6, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("activation", ["exp", "softplus"])
def test_head_computes_the_density_blob_from_the_points(activation):
    """fused_mlp.BlobSpec: the kernels compute FieldNetwork.density_blob (gaussian under exp,
    the cone under softplus) from the points; sigma, albedo and every gradient as with the blob
    passed as a tensor."""
    from main import parse_args
    from nerf.network_grid import NeRFNetwork

    if fused_mlp._kernels() is None:
        pytest.skip("Triton is not available")
    torch.manual_seed(0)
    args = [
        "--text",
        "x",
        "-O",
        "--density_activation",
        activation,
        "--blob_density",
        "5",
        "--blob_radius",
        "0.4",
    ]
    field = NeRFNetwork(*nerf_configs(parse_args(args)[0])).cuda()
    n, F, H = 5000, 32, 64
    x = torch.rand(n, 3, device="cuda") * 2 - 1
    feat = (torch.randn(n, F, device="cuda") * 0.7).half().requires_grad_()
    params = _params(F, H, "cuda")
    g_sigma, g_albedo = torch.randn(n, device="cuda"), torch.randn(n, 3, device="cuda").half()
    outs = []
    blob = fused_mlp.BlobSpec(x, field.blob_density, field.blob_radius, activation == "exp")
    for b in (field.density_blob(x), blob):
        with torch.autocast("cuda", dtype=torch.float16):
            sigma, albedo = fused_mlp.mlp_head(feat, b, activation, params)
        loss = (sigma * g_sigma).sum() + (albedo.float() * g_albedo.float()).sum()
        outs.append([sigma, albedo, *torch.autograd.grad(loss, [feat, *params])])
    for i, (a, b) in enumerate(zip(*outs)):
        scale = b.float().abs().max().clamp(min=1e-12)
        assert ((a.float() - b.float()).abs().max() / scale).item() <= 1e-5, i


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("shading", ["lambertian", "albedo"])
def test_fused_mlp_training_render_matches(shading):
    """A --cuda_ray training render (fd normals, pruning) under fp16 autocast, with the Triton
    head and with the cuBLAS head, against the same render in fp32: the image and every
    parameter gradient are as close to fp32 with the kernels as with cuBLAS (fp16 gradients of
    this small loss fall into fp16's subnormal range, so neither is close to fp32 everywhere)."""
    from main import parse_args
    from nerf.network_grid import NeRFNetwork
    from nerf.provider import circle_poses, get_rays, intrinsics_from_fovy

    if fused_mlp._kernels() is None:
        pytest.skip("Triton is not available")
    opt, _ = parse_args(["--text", "t", "-O"])
    torch.manual_seed(0)
    model = NeRFNetwork(*nerf_configs(opt)).cuda().train()
    with torch.autocast("cuda", dtype=torch.float16):
        assert fused_mlp.supported(torch.zeros(1, device="cuda"), [m.weight for m in model.sigma_net.layers])
    with torch.no_grad():
        model.encoder.embeddings.uniform_(-0.3, 0.3)
    for _ in range(3):
        model.update_extra_state()
    poses = circle_poses(torch.tensor([3.2]), torch.tensor([75.0]), torch.tensor([30.0]), "cuda")
    o, d = get_rays(poses, intrinsics_from_fovy(torch.tensor([20.0], device="cuda"), 64, 64), 64, 64)
    light = torch.nn.functional.normalize(torch.tensor([[0.3, 0.5, 1.0]], device="cuda"), dim=-1)
    results = {}
    for name, fused, half in (("fp32", False, False), ("cublas", False, True), ("triton", True, True)):
        model.fused_head.triton = fused
        model.zero_grad()
        torch.manual_seed(1)  # the same jittered march
        with torch.autocast("cuda", dtype=torch.float16, enabled=half):
            out = model.render(o, d, light_d=light, ambient_ratio=0.3, shading=shading, perturb=True)
        (out["image"].float().square().mean() * 100 + out["weights_sum"].float().mean()).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results[name] = (out["image"].float(), grads)
    img, grads = results["fp32"]
    for i, g in enumerate(grads):
        err = {
            k: ((results[k][1][i] - g).norm() / g.norm().clamp(min=1e-12)).item()
            for k in ("cublas", "triton")
        }
        assert err["triton"] <= 1.5 * err["cublas"] + 1e-2, (i, err)
    e_img = {k: (results[k][0] - img).abs().max().item() for k in ("cublas", "triton")}
    assert e_img["triton"] <= 1.5 * e_img["cublas"] + 2e-3, e_img


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("shading", ["lambertian", "textureless", "normal", "albedo"])
@pytest.mark.parametrize("per_sample_light", [False, True])
def test_triton_fd_shade_matches_the_autograd_node(shading, per_sample_light):
    """``fused_mlp.fd_shade`` against ``nerf.fast.field._FDShade`` (its reference): sigma, colour,
    normals and the gradients of the merged call's densities and albedos, with a NaN and an inf
    density among the fd points and a sample whose fd points agree (zero gradient)."""
    from nerf.fast.field import _FDShade

    if fused_mlp._kernels() is None:
        pytest.skip("Triton is not available")
    torch.manual_seed(0)
    n = 3000
    sig = (torch.randn(7 * n, device="cuda") * 3).abs()
    sig[n + 5], sig[n + 7] = float("nan"), float("inf")
    sig[n + 9 :: n] = 1.0
    alb = torch.rand(7 * n, 3, device="cuda").half()
    light = torch.nn.functional.normalize(torch.randn(n if per_sample_light else 1, 3, device="cuda"), dim=-1)
    g = [torch.randn(n, device="cuda"), torch.randn(n, 3, device="cuda"), torch.randn(n, 3, device="cuda")]
    assert fused_mlp.supported_fd_shade(sig, alb, 0.3) and not fused_mlp.supported_fd_shade(
        sig, alb, torch.tensor(0.3)
    )
    results = []
    for fn in (_FDShade.apply, fused_mlp.fd_shade):
        s, a = sig.clone().requires_grad_(), alb.clone().requires_grad_()
        out = fn(s, a, light, 0.3, 1e-2, shading, n)
        loss = sum((o.float() * w).sum() for o, w in zip(out, g))
        results.append((out, torch.autograd.grad(loss, [s, a])))
    (o0, g0), (o1, g1) = results
    for a, b in zip((*o1, *g1), (*o0, *g0)):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-4, equal_nan=True)


def test_fd_shade_takes_the_ambient_ratio_as_a_number_or_a_one_element_tensor():
    """--graph_render passes the ratio as a tensor (a graph input); anything else is refused."""
    cpu = torch.device("cpu")
    assert fused_mlp._ratio_ok(0.3, cpu) and fused_mlp._ratio_ok(1, cpu)
    assert fused_mlp._ratio_ok(torch.tensor(0.3), cpu) and fused_mlp._ratio_ok(torch.tensor([0.3]), cpu)
    assert not fused_mlp._ratio_ok(torch.tensor([0.3, 0.4]), cpu)
    assert not fused_mlp._ratio_ok(torch.tensor(0.3, dtype=torch.float64), cpu)
    assert not fused_mlp._ratio_ok("0.3", cpu)
