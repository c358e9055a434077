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

from collections import Counter, defaultdict

import torch


class Adan(torch.optim.Optimizer):
    """Adan with betas ``(b1, b2, b3)`` given as the reference does, e.g. (0.98, 0.92, 0.99).

    ``foreach`` (None or True, the default) updates all fp32 parameters of a group that share a
    device and a step count with multi-tensor ``torch._foreach_*`` kernels, in place; other
    parameters (fp16/bf16/fp64) take the per-parameter loop, which does the math in fp32.
    ``foreach=False`` uses that loop for every parameter: the reference implementation.
    Both keep the same state (``step`` int, ``m``, ``v``, ``n``, ``prev``), so their
    checkpoints are interchangeable. ``step(ok=...)`` (the gated update, see there) keeps the
    count as a device tensor and, on CUDA, runs one fused kernel per parameter tensor
    (``fused``: None uses it when our kernels build, False never) instead of the foreach passes.

    >>> p = torch.nn.Parameter(torch.ones(2)); adan = Adan([p], lr=0.1)
    >>> p.grad = torch.ones(2); adan.step(); p.detach().tolist()
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
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        if lr < 0 or eps < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError("invalid Adan hyper-parameters")
        super().__init__(
            params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        )
        # Attributes, not group keys: checkpoints' param_groups stay as they were.
        self.foreach = foreach
        self.fused = fused
        self.fused_steps = 0  # gated updates done by the fused CUDA kernel (for tests, benchmarks)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("foreach", None)  # optimizers pickled before the flags existed
        self.__dict__.setdefault("fused", None)
        self.__dict__.setdefault("fused_steps", 0)

    @torch.no_grad()
    def step(self, closure=None, ok: torch.Tensor | None = None):
        """One update. ``ok``: None, or a 0-d bool tensor on the parameters' device that
        decides on the device whether the update happens: where it is False, parameters,
        moments and step counts stay as they were (non-finite gradients are never read into
        them). A trainer can then step before it knows whether the loss was finite, with no
        host sync. Needs every parameter with a gradient to be dense fp32 (``can_gate``);
        step counts become 0-d device tensors."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if ok is not None and not self.can_gate():
            raise ValueError("Adan.step(ok=...) needs dense float32 parameters and gradients")
        clip = self._clip_factor()
        for group in self.param_groups:
            if ok is not None:
                self._step_gated(group, [p for p in group["params"] if p.grad is not None], clip, ok)
                continue
            fast, slow = [], []
            for p in group["params"]:
                if p.grad is not None:
                    (fast if self.foreach is not False and _foreach_ok(p) else slow).append(p)
            if fast:
                self._step_foreach(group, fast, clip)
            if slow:
                self._step_loop(group, slow, clip)
        return loss

    def can_gate(self) -> bool:
        """Whether ``step(ok=...)`` applies: every parameter with a gradient is dense fp32."""
        return all(_foreach_ok(p) for g in self.param_groups for p in g["params"] if p.grad is not None)

    def _clip_factor(self) -> torch.Tensor | float:
        """Global-norm clip factor, a device tensor (never read on the host: no sync)."""
        max_norm = self.defaults["max_grad_norm"]
        if max_norm <= 0:
            return 1.0
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return 1.0
        # One multi-tensor kernel for the per-parameter norms, in fp32 as the update is.
        norms = torch._foreach_norm([g if g.dtype == torch.float32 else g.float() for g in grads])
        total = torch.linalg.vector_norm(torch.stack(norms))
        return torch.clamp(max_norm / (total + 1e-6), max=1.0)

    def _step_loop(self, group: dict, params: list[torch.Tensor], clip: torch.Tensor | float) -> None:
        """Reference update, one parameter at a time (fp32 math, any parameter dtype)."""
        b1, b2, b3 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        for p in params:
            g = p.grad.float() * clip
            st = self.state[p]
            if not st:
                st.update(_new_state(g, g.clone()))
            st["step"] = int(st["step"]) + 1  # an int again after gated steps (tensor counts)
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

    def _step_foreach(self, group: dict, params: list[torch.Tensor], clip: torch.Tensor | float) -> None:
        """The same update for fp32 parameters, with one multi-tensor kernel per op, in place."""
        b1, b2, b3 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        # Bucket by device and step count so the bias corrections are plain scalars; usually
        # every parameter of a group has the same count and this is one bucket.
        buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            st = self.state[p]
            if not st:
                st.update(_new_state(p.grad, None))  # prev: set from the clipped gradient below
            st["step"] = int(st["step"]) + 1  # an int again after gated steps (tensor counts)
            buckets[(p.device, st["step"])].append(p)
        for (_, k), ps in buckets.items():
            states = [self.state[p] for p in ps]
            grads = [p.grad for p in ps]
            # Clipped gradients; unclipped ones are used as they are (only read below).
            g = torch._foreach_mul(grads, clip) if isinstance(clip, torch.Tensor) else grads
            for st, gi in zip(states, g):
                if st["prev"] is None:
                    st["prev"] = gi.clone()  # diff = 0 at the first step
            m, v, n, prev = ([st[key] for st in states] for key in ("m", "v", "n", "prev"))
            diff = torch._foreach_sub(g, prev)
            torch._foreach_lerp_(m, g, 1 - b1)  # b1 m + (1 - b1) g
            torch._foreach_lerp_(v, diff, 1 - b2)  # b2 v + (1 - b2) diff
            nest = torch._foreach_add(g, diff, alpha=b2)
            del diff
            torch._foreach_mul_(n, b3)
            torch._foreach_addcmul_(n, nest, nest, value=1 - b3)
            del nest
            torch._foreach_copy_(prev, g)
            denom = torch._foreach_div(n, 1 - b3**k)
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, eps)
            num = torch._foreach_div(m, 1 - b1**k)
            torch._foreach_add_(num, v, alpha=b2 / (1 - b2**k))
            torch._foreach_addcdiv_(ps, num, denom, value=-lr)
            if wd != 0:
                torch._foreach_div_(ps, 1 + lr * wd)

    def _step_gated(
        self, group: dict, params: list[torch.Tensor], clip: torch.Tensor | float, ok: torch.Tensor
    ) -> None:
        """The foreach update applied with weight ``ok`` (1 or 0) on the device: each moment
        moves by ``ok`` times its usual step, the step count by ``ok``; bias corrections use the
        device count. Equal to ``_step_foreach`` up to float rounding when ok is True."""
        b1, b2, b3 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        okf = ok.to(torch.float32)
        # Parameters that share a step count share one device tensor (usually one per group).
        shared: dict[tuple, torch.Tensor] = {}
        buckets: dict[int, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            st = self.state[p]
            if not st:
                st.update(_new_state(p.grad, torch.zeros_like(p.grad)))
            k = st["step"]
            # An int count (foreach/loop state) or one loaded off the device (torch keeps
            # optimizer "step" tensors on the CPU when loading) joins a shared device tensor.
            if not isinstance(k, torch.Tensor) or k.device != p.device:
                key = (p.device, int(k))
                if key not in shared:
                    shared[key] = torch.full((), float(k), device=p.device)
                st["step"] = shared[key]
            buckets[id(st["step"])].append(p)
        # A count shared with parameters that get no gradient this step splits off first.
        refs = Counter(
            id(st["step"]) for st in self.state.values() if isinstance(st.get("step"), torch.Tensor)
        )
        for sid, ps in buckets.items():
            states = [self.state[p] for p in ps]
            if refs[sid] != len(ps):
                own = states[0]["step"].clone()
                for st in states:
                    st["step"] = own
            k = states[0]["step"]
            k.add_(okf)
            if self._fused_for(ps):
                # One kernel per tensor (nerf/csrc/adan.cu): the same arithmetic, in one pass.
                ext = _kernels()
                c = clip.reshape(()).float() if isinstance(clip, torch.Tensor) else None
                for p, st in zip(ps, states):
                    ext.adan_step(
                        p,
                        p.grad.contiguous(),
                        st["m"],
                        st["v"],
                        st["n"],
                        st["prev"],
                        c,
                        ok,
                        k,
                        b1,
                        b2,
                        b3,
                        lr,
                        eps,
                        wd,
                    )
                self.fused_steps += 1
                continue
            kc = k.clamp(min=1)  # a count still at 0 only meets ok = 0 below
            # Sanitised, clipped gradients: a skipped step may carry inf/NaN, and 0 * inf = NaN.
            g = [torch.where(ok, p.grad * clip, 0.0) for p in ps]
            m, v, n, prev = ([st[key] for st in states] for key in ("m", "v", "n", "prev"))
            diff = torch._foreach_sub(g, prev)
            torch._foreach_mul_(diff, (k > 1).to(torch.float32))  # diff = 0 at the first applied step
            nest2 = torch._foreach_add(g, diff, alpha=b2)
            torch._foreach_mul_(nest2, nest2)  # squared in place: no second buffer
            for acc, target, w in ((m, g, 1 - b1), (v, diff, 1 - b2), (n, nest2, 1 - b3)):
                _move_toward_(acc, target, okf * w)
            del diff, nest2
            for pv, gi in zip(prev, g):
                torch.where(ok, gi, pv, out=pv)
            denom = torch._foreach_div(n, 1 - b3**kc)
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, eps)
            num = torch._foreach_div(m, 1 - b1**kc)
            t = torch._foreach_mul(v, b2 / (1 - b2**kc))
            torch._foreach_add_(num, t)
            torch._foreach_div_(num, denom)
            torch._foreach_mul_(num, okf * -lr)
            torch._foreach_add_(ps, num)
            if wd != 0:
                torch._foreach_div_(ps, 1 + okf * (lr * wd))

    def _fused_for(self, params: list[torch.Tensor]) -> bool:
        """Whether the fused CUDA kernel takes these (dense fp32 CUDA) parameters: ``fused``
        None uses it when the kernels build, True requires it, False never uses it."""
        if self.fused is False or not all(p.is_cuda and p.is_contiguous() for p in params):
            return False
        if _kernels() is None:
            if self.fused:
                raise RuntimeError("Adan(fused=True) needs the CUDA kernels, which are not available")
            return False
        return True


