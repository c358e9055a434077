"""SDS on a tiny random Stable Diffusion loaded through the real loading code."""

import pytest
import torch

from guidance.base import CAMERA_KEYS, Guidance, GuidanceConfig
from guidance.sd_utils import ModelNotFoundError, SDConfig, StableDiffusion, cfg
from guidance.views import BACK, FRONT, OVERHEAD, SIDE_OTHER, conditioning_prompts, view_embeddings


def _sd(path) -> StableDiffusion:
    return StableDiffusion(SDConfig(hf_key=str(path)), device="cpu")


@pytest.fixture()
def sd(tiny_sd, embed_cache):
    return _sd(tiny_sd)


def _expected_grad(sd, emb, latents, t, noise, scale, grad_scale):
    """The SDS gradient written out independently of sds_step."""
    a = sd.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    with torch.no_grad():
        eps = sd.unet(torch.cat([noisy] * 2), torch.cat([t] * 2), encoder_hidden_states=emb).sample
    eu, ec = eps.chunk(2)
    eps_hat = eu + scale * (ec - eu)
    return grad_scale * (1 - a) * (eps_hat - noise)


def test_sds_gradient_identity(sd):
    torch.manual_seed(0)
    B = 2
    emb = sd.get_text_embeds(["", "", "a red cube, front view", "a blue sphere, side view"])
    latents = torch.randn(B, 4, sd.latent_size, sd.latent_size, requires_grad=True)
    t = torch.tensor([100, 700])
    noise = torch.randn(B, 4, sd.latent_size, sd.latent_size)
    # Feed the latents directly (as_latent takes [B,4,H,W] in [0,1] -> *2-1 at latent size).
    pred = ((latents + 1) / 2).detach().requires_grad_(True)
    loss = sd.sds_step(emb, pred, guidance_scale=7.5, as_latent=True, grad_scale=0.5, t=t, noise=noise)
    loss.backward()
    expected = _expected_grad(sd, emb, pred.detach() * 2 - 1, t, noise, 7.5, 0.5)
    # d loss / d latents = grad / B, and latents = 2 * pred - 1.
    assert torch.allclose(pred.grad, 2 * expected / B, atol=1e-5, rtol=1e-4)
    assert torch.isclose(loss, 0.5 * (expected**2).sum() / B, rtol=1e-4)


def test_sds_through_the_vae_reaches_the_image_and_scales_with_gradscaler(sd):
    torch.manual_seed(0)
    emb = sd.get_text_embeds(["", "a red cube"])
    img = torch.rand(1, 3, 12, 12, requires_grad=True)
    t, noise = torch.tensor([500]), torch.randn(1, 4, sd.latent_size, sd.latent_size)
    torch.manual_seed(1)  # the VAE posterior sample
    sd.sds_step(emb, img, t=t, noise=noise).backward()
    g1 = img.grad.clone()
    assert g1.abs().sum() > 0
    img.grad = None
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    torch.manual_seed(1)
    scaler.scale(sd.sds_step(emb, img, t=t, noise=noise)).backward()
    assert torch.allclose(img.grad / 1024.0, g1, rtol=1e-4, atol=1e-8)
    for p in list(sd.unet.parameters()) + list(sd.vae.parameters()):
        assert p.grad is None  # the prior is frozen: no weight gradients are computed


def test_cfg_formula():
    u, c = torch.randn(3), torch.randn(3)
    assert torch.allclose(cfg(u, c, 100.0), u + 100.0 * (c - u))
    assert torch.allclose(cfg(u, c, 1.0), c)


def test_text_embeddings_are_cached_on_disk(tiny_sd, embed_cache):
    sd = _sd(tiny_sd)
    e1 = sd.get_text_embeds(["a red cube, front view"])
    assert len(list(embed_cache.glob("*.safetensors"))) == 1
    sd2 = _sd(tiny_sd)
    e2 = sd2.get_text_embeds(["a red cube, front view"])
    assert sd2._text is None  # served from the cache: the text encoder was never loaded
    assert torch.equal(e1, e2)
    assert e1.shape == (1, 77, 32)


