"""Adan against its update equations, and the EMA."""

import copy

import pytest
import torch

from nerf.optimizer import EMA, Adan


def _adan_reference(p, grads, lr, b1, b2, b3, eps, wd, max_norm):
    m = v = n = torch.zeros_like(p)
    prev = None
    for k, g in enumerate(grads, 1):
        if max_norm > 0:
            g = g * min(1.0, max_norm / (g.norm().item() + 1e-6))
        diff = torch.zeros_like(g) if prev is None else g - prev
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * diff
        n = b3 * n + (1 - b3) * (g + b2 * diff) ** 2
        step = (m / (1 - b1**k) + b2 * v / (1 - b2**k)) / (torch.sqrt(n / (1 - b3**k)) + eps)
        p = (p - lr * step) / (1 + lr * wd)
        prev = g
    return p


def test_adan_matches_its_equations():
    torch.manual_seed(0)
    p0 = torch.randn(5)
    grads = [torch.randn(5) * 3 for _ in range(4)]
    param = torch.nn.Parameter(p0.clone())
    opt = Adan([param], lr=0.05, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=2e-5, max_grad_norm=2.0)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    ref = _adan_reference(p0, grads, 0.05, 0.98, 0.92, 0.99, 1e-8, 2e-5, 2.0)
    assert torch.allclose(param.detach(), ref, atol=1e-6)


def test_adan_minimises_a_quadratic():
    x = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    opt = Adan([x], lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        (x**2).sum().backward()
        opt.step()
    assert x.norm() < 0.1


def test_ema_swap_round_trip():
    m = torch.nn.Linear(2, 2)
    ema = EMA(m.parameters(), 0.9)
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update()
    ema.swap()
    assert torch.allclose(m.weight, w0 + 0.1, atol=1e-6)
    ema.swap()
    assert torch.allclose(m.weight, w0 + 1.0)


SHAPES = [(7,), (3, 4), (2, 3, 5), (1,)]


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _make(params: list[torch.nn.Parameter], foreach: bool) -> Adan:
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.03}]  # two rates
    return Adan(groups, lr=0.1, weight_decay=0.05, max_grad_norm=1.0, foreach=foreach)


def _grads(step: int) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(s, generator=g) * 5 for s in SHAPES]
    if step in (0, 2):
        grads[2] = None  # no gradient: its state starts late and its step count lags
    return grads


def _run(opt: Adan, params: list[torch.nn.Parameter], steps: range) -> None:
    for k in steps:
        for p, g in zip(params, _grads(k)):
            p.grad = None if g is None else g.clone()
        opt.step()


def test_foreach_adan_equals_the_loop():
    loop_p, fe_p = _params(0), _params(0)
    loop, fe = _make(loop_p, foreach=False), _make(fe_p, foreach=None)
    ptrs = [p.data_ptr() for p in fe_p]
    # The clip is active: the global gradient norm is well above max_grad_norm.
    assert torch.linalg.vector_norm(torch.cat([g.flatten() for g in _grads(0) if g is not None])) > 10
    _run(loop, loop_p, range(5))
    _run(fe, fe_p, range(5))
    for a, b in zip(loop_p, fe_p):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-7)
    assert [fe.state[p]["step"] for p in fe_p] == [5, 5, 3, 5]
    # Updated in place: same Parameter objects in the groups, same storage.
    assert [p for g in fe.param_groups for p in g["params"]] == fe_p
    assert [p.data_ptr() for p in fe_p] == ptrs


def test_foreach_adan_keeps_the_loop_for_other_dtypes():
    def make(foreach):
        torch.manual_seed(1)
        ps = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
        return ps, Adan(ps, lr=0.1, weight_decay=0.01, max_grad_norm=0.5, foreach=foreach)

    (lp, lopt), (fp, fopt) = make(False), make(True)
    for k in range(3):
        g = torch.Generator().manual_seed(k)
        grads = [torch.randn(4, generator=g), torch.randn(3, generator=g, dtype=torch.float64)]
        for ps, opt in ((lp, lopt), (fp, fopt)):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            opt.step()
    assert fp[1].dtype == torch.float64 and fopt.state[fp[1]]["m"].dtype == torch.float32
    for a, b in zip(lp, fp):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-7)


