"""Triton kernels of ``nerf/fast/fused_mlp.py``: the field's 3-layer ReLU MLP and its density/albedo
head, forward and backward, one tile of rows per step with the weights held on chip.

Shapes (constexpr, powers of two): F_P >= the encoder width F, H hidden units, O = 16 head
columns (4 used: density logit and 3 albedo logits; tensor-core tiles need 16). Operands in
DT (fp16 or bf16), products accumulated in fp32, activations rounded to DT between layers: the
arithmetic of ``field._MLPHead``'s cuBLAS GEMMs.

Then the fd normals and shading of a merged field call (``fd_shade_*``), elementwise over the
samples, in fp32: the arithmetic of ``field._FDShade``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_w(W, R: tl.constexpr, C: tl.constexpr, r_real, c_real, DT: tl.constexpr):
    """An nn.Linear weight [r_real, c_real] (row-major) as an [R, C] tile in DT, zero-padded."""
    r = tl.arange(0, R)[:, None]
    c = tl.arange(0, C)[None, :]
    return tl.load(W + r * c_real + c, mask=(r < r_real) & (c < c_real), other=0.0).to(DT)


@triton.jit
def _load_wt(W, R: tl.constexpr, C: tl.constexpr, r_real, c_real, DT: tl.constexpr):
    """The transpose of an nn.Linear weight [c_real, r_real] as an [R, C] tile in DT."""
    r = tl.arange(0, R)[:, None]
    c = tl.arange(0, C)[None, :]
    return tl.load(W + c * r_real + r, mask=(r < r_real) & (c < c_real), other=0.0).to(DT)


@triton.jit
def _load_b(B, N: tl.constexpr, n_real, DT: tl.constexpr):
    """A bias [n_real] as fp32 values of DT (the GEMM epilogue adds the DT-rounded bias)."""
    i = tl.arange(0, N)
    return tl.load(B + i, mask=i < n_real, other=0.0).to(DT).to(tl.float32)


@triton.jit
def _tile_forward(X, sxr, sxc, rows, ok, F, w0t, b0, w1t, b1, w2t, b2, F_P: tl.constexpr, DT: tl.constexpr):
    """Rows [BM] of features X -> (x, h1, h2, out) in DT: ReLU hidden layers and the linear head."""
    fc = tl.arange(0, F_P)
    x = tl.load(X + rows[:, None] * sxr + fc[None, :] * sxc, mask=ok[:, None] & (fc[None, :] < F), other=0.0)
    x = x.to(DT)
    h1 = tl.maximum(tl.dot(x, w0t) + b0[None, :], 0.0).to(DT)
    h2 = tl.maximum(tl.dot(h1, w1t) + b1[None, :], 0.0).to(DT)
    out = (tl.dot(h2, w2t) + b2[None, :]).to(DT)
    return x, h1, h2, out


@triton.jit
def _logit(out, BLOB, rows, ok, bd, bk, O: tl.constexpr, BLOB_MODE: tl.constexpr):
    """The density logit [BM] fp32: head column 0 plus the density blob, read from BLOB [n]
    (BLOB_MODE 0) or computed from the points BLOB [n,3] as ``FieldNetwork.density_blob`` does:
    bd * exp(-|p|^2 / bk) (1; bk = 2 r^2) or bd * (1 - sqrt(|p|^2 + 1e-12) / bk) (2; bk = r)."""
    oc = tl.arange(0, O)
    if BLOB_MODE == 0:
        blob = tl.load(BLOB + rows, mask=ok, other=0.0)
    else:
        px = tl.load(BLOB + 3 * rows, mask=ok, other=0.0)
        py = tl.load(BLOB + 3 * rows + 1, mask=ok, other=0.0)
        pz = tl.load(BLOB + 3 * rows + 2, mask=ok, other=0.0)
        d = px * px + py * py + pz * pz
        if BLOB_MODE == 1:
            blob = bd * tl.exp(-d / bk)
        else:
            blob = bd * (1.0 - tl.sqrt(d + 1e-12) / bk)
    return tl.sum(tl.where(oc[None, :] == 0, out.to(tl.float32), 0.0), axis=1) + blob


@triton.jit
def _live_rows(rows, ok, LIVE, live_period, HAS_LIVE: tl.constexpr):
    """Which rows to compute: all of them, or (HAS_LIVE) rows r with r % live_period < *LIVE
    (the padding rows of a fixed-size CUDA graph replay are not)."""
    if HAS_LIVE:
        return ok & ((rows % live_period) < tl.load(LIVE))
    else:
        return ok


@triton.jit
def _any_live(live, HAS_LIVE: tl.constexpr):
    """Whether a tile has a live row; without HAS_LIVE a constant, so that the branch on it
    leaves the kernels' code as it was."""
    if HAS_LIVE:
        return tl.max(live.to(tl.int32), axis=0) > 0
    else:
        return True