def _kernels():
    """Our CUDA extension (with ``adan_step``), built on first use, or None."""
    from cuda_kernels.build import load_kernels  # noqa: PLC0415 - only on GPUs

    return load_kernels()


def _move_toward_(acc: list[torch.Tensor], target: list[torch.Tensor], weight: torch.Tensor) -> None:
    """acc += weight * (target - acc), in place, with ``weight`` a 0-d device tensor (no host
    sync: the gated updates' lerp, whose weight is 0 on a skipped step)."""
    t = torch._foreach_sub(target, acc)
    torch._foreach_mul_(t, weight)
    torch._foreach_add_(acc, t)


def _new_state(like: torch.Tensor, prev: torch.Tensor | None) -> dict:
    """A parameter's first state: no steps, zero moments shaped (and typed) like ``like``."""
    return {
        "step": 0,
        "m": torch.zeros_like(like),
        "v": torch.zeros_like(like),
        "n": torch.zeros_like(like),
        "prev": prev,
    }


def _foreach_ok(p: torch.Tensor) -> bool:
    """The multi-tensor path updates dense fp32 parameters in place (fp32 state, fp32 math)."""
    return p.dtype == torch.float32 and p.grad.dtype == torch.float32 and not p.grad.is_sparse


def _by_device_dtype(
    dst: list[torch.Tensor], src: list[torch.Tensor]
) -> dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Pairs ``(dst[i], src[i])`` grouped by dst's device and dtype (one fast foreach launch per
    group); a src of another dtype or device is converted to match its dst."""
    groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = defaultdict(lambda: ([], []))
    for d, s in zip(dst, src):
        if s.dtype != d.dtype or s.device != d.device:
            s = s.detach().to(device=d.device, dtype=d.dtype)  # the only per-pair temporary
        ds, ss = groups[(d.device, d.dtype)]
        ds.append(d)
        ss.append(s)
    return groups


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
    def update(self, ok: torch.Tensor | None = None) -> None:
        """Move the average towards the weights; with ``ok`` (a 0-d bool device tensor) only
        where it is True, decided on the device."""
        for shadow, params in _by_device_dtype(self.shadow, self.params).values():
            if ok is None:
                torch._foreach_lerp_(shadow, params, 1 - self.decay)
                continue
            _move_toward_(shadow, params, ok.to(shadow[0].dtype) * (1 - self.decay))

    @torch.no_grad()
    def swap(self) -> None:
        if not self.params:
            return
        # In place on both sides (the optimizer and any holder of shadow keep their tensors);
        # copy_ semantics, so a shadow of another dtype/device still works.
        tmp = [torch.empty_like(p) for p in self.params]
        torch._foreach_copy_(tmp, self.params)
        torch._foreach_copy_(self.params, self.shadow)
        torch._foreach_copy_(self.shadow, tmp)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": list(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
