"""guidance/groupnorm.py: the VAE's GroupNorm (+ SiLU) op against torch's GroupNorm, its
fusion into a diffusers encoder, and (on a GPU) the CUDA kernels against the twin."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from guidance.groupnorm import GroupNormAct, fuse_group_norms, group_norm_act


def _reference(x, w, b, groups, silu):
    y = F.group_norm(x.float(), groups, w.float(), b.float(), 1e-6)
    return F.silu(y) if silu else y


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_twin_matches_group_norm_and_its_gradients(silu, channels_last):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 7) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    y, mean, rstd = group_norm_act(x, w, b, 4, 1e-6, silu)
    ref = _reference(x, w, b, 4, silu)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last  # keeps the layout
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, x.detach().reshape(2, 4, -1).mean(-1))
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.library.opcheck(group_norm_act, (x, w, b, 4, 1e-6, silu))


def test_module_takes_the_attention_blocks_three_dimensional_input():
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 30, 8).transpose(1, 2)  # [B, C, L] as the attention processor passes it
    torch.testing.assert_close(GroupNormAct(norm, False)(x), norm(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="affine"):
        GroupNormAct(torch.nn.GroupNorm(2, 8, affine=False), True)


def test_fused_encoder_gives_the_same_moments_and_input_gradient():
    """fuse_group_norms swaps every GroupNorm of a diffusers VAE encoder (SiLU folded in) and
    leaves its output and its gradient to the image unchanged."""
    from diffusers.models.autoencoders.vae import Encoder

    torch.manual_seed(0)
    enc = Encoder(
        down_block_types=("DownEncoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        double_z=True,
    ).eval()
    fused = copy.deepcopy(enc)
    assert fuse_group_norms(fused) == 2 * 2 + 5 + 1
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in fused.modules())  # none left bare
    assert sum(isinstance(m, GroupNormAct) for m in fused.modules()) == 10
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    ref, out = enc(x), fused(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(ref)
    torch.testing.assert_close(
        torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0], rtol=1e-4, atol=1e-5
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("unroll", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_kernels_match_the_twin(dtype, unroll):
    """The kernels on channels_last CUDA tensors against the twin (float32 arithmetic on the same
    rounded inputs) for the SD VAE encoder's shapes (and an odd pixel count), forward and the
    gradient to the input, with and without the SiLU; opcheck on the CUDA op."""
    from cuda_kernels.build import load_kernels

    if load_kernels() is None:
        pytest.skip("the CUDA kernels did not build")
    from guidance import groupnorm

    torch.manual_seed(0)
    # The SD VAE's shapes, an odd pixel count, and the built-in prior's first level (one channel
    # per group).
    shapes = [(1, 128, 512, 512), (1, 256, 64, 64), (2, 512, 16, 16), (2, 64, 7, 9), (1, 32, 64, 64)]
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[dtype]
    for shape in shapes:
        for silu in (False, True):
            x = (torch.randn(shape, device="cuda") * 2 + 0.5).to(dtype)
            x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
            w = torch.randn(shape[1], device="cuda", dtype=dtype)
            b = torch.randn(shape[1], device="cuda", dtype=dtype)
            assert groupnorm._use_kernel(x, 32)
            y, mean, rstd = group_norm_act(x, w, b, 32, 1e-6, silu, unroll)  # unroll: pixels/thread/iteration
            assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
            dy = torch.randn_like(y)
            (dx,) = torch.autograd.grad(y, x, dy)
            # The twin on the same (rounded) values, on the CPU.
            xc = x.detach().float().cpu().requires_grad_()
            ref = _reference(xc, w.cpu(), b.cpu(), 32, silu)
            (dref,) = torch.autograd.grad(ref, xc, dy.float().cpu())
            for got, want in ((y, ref), (dx, dref)):
                err = ((got.float().cpu() - want).abs().max() / want.abs().max()).item()
                assert err <= tol, (shape, silu, err)
            torch.testing.assert_close(
                mean.cpu(), xc.detach().reshape(shape[0], 32, -1).mean(-1), rtol=0, atol=1e-4
            )
        if shape[2] < 64:
            torch.library.opcheck(group_norm_act, (x, w, b, 32, 1e-6, True, unroll))