def test_missing_model_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as e:
        _sd("nobody/no-such-model-xyz")
    msg = str(e.value)
    assert "\n" not in msg and "nobody/no-such-model-xyz" in msg and "huggingface-cli download" in msg
    with pytest.raises(ModelNotFoundError, match="could not be loaded"):
        _sd(tmp_path)  # an empty local folder
    missing = tmp_path / "no" / "such-folder"
    with pytest.raises(ModelNotFoundError) as e:
        _sd(str(missing))  # a mistyped local path: named as a folder, no download advice
    msg = str(e.value)
    assert f"no diffusers model folder at {missing}" in msg and "huggingface-cli" not in msg


def test_save_guidance_writes_a_preview(sd, tmp_path):
    emb = sd.get_text_embeds(["", "a red cube"])
    path = tmp_path / "g" / "step.png"
    sd.sds_step(emb, torch.rand(1, 3, 8, 8), save_guidance_path=path)
    from PIL import Image

    im = Image.open(path)
    assert im.size == (sd.image_size, 3 * sd.image_size)


def test_x0_preview_inverts_the_noising(sd):
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 4, 4)
    eps = torch.randn_like(x0)
    t = torch.tensor([10, 900])
    noisy = sd.scheduler.add_noise(x0, eps, t)
    assert torch.allclose(sd.predict_x0(noisy, eps, t), x0, atol=1e-4)


def _cameras(B: int) -> dict[str, torch.Tensor]:
    """A training batch's camera tensors (and a key the guidance ignores)."""
    g = torch.Generator().manual_seed(B)
    w = torch.rand(B, 5, generator=g)
    return {
        "polar": torch.full((B,), 60.0),
        "azimuth": torch.rand(B, generator=g) * 360 - 180,
        "radius": torch.full((B,), 2.0),
        "fovy": torch.full((B,), 40.0),
        "dir": torch.tensor([FRONT, BACK, OVERHEAD, SIDE_OTHER][:B]),
        "view_weights": w / w.sum(1, keepdim=True),
        "rays_o": torch.zeros(B, 4, 3),
    }


@pytest.mark.parametrize("policy", ["interp", "discrete", "none"])
@pytest.mark.parametrize("as_latent", [False, True])
def test_train_step_is_the_sds_step_on_the_view_embeddings(sd, policy, as_latent):
    """The Guidance protocol: prepare once, then train_step(renders, cameras) is the low-level
    SDS step on the policy's embeddings with the prepared guidance scale, bit for bit."""
    assert isinstance(sd, Guidance)
    cond = GuidanceConfig(text="a red cube", negative="blurry", view_prompt=policy, guidance_scale=7.5)
    sd.prepare(cond)
    assert sd._text is None  # the text encoder is freed
    names, prompts = conditioning_prompts(cond.text, cond.negative)
    emb = sd.get_text_embeds(prompts)
    assert set(sd.embeddings) == set(names)
    cams = _cameras(3)
    assert set(CAMERA_KEYS) <= set(cams)
    pred = torch.rand(3, 4 if as_latent else 3, 12, 12)
    grads = []
    for step in ("protocol", "low-level"):
        x = pred.clone().requires_grad_(True)
        torch.manual_seed(5)
        if step == "protocol":
            loss = sd.train_step(x, cams, as_latent=as_latent, grad_scale=0.5)
        else:
            E = {n: emb[i : i + 1] for i, n in enumerate(names)}
            text = view_embeddings(policy, E, cams)
            assert text.shape == (6, 77, emb.shape[-1])
            loss = sd.sds_step(text, x, guidance_scale=7.5, as_latent=as_latent, grad_scale=0.5)
        loss.backward()
        grads.append((loss.detach(), x.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_prepare_without_a_prompt_embeds_nothing(sd):
    sd.prepare(GuidanceConfig(text=None, guidance_scale=3.0))
    assert sd.embeddings == {} and sd.cond.guidance_scale == 3.0
    with pytest.raises(RuntimeError, match="prepare"):
        sd.train_step(torch.rand(1, 3, 8, 8), _cameras(1))