def test_loop_checkpoint_resumes_in_foreach():
    loop_p = _params(3)
    loop = _make(loop_p, foreach=False)
    _run(loop, loop_p, range(3))
    saved = copy.deepcopy(loop.state_dict())
    fe_p = [torch.nn.Parameter(p.detach().clone()) for p in loop_p]
    fe = _make(fe_p, foreach=True)
    fe.load_state_dict(saved)
    assert isinstance(fe.state[fe_p[0]]["step"], int)
    _run(loop, loop_p, range(3, 6))
    _run(fe, fe_p, range(3, 6))
    for a, b in zip(loop_p, fe_p):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-7)
    assert fe.state_dict()["state"].keys() == loop.state_dict()["state"].keys()
    for sa, sb in zip(loop.state_dict()["state"].values(), fe.state_dict()["state"].values()):
        assert sa.keys() == sb.keys() == {"step", "m", "v", "n", "prev"} and sa["step"] == sb["step"]


def test_ema_foreach_update_matches_the_formula():
    torch.manual_seed(2)
    ps = [
        torch.nn.Parameter(torch.randn(3, 2)),
        torch.nn.Parameter(torch.randn(5, dtype=torch.float64)),  # a second dtype: its own group
        torch.nn.Parameter(torch.randn(4)),
    ]
    ema = EMA(ps, 0.9)
    expect = [p.detach().clone() for p in ps]
    for _ in range(3):
        with torch.no_grad():
            for p in ps:
                p.add_(torch.randn_like(p))
        ema.update()
        expect = [0.9 * e + 0.1 * p.detach() for e, p in zip(expect, ps)]
    for s, e in zip(ema.shadow, expect):
        torch.testing.assert_close(s, e)
    live = [p.detach().clone() for p in ps]
    shadow = [s.clone() for s in ema.shadow]
    ema.swap()
    assert all(torch.equal(p, s) for p, s in zip(ps, shadow))
    assert all(torch.equal(s, p) for s, p in zip(ema.shadow, live))


def test_ema_update_with_a_parameter_of_another_dtype():
    m = torch.nn.Linear(3, 2)
    ema = EMA(m.parameters(), 0.5)
    s0 = [s.clone() for s in ema.shadow]
    m.weight.data = m.weight.data.double() + 1.0  # e.g. a model cast after the EMA was made
    ema.update()
    assert ema.shadow[0].dtype == torch.float32
    torch.testing.assert_close(ema.shadow[0], 0.5 * s0[0] + 0.5 * m.weight.detach().float())
    torch.testing.assert_close(ema.shadow[1], s0[1])


def test_gated_adan_equals_adan_without_the_skipped_steps():
    """step(ok=...) decided on the device: a skipped step (here with NaN gradients, and the
    very first step) leaves everything as it was; applied steps match the plain update."""
    ref_p, gated_p = _params(4), _params(4)
    ref, gated = _make(ref_p, foreach=None), _make(gated_p, foreach=None)
    skipped = {0, 3}
    for k in range(7):
        grads = _grads(k)
        bad = k in skipped
        for p, g in zip(gated_p, grads):
            p.grad = None if g is None else g.clone() * (float("nan") if bad else 1.0)
        gated.step(ok=torch.tensor(not bad))
        if not bad:
            for p, g in zip(ref_p, grads):
                p.grad = None if g is None else g.clone()
            ref.step()
    for a, b in zip(ref_p, gated_p):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)
    steps = [gated.state[p]["step"] for p in gated_p]
    assert all(isinstance(s, torch.Tensor) for s in steps)
    assert [int(s) for s in steps] == [ref.state[p]["step"] for p in ref_p] == [5, 5, 4, 5]
    for key in ("m", "v", "n", "prev"):
        for a, b in zip(ref_p, gated_p):
            torch.testing.assert_close(gated.state[b][key], ref.state[a][key], rtol=1e-5, atol=1e-6)