@triton.jit
def head_forward_kernel(
    X, sxr, sxc, BLOB, W0, B0, W1, B1, W2, B2, SIGMA, ALB, n, F, LIVE, live_period, bd, bk,
    EXP: tl.constexpr, F_P: tl.constexpr, H: tl.constexpr, O: tl.constexpr, BM: tl.constexpr,
    DT: tl.constexpr, HAS_LIVE: tl.constexpr, BLOB_MODE: tl.constexpr,
):  # fmt: skip
    """sigma [n] fp32 (exp or softplus of the logit) and albedo [n,3] DT (sigmoid); zeros for
    rows that are not live."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    ok = rows < n
    live = _live_rows(rows, ok, LIVE, live_period, HAS_LIVE)
    oc = tl.arange(0, O)[None, :]
    alb_mask = ok[:, None] & (oc >= 1) & (oc < 4)
    if _any_live(live, HAS_LIVE):
        w0t = _load_wt(W0, F_P, H, F, H, DT)
        w1t = _load_wt(W1, H, H, H, H, DT)
        w2t = _load_wt(W2, H, O, H, 4, DT)
        b0, b1, b2 = _load_b(B0, H, H, DT), _load_b(B1, H, H, DT), _load_b(B2, O, 4, DT)
        _, _, _, out = _tile_forward(X, sxr, sxc, rows, live, F, w0t, b0, w1t, b1, w2t, b2, F_P, DT)
        logit = _logit(out, BLOB, rows, live, bd, bk, O, BLOB_MODE)
        if EXP:
            sigma = tl.exp(logit)
        else:  # F.softplus (beta 1, threshold 20)
            sigma = tl.where(logit > 20.0, logit, tl.log(1.0 + tl.exp(tl.minimum(logit, 20.0))))
        tl.store(SIGMA + rows, tl.where(live, sigma, 0.0), mask=ok)
        alb = tl.where(live[:, None], tl.sigmoid(out.to(tl.float32)), 0.0).to(DT)
        tl.store(ALB + rows[:, None] * 3 + (oc - 1), alb, mask=alb_mask)
    else:  # a tile of padding rows only
        tl.store(SIGMA + rows, tl.zeros([BM], dtype=tl.float32), mask=ok)
        tl.store(ALB + rows[:, None] * 3 + (oc - 1), tl.zeros([BM, O], dtype=DT), mask=alb_mask)


@triton.jit
def head_backward_kernel(
    X, sxr, sxc, BLOB, W0, B0, W1, B1, W2, B2, GSIG, GALB, GX, DW0, DB0, DW1, DB1, DW2, DB2,
    n, F, n_tiles, part_stride, LIVE, live_period, bd, bk,
    EXP: tl.constexpr, F_P: tl.constexpr, H: tl.constexpr, O: tl.constexpr, BM: tl.constexpr,
    DT: tl.constexpr, WANT_GX: tl.constexpr, HAS_LIVE: tl.constexpr, BLOB_MODE: tl.constexpr,
):  # fmt: skip
    """Gradients of the head's outputs -> the input gradient GX [n,F] and each program's partial
    sums of the weight gradients (fp32). Each program walks tiles pid, pid + P, ...,
    recomputing their forward (cheaper than storing the hidden activations of every row)."""
    pid = tl.program_id(0)
    hc = tl.arange(0, H)
    oc = tl.arange(0, O)
    fc = tl.arange(0, F_P)
    w0t = _load_wt(W0, F_P, H, F, H, DT)
    w1t = _load_wt(W1, H, H, H, H, DT)
    w2t = _load_wt(W2, H, O, H, 4, DT)
    w0 = _load_w(W0, H, F_P, H, F, DT)
    w1 = _load_w(W1, H, H, H, H, DT)
    w2 = _load_w(W2, O, H, 4, H, DT)
    b0, b1, b2 = _load_b(B0, H, H, DT), _load_b(B1, H, H, DT), _load_b(B2, O, 4, DT)
    dw0 = tl.zeros([H, F_P], dtype=tl.float32)
    dw1 = tl.zeros([H, H], dtype=tl.float32)
    dw2 = tl.zeros([O, H], dtype=tl.float32)
    db0 = tl.zeros([H], dtype=tl.float32)
    db1 = tl.zeros([H], dtype=tl.float32)
    db2 = tl.zeros([O], dtype=tl.float32)
    for t in range(pid, n_tiles, tl.num_programs(0)):
        rows = t * BM + tl.arange(0, BM)
        ok = rows < n
        live = _live_rows(rows, ok, LIVE, live_period, HAS_LIVE)
        msk = ok[:, None] & (fc[None, :] < F)
        if _any_live(live, HAS_LIVE):
            # Rows that are not live read zero gradients: they add nothing below.
            x, h1, h2, out = _tile_forward(X, sxr, sxc, rows, live, F, w0t, b0, w1t, b1, w2t, b2, F_P, DT)
            logit = _logit(out, BLOB, rows, live, bd, bk, O, BLOB_MODE)
            gs = tl.load(GSIG + rows, mask=live, other=0.0)
            if EXP:  # trunc_exp: the derivative is clamped at exp(15)
                gl = gs * tl.exp(tl.minimum(logit, 15.0))
            else:
                gl = gs * tl.sigmoid(logit)
            col = oc[None, :]
            ga = tl.load(
                GALB + rows[:, None] * 3 + (col - 1), mask=live[:, None] & (col >= 1) & (col < 4), other=0.0
            )
            a = tl.sigmoid(out.to(tl.float32)).to(DT).to(tl.float32)
            g = tl.where(col == 0, gl[:, None], ga.to(tl.float32) * (a * (1.0 - a))).to(DT)  # [BM,O]
            dw2 = tl.dot(tl.trans(g), h2, dw2)
            db2 += tl.sum(g.to(tl.float32), axis=0)
            g2 = tl.dot(g, w2).to(DT)
            g2 = tl.where(h2 > 0, g2, 0.0).to(DT)  # ReLU: the gradient passes where h2 > 0
            dw1 = tl.dot(tl.trans(g2), h1, dw1)
            db1 += tl.sum(g2.to(tl.float32), axis=0)
            g1 = tl.dot(g2, w1).to(DT)
            g1 = tl.where(h1 > 0, g1, 0.0).to(DT)
            dw0 = tl.dot(tl.trans(g1), x, dw0)
            db0 += tl.sum(g1.to(tl.float32), axis=0)
            if WANT_GX:
                gx = tl.dot(g1, w0)
                tl.store(GX + rows[:, None] * F + fc[None, :], gx.to(GX.dtype.element_ty), mask=msk)
        else:  # a tile of padding rows only: no gradient
            if WANT_GX:
                tl.store(
                    GX + rows[:, None] * F + fc[None, :],
                    tl.zeros([BM, F_P], dtype=GX.dtype.element_ty),
                    mask=msk,
                )
    # This program's partial sums, one row of the [programs, weights] buffer: summed by the
    # caller in a fixed order, so that the gradients do not depend on atomics' timing.
    part = pid * part_stride
    tl.store(DW0 + part + hc[:, None] * F + fc[None, :], dw0, mask=fc[None, :] < F)
    tl.store(DW1 + part + hc[:, None] * H + hc[None, :], dw1)
    tl.store(DW2 + part + oc[:, None] * H + hc[None, :], dw2, mask=oc[:, None] < 4)
    tl.store(DB0 + part + hc, db0)
    tl.store(DB1 + part + hc, db1)
    tl.store(DB2 + part + oc, db2, mask=oc < 4)


# Shadings of fd_shade kernels (network_base.SHADINGS order).
SHADING_IDS = {"albedo": 0, "lambertian": 1, "textureless": 2, "normal": 3}
ALBEDO, LAMBERTIAN, TEXTURELESS, NORMAL = (tl.constexpr(v) for v in SHADING_IDS.values())
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _fd_normal(SIG, i, ok, n, inv_2eps):
    """Central-difference density gradient d [3 x BLOCK] of samples i (their fd points follow
    the samples in SIG, offset-major: +x,+y,+z,-x,-y,-z), returned as its components; with
    v = -nan_to_num(d), the unit normal v / sqrt(max(|v|^2, 1e-20)) and what the backward needs."""
    dx = (tl.load(SIG + n + i, mask=ok, other=0.0) - tl.load(SIG + 4 * n + i, mask=ok, other=0.0)) * inv_2eps
    dy = (
        tl.load(SIG + 2 * n + i, mask=ok, other=0.0) - tl.load(SIG + 5 * n + i, mask=ok, other=0.0)
    ) * inv_2eps
    dz = (
        tl.load(SIG + 3 * n + i, mask=ok, other=0.0) - tl.load(SIG + 6 * n + i, mask=ok, other=0.0)
    ) * inv_2eps
    # nan_to_num: NaN -> 0, +-inf -> +-FLT_MAX
    vx = -tl.minimum(tl.maximum(tl.where(dx != dx, 0.0, dx), -_FLT_MAX), _FLT_MAX)
    vy = -tl.minimum(tl.maximum(tl.where(dy != dy, 0.0, dy), -_FLT_MAX), _FLT_MAX)
    vz = -tl.minimum(tl.maximum(tl.where(dz != dz, 0.0, dz), -_FLT_MAX), _FLT_MAX)
    sq = vx * vx + vy * vy + vz * vz
    den = tl.sqrt(tl.maximum(sq, 1e-20))
    return dx, dy, dz, vx / den, vy / den, vz / den, sq, den


@triton.jit
def _ambient(ratio, RATIO_PTR: tl.constexpr):
    """The ambient ratio: a number, or (RATIO_PTR) a pointer to a one-element tensor (CUDA graph
    replays take it as an input)."""
    if RATIO_PTR:
        return tl.load(ratio).to(tl.float32)
    else:
        return ratio


@triton.jit
def fd_shade_forward_kernel(
    SIG, ALB, L, l_stride, COLOR, NRM, n, inv_2eps, ratio, SHADING: tl.constexpr, BLOCK: tl.constexpr,
    RATIO_PTR: tl.constexpr,
):  # fmt: skip
    """Normals [n,3] fp32 and shaded colour [n,3] of n samples (``field._FDShade``)."""
    ratio = _ambient(ratio, RATIO_PTR)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    _, _, _, nx, ny, nz, _, _ = _fd_normal(SIG, i, ok, n, inv_2eps)
    tl.store(NRM + 3 * i, nx, mask=ok)
    tl.store(NRM + 3 * i + 1, ny, mask=ok)
    tl.store(NRM + 3 * i + 2, nz, mask=ok)
    ct = COLOR.dtype.element_ty
    if SHADING == NORMAL:
        tl.store(COLOR + 3 * i, ((nx + 1.0) / 2.0).to(ct), mask=ok)
        tl.store(COLOR + 3 * i + 1, ((ny + 1.0) / 2.0).to(ct), mask=ok)
        tl.store(COLOR + 3 * i + 2, ((nz + 1.0) / 2.0).to(ct), mask=ok)
    else:
        ar = tl.load(ALB + 3 * i, mask=ok, other=0.0).to(tl.float32)
        ag = tl.load(ALB + 3 * i + 1, mask=ok, other=0.0).to(tl.float32)
        ab = tl.load(ALB + 3 * i + 2, mask=ok, other=0.0).to(tl.float32)
        if SHADING == ALBEDO:
            lam = 1.0
        else:
            li = i * l_stride
            dot = (
                nx * tl.load(L + li, mask=ok, other=0.0)
                + ny * tl.load(L + li + 1, mask=ok, other=0.0)
                + nz * tl.load(L + li + 2, mask=ok, other=0.0)
            )
            lam = ratio + (1.0 - ratio) * tl.maximum(dot, 0.0)
            if SHADING == TEXTURELESS:
                ar, ag, ab = 1.0, 1.0, 1.0
        tl.store(COLOR + 3 * i, (ar * lam).to(ct), mask=ok)
        tl.store(COLOR + 3 * i + 1, (ag * lam).to(ct), mask=ok)
        tl.store(COLOR + 3 * i + 2, (ab * lam).to(ct), mask=ok)


@triton.jit
def fd_shade_backward_kernel(
    SIG, ALB, L, l_stride, GS, GC, GN, GSIG_ALL, GALB_ALL, n, inv_2eps, ratio,
    SHADING: tl.constexpr, WANT_GALB: tl.constexpr, BLOCK: tl.constexpr, RATIO_PTR: tl.constexpr,
):  # fmt: skip
    """Gradients of sigma [n], colour [n,3] and normal [n,3] -> of the merged call's densities
    [7n] and albedos [7n,3] (zero for the fd points), recomputing the forward."""
    ratio = _ambient(ratio, RATIO_PTR)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    dx, dy, dz, nx, ny, nz, sq, den = _fd_normal(SIG, i, ok, n, inv_2eps)
    gnx = tl.load(GN + 3 * i, mask=ok, other=0.0).to(tl.float32)
    gny = tl.load(GN + 3 * i + 1, mask=ok, other=0.0).to(tl.float32)
    gnz = tl.load(GN + 3 * i + 2, mask=ok, other=0.0).to(tl.float32)
    gr = tl.load(GC + 3 * i, mask=ok, other=0.0).to(tl.float32)
    gg = tl.load(GC + 3 * i + 1, mask=ok, other=0.0).to(tl.float32)
    gb = tl.load(GC + 3 * i + 2, mask=ok, other=0.0).to(tl.float32)
    lam = 1.0
    if SHADING == NORMAL:
        gnx += gr / 2.0
        gny += gg / 2.0
        gnz += gb / 2.0
    elif SHADING != ALBEDO:
        li = i * l_stride
        lx = tl.load(L + li, mask=ok, other=0.0)
        ly = tl.load(L + li + 1, mask=ok, other=0.0)
        lz = tl.load(L + li + 2, mask=ok, other=0.0)
        dot = nx * lx + ny * ly + nz * lz
        lam = ratio + (1.0 - ratio) * tl.maximum(dot, 0.0)
        if SHADING == LAMBERTIAN:
            ar = tl.load(ALB + 3 * i, mask=ok, other=0.0).to(tl.float32)
            ag = tl.load(ALB + 3 * i + 1, mask=ok, other=0.0).to(tl.float32)
            ab = tl.load(ALB + 3 * i + 2, mask=ok, other=0.0).to(tl.float32)
            g_lam = gr * ar + gg * ag + gb * ab
        else:
            g_lam = gr + gg + gb
        c = tl.where(dot > 0, g_lam * (1.0 - ratio), 0.0)
        gnx += c * lx
        gny += c * ly
        gnz += c * lz
    # n = v / sqrt(max(|v|^2, 1e-20)): where unclamped the radial part is projected out.
    radial = tl.where(sq >= 1e-20, nx * gnx + ny * gny + nz * gnz, 0.0)
    # v = -nan_to_num(d): no gradient where d is not finite; d = (s+ - s-) / (2 eps)
    hx = tl.where((dx == dx) & (tl.abs(dx) <= _FLT_MAX), -(gnx - radial * nx) / den, 0.0) * inv_2eps
    hy = tl.where((dy == dy) & (tl.abs(dy) <= _FLT_MAX), -(gny - radial * ny) / den, 0.0) * inv_2eps
    hz = tl.where((dz == dz) & (tl.abs(dz) <= _FLT_MAX), -(gnz - radial * nz) / den, 0.0) * inv_2eps
    tl.store(GSIG_ALL + i, tl.load(GS + i, mask=ok, other=0.0).to(tl.float32), mask=ok)
    tl.store(GSIG_ALL + n + i, hx, mask=ok)
    tl.store(GSIG_ALL + 2 * n + i, hy, mask=ok)
    tl.store(GSIG_ALL + 3 * n + i, hz, mask=ok)
    tl.store(GSIG_ALL + 4 * n + i, -hx, mask=ok)
    tl.store(GSIG_ALL + 5 * n + i, -hy, mask=ok)
    tl.store(GSIG_ALL + 6 * n + i, -hz, mask=ok)
    if WANT_GALB:
        at = GALB_ALL.dtype.element_ty
        zero = tl.zeros([BLOCK], dtype=at)
        if SHADING == ALBEDO or SHADING == LAMBERTIAN:
            tl.store(GALB_ALL + 3 * i, (gr * lam).to(at), mask=ok)
            tl.store(GALB_ALL + 3 * i + 1, (gg * lam).to(at), mask=ok)
            tl.store(GALB_ALL + 3 * i + 2, (gb * lam).to(at), mask=ok)
        else:  # the colour does not depend on the albedo
            tl.store(GALB_ALL + 3 * i, zero, mask=ok)
            tl.store(GALB_ALL + 3 * i + 1, zero, mask=ok)
            tl.store(GALB_ALL + 3 * i + 2, zero, mask=ok)
        for k in tl.static_range(1, 7):  # the fd points' albedos are unused
            tl.store(GALB_ALL + 3 * (k * n + i), zero, mask=ok)
            tl.store(GALB_ALL + 3 * (k * n + i) + 1, zero, mask=ok)
            tl.store(GALB_ALL + 3 * (k * n + i) + 2, zero, mask=ok)
