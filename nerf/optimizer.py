"""Adan (Xie et al., 2022, "Adan: Adaptive Nesterov Momentum Algorithm") and an EMA of weights.

Adan keeps three moving averages per parameter: of the gradient ``m``, of the gradient
difference ``v`` and of the squared Nesterov-corrected gradient ``n``::

    diff = g_k - g_{k-1}                    (0 at the first step)
    m = b1 m + (1 - b1) g
    v = b2 v + (1 - b2) diff
    n = b3 n + (1 - b3) (g + b2 diff)^2
    step = (m / (1 - b1^k) + b2 v / (1 - b2^k)) / (sqrt(n / (1 - b3^k)) + eps)
    p = (p - lr step) / (1 + lr wd)          (proximal weight decay)

Gradients are first clipped to a global norm of ``max_grad_norm`` (when > 0).
"""

from __future__ import annotations

import torch


class Adan(torch.optim.Optimizer):
    """Adan with betas ``(b1, b2, b3)`` given as the reference does, e.g. (0.98, 0.92, 0.99).

    >>> p = torch.nn.Parameter(torch.ones(2)); opt = Adan([p], lr=0.1)
    >>> p.grad = torch.ones(2); opt.step(); p.detach().tolist()
    [0.8999999761581421, 0.8999999761581421]
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.98, 0.92, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
    ):
        if lr < 0 or eps < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError("invalid Adan hyper-parameters")
        super().__init__(
            params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        max_norm = self.defaults["max_grad_norm"]
        clip = 1.0
        if max_norm > 0:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                total = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
                )
                clip = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for group in self.param_groups:
            b1, b2, b3 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float() * clip
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["m"] = torch.zeros_like(g)
                    st["v"] = torch.zeros_like(g)
                    st["n"] = torch.zeros_like(g)
                    st["prev"] = g.clone()
                st["step"] += 1
                k = st["step"]
                diff = g - st["prev"]
                st["m"].mul_(b1).add_(g, alpha=1 - b1)
                st["v"].mul_(b2).add_(diff, alpha=1 - b2)
                nest = g + b2 * diff
                st["n"].mul_(b3).addcmul_(nest, nest, value=1 - b3)
                st["prev"].copy_(g)
                denom = (st["n"] / (1 - b3**k)).sqrt_().add_(eps)
                upd = (st["m"] / (1 - b1**k) + b2 * st["v"] / (1 - b2**k)) / denom
                p.data = ((p.data.float() - lr * upd) / (1 + lr * wd)).to(p.dtype)
        return loss


class EMA:
    """Exponential moving average of parameters: ``shadow = d * shadow + (1 - d) * param``.

    ``swap()`` exchanges the live weights and the average (call again to swap back).

    >>> m = torch.nn.Linear(1, 1); ema = EMA(m.parameters(), 0.5)
    >>> with torch.no_grad(): _ = m.weight.add_(2.0)
    >>> ema.update(); bool(torch.allclose(ema.shadow[0], m.weight - 1.0))
    True
    """

    def __init__(self, parameters, decay: float):
        self.params = [p for p in parameters if p.requires_grad]
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": list(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
