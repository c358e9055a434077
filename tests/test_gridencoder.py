"""The PyTorch hash-grid encoder (``gridencoder._torch_impl``) against a naive loop (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from gridencoder import GridEncoder
from gridencoder import _torch_impl as ge

PRIMES = (1, 2654435761, 805459861)


def naive_encode(x, emb, offsets, points, per_level_scale, base, align, interpolation):
    """One point, level and corner at a time, in Python floats and integers."""
    N, D = x.shape
    L, F = len(points), emb.shape[1]
    # Scales in float32 as the twin computes them (they decide which cell a point is in).
    levels = torch.arange(L, dtype=torch.float32)
    scales = (base * torch.pow(torch.tensor(per_level_scale), levels) - 1).tolist()
    out = torch.zeros(N, L * F, dtype=torch.float64)
    for n in range(N):
        for lv in range(L):
            s, P = scales[lv], points[lv]
            size, base_row = offsets[lv + 1] - offsets[lv], offsets[lv]
            pos = [x[n, i].item() * (math.ceil(s) if align else s) + (0 if align else 0.5) for i in range(D)]
            cell = [math.floor(p) for p in pos]
            frac = [p - c for p, c in zip(pos, cell)]
            if interpolation == "smoothstep":
                frac = [f * f * (3 - 2 * f) for f in frac]
            for corner in range(2**D):
                c = [min(cell[i] + ((corner >> i) & 1), P - 1) for i in range(D)]
                w = 1.0
                for i in range(D):
                    w *= frac[i] if (corner >> i) & 1 else 1 - frac[i]
                if P**D <= size:
                    row = sum(c[i] * P**i for i in range(D))
                else:
                    row = 0
                    for i in range(D):
                        row ^= (c[i] * PRIMES[i]) & 0xFFFFFFFF
                row = row % size + base_row
                out[n, lv * F : (lv + 1) * F] += w * emb[row].double()
    return out


@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("interpolation", ["linear", "smoothstep"])
def test_twin_matches_naive_loop(align, interpolation):
    g = torch.Generator().manual_seed(0)
    # log2 size 9: the coarse levels are dense, the fine ones hashed.
    offsets, points = ge.level_layout(3, 4, 2.0, 4, 9, align)
    assert any(p**3 > offsets[i + 1] - offsets[i] for i, p in enumerate(points))
    assert points[0] ** 3 <= offsets[1]
    emb = torch.randn(offsets[-1], 2, generator=g, dtype=torch.float64)
    x = torch.rand(7, 3, generator=g, dtype=torch.float64)
    got = ge.grid_encode(x, emb, offsets, points, 2.0, 4, align, interpolation)
    ref = naive_encode(x, emb, offsets, points, 2.0, 4, align, interpolation)
    assert torch.allclose(got, ref, atol=1e-10)


def test_twin_with_a_hashed_table_that_is_not_a_power_of_two():
    """Hand-made layouts may give a hashed level any table size: the index is then taken
    modulo the size (the int64 path) and still matches the naive loop."""
    g = torch.Generator().manual_seed(1)
    offsets, points = ge.level_layout(3, 3, 2.0, 4, 9)
    offsets = offsets[:-1] + [offsets[-2] + 24]  # the hashed last level: 24 rows
    assert points[-1] ** 3 > 24
    emb = torch.randn(offsets[-1], 2, generator=g, dtype=torch.float64)
    x = torch.rand(9, 3, generator=g, dtype=torch.float64)
    got = ge.grid_encode(x, emb, offsets, points, 2.0, 4, False, "linear")
    ref = naive_encode(x, emb, offsets, points, 2.0, 4, False, "linear")
    assert torch.allclose(got, ref, atol=1e-12)


def test_twin_float32_matches_float64():
    g = torch.Generator().manual_seed(1)
    offsets, points = ge.level_layout(3, 6, 1.5, 8, 12)
    emb = torch.randn(offsets[-1], 2, generator=g)
    x = torch.rand(50, 3, generator=g)
    a = ge.grid_encode(x, emb, offsets, points, 1.5, 8, interpolation="smoothstep")
    b = ge.grid_encode(x.double(), emb.double(), offsets, points, 1.5, 8, interpolation="smoothstep")
    assert a.dtype == torch.float32
    assert torch.allclose(a.double(), b, atol=1e-5)


@pytest.mark.parametrize("interpolation", ["linear", "smoothstep"])
def test_gradcheck_embeddings_and_inputs(interpolation):
    g = torch.Generator().manual_seed(2)
    offsets, points = ge.level_layout(3, 3, 2.0, 2, 6)
    emb = torch.randn(offsets[-1], 2, generator=g, dtype=torch.float64).requires_grad_()
    # Away from the borders: the clamp to the last lattice point is not differentiable.
    x = (torch.rand(4, 3, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()

    def fn(e, xx):
        return ge.grid_encode(xx, e, offsets, points, 2.0, 2, False, interpolation)

    assert torch.autograd.gradcheck(fn, (emb, x))


def test_max_level_zeroes_levels_and_their_gradients():
    g = torch.Generator().manual_seed(3)
    offsets, points = ge.level_layout(3, 4, 2.0, 4, 10)
    emb = torch.randn(offsets[-1], 2, generator=g).requires_grad_()
    x = torch.rand(20, 3, generator=g)
    full = ge.grid_encode(x, emb, offsets, points, 2.0, 4)
    out = ge.grid_encode(x, emb, offsets, points, 2.0, 4, max_level=2)
    assert torch.equal(out[:, :4], full[:, :4])
    assert (out[:, 4:] == 0).all()
    out.sum().backward()
    assert (emb.grad[offsets[2] :] == 0).all() and emb.grad[: offsets[2]].abs().sum() > 0


def test_module_shapes_and_layout():
    enc = GridEncoder(
        num_levels=4, level_dim=2, base_resolution=4, log2_hashmap_size=10, desired_resolution=32
    )
    assert enc.per_level_scale == pytest.approx(2.0)
    y = enc(torch.rand(2, 5, 3) * 2 - 1)
    assert y.shape == (2, 5, 8)
    assert enc.offsets[-1] == enc.embeddings.shape[0]
    assert all(o % 8 == 0 for o in enc.offsets)


def test_public_encode_and_cuda_take_the_twins_arguments(monkeypatch):
    """``gridencoder.grid_encode`` and ``_cuda.grid_encode`` have the twin's one signature; a GPU
    input's call reaches the CUDA side with the CUDA-only options by name (here: a stand-in
    that declines, so the twin runs, ignoring them)."""
    import inspect
    import types

    import gridencoder
    from cuda_kernels.backend import takes_args_of
    from gridencoder import _cuda as gc

    twin = inspect.signature(ge.grid_encode)
    assert inspect.signature(gridencoder.grid_encode) == twin == inspect.signature(gc.grid_encode)
    offsets, points = ge.level_layout(3, 2, 2.0, 4, 19)
    emb = torch.randn(offsets[-1], 2)
    x = torch.rand(5, 3)
    assert gc.grid_encode(x, emb, offsets, points, 2.0, 4) is NotImplemented  # CPU tensors

    seen = []

    @takes_args_of(ge.grid_encode)
    def kernel(a):
        seen.append((a.interpolation, a.max_level, a.out_dtype, a.live, a.agg_mode, a.soa))
        return NotImplemented

    class OnGpu(torch.Tensor):
        is_cuda = property(lambda self: True)

    monkeypatch.setattr(gridencoder._backend, "_module", types.SimpleNamespace(grid_encode=kernel))
    out = gridencoder.grid_encode(x.as_subclass(OnGpu), emb, offsets, points, 2.0, 4, agg_mode=0, soa=False)
    assert torch.equal(out, ge.grid_encode(x, emb, offsets, points, 2.0, 4))
    assert seen == [("linear", None, None, None, 0, False)]