def test_gated_adan_resumes_from_a_checkpoint_of_either_kind():
    a_p, b_p = _params(5), _params(5)
    a, b = _make(a_p, foreach=None), _make(b_p, foreach=None)
    _run(a, a_p, range(3))
    _run(b, b_p, range(3))
    # An int-step checkpoint into the gated path, and a gated (tensor-step) one back into foreach.
    for k in range(3, 5):
        for p, g in zip(b_p, _grads(k)):
            p.grad = None if g is None else g.clone()
        b.step(ok=torch.tensor(True))
    c_p = [torch.nn.Parameter(p.detach().clone()) for p in b_p]
    c = _make(c_p, foreach=None)
    c.load_state_dict(copy.deepcopy(b.state_dict()))
    _run(a, a_p, range(3, 6))
    _run(c, c_p, range(5, 6))
    for x, y in zip(a_p, c_p):
        torch.testing.assert_close(y.detach(), x.detach(), rtol=1e-5, atol=1e-6)


def test_gated_adan_refuses_other_dtypes():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = Adan([p], lr=0.1)
    p.grad = torch.ones(3, dtype=torch.float64)
    assert not opt.can_gate()
    with pytest.raises(ValueError, match="float32"):
        opt.step(ok=torch.tensor(True))


def test_gated_ema_moves_only_when_ok():
    m = torch.nn.Linear(2, 2)
    ema = EMA(m.parameters(), 0.9)
    before = [s.clone() for s in ema.shadow]
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(ok=torch.tensor(False))
    for s, b in zip(ema.shadow, before):
        assert torch.equal(s, b)
    ema.update(ok=torch.tensor(True))
    torch.testing.assert_close(ema.shadow[0], before[0] + 0.1)


def test_gated_adan_counts_steps_per_parameter():
    """Parameters share one device step count until one of them misses a gradient."""
    ps = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    ref = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    gated, plain = Adan(ps, lr=0.1), Adan(ref, lr=0.1)
    for k, with_second in enumerate((True, True, False, True)):
        for group in (ps, ref):
            group[0].grad = torch.full((3,), float(k + 1))
            group[1].grad = torch.full((2,), -float(k + 1)) if with_second else None
        gated.step(ok=torch.tensor(True))
        plain.step()
    assert [int(gated.state[p]["step"]) for p in ps] == [4, 3]
    for a, b in zip(ref, ps):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_cuda_adan_equals_the_foreach_gated_update():
    """nerf/csrc/adan.cu against _step_gated's foreach arithmetic: two groups, global-norm
    clipping, a late-starting parameter, skipped steps (NaN gradients, the very first step)."""
    from cuda_kernels.build import load_kernels

    if load_kernels() is None:
        pytest.skip("the CUDA kernels are not available")

    def make(fused):
        ps = [torch.nn.Parameter(p.detach().cuda()) for p in _params(6)]
        big = torch.randn(1 << 18, generator=torch.Generator().manual_seed(8))
        ps.append(torch.nn.Parameter(big.cuda()))  # many blocks (the same values in both)
        groups = [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.03}]
        return ps, Adan(groups, lr=0.1, weight_decay=0.05, max_grad_norm=1.0, fused=fused)

    (fp, fo), (rp, ro) = make(True), make(False)
    g_big = torch.Generator().manual_seed(9)
    for k in range(8):
        grads = [None if g is None else g.cuda() for g in _grads(k)]
        grads.append(torch.randn(1 << 18, generator=g_big).cuda() * 0.1)
        bad = k in (0, 4)
        for ps, opt in ((fp, fo), (rp, ro)):
            for p, g in zip(ps, grads):
                p.grad = None if g is None else g.clone() * (float("nan") if bad else 1.0)
            opt.step(ok=torch.tensor(not bad, device="cuda"))
    assert fo.fused_steps > 0 and ro.fused_steps == 0
    for a, b in zip(rp, fp):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)
    for key in ("m", "v", "n", "prev"):
        for a, b in zip(rp, fp):
            torch.testing.assert_close(fo.state[b][key], ro.state[a][key], rtol=1e-5, atol=1e-6)
    assert [int(fo.state[p]["step"]) for p in fp] == [int(ro.state[p]["step"]) for p in rp]
