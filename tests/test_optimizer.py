"""Adan against its update equations, and the EMA."""

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
