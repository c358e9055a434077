"""Stable Diffusion as a score-distillation prior (``StableDiffusion.train_step``): the
reference computation (loading, text embeddings, the eager UNet, VAE encode and decode, the SDS
maths, the x0 preview) and the class that implements ``guidance.base.Guidance`` with it.

Self-contained: it scores images and knows nothing of NeRFs. Models load through
diffusers/transformers ``from_pretrained`` from the Hugging Face cache (offline once
cached), a hub id, or a local folder in diffusers' layout (``--hf_key``). The speed paths
(``guidance/sd_fast.py``: ``SDFast``) wrap the eager UNet call and VAE encoder defined here.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common.config import option
from common.files import atomic_write
from common.rng import forked_rng

from .base import GuidanceConfig, register
from .sd_fast import SDFast, SDSpeedConfig
from .views import conditioning_prompts, view_embeddings

MODEL_KEYS = {
    "2.1": "stabilityai/stable-diffusion-2-1-base",
    "2.0": "stabilityai/stable-diffusion-2-base",
    "1.5": "runwayml/stable-diffusion-v1-5",
    "builtin": str(Path(__file__).resolve().parent.parent / "pretrained" / "builtin"),
}


@dataclass(frozen=True)
class SDConfig:
    """Which Stable Diffusion model scores the renders, and how it saves memory."""

    sd_version: str = option(
        "2.1",
        "Stable Diffusion version (the *-base 512 px models), or the shipped built-in prior",
        choices=["1.5", "2.0", "2.1", "builtin"],
    )
    hf_key: str | None = option(None, "diffusers model: hub id or local folder (overrides --sd_version)")
    vram_O: bool = option(
        False, "save GPU memory in the guidance model (VAE slicing, attention slicing, channels_last)"
    )


class ModelNotFoundError(RuntimeError):
    """The diffusion model is neither cached, nor a local folder, nor downloadable."""


def cfg(noise_uncond: torch.Tensor, noise_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``eps_u + s * (eps_c - eps_u)``.

    >>> cfg(torch.tensor([1.0]), torch.tensor([2.0]), 100.0)
    tensor([101.])
    """
    return noise_uncond + scale * (noise_cond - noise_uncond)


def sds_loss(latents: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient with respect to ``latents`` [B,...] is ``grad / B``.

    ``0.5 * ||latents - stopgrad(latents - grad)||^2 / B``: its value ``0.5 ||grad||^2 / B``
    is the size of the SDS update (not a convergence signal). The reduction is in fp32, so
    the gradient survives fp16 autocast and a GradScaler multiplies it exactly.

    >>> x = torch.zeros(2, 3, requires_grad=True); sds_loss(x, torch.ones(2, 3)).backward()
    >>> x.grad.tolist()
    [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
    """
    latents = latents.float()
    target = (latents - grad.float()).detach()
    return 0.5 * F.mse_loss(latents, target, reduction="sum") / latents.shape[0]


def _load(cls, key: str, subfolder: str, **kwargs):
    """``cls.from_pretrained`` from the local cache first, the hub second, one clear error last."""
    local_dir = os.path.isdir(key)
    try:
        return cls.from_pretrained(key, subfolder=subfolder, local_files_only=True, **kwargs)
    except Exception as first:  # noqa: BLE001 - any failure here means "not available locally"
        if local_dir:
            raise ModelNotFoundError(
                f"{key}/{subfolder} could not be loaded ({type(first).__name__}: {str(first).splitlines()[0]})"
            ) from None
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise ModelNotFoundError(_missing_message(key)) from None
    try:
        return cls.from_pretrained(key, subfolder=subfolder, **kwargs)
    except Exception:  # noqa: BLE001 - network or repo errors all mean the same to the user
        raise ModelNotFoundError(_missing_message(key)) from None


def looks_like_path(key: str) -> bool:
    """A folder path, not a hub id ("org/name" has one slash and no leading "/", "." or "~").

    >>> looks_like_path("/data/sd21"), looks_like_path("./sd"), looks_like_path("org/name")
    (True, True, False)
    """
    return key.startswith(("/", ".", "~")) or key.count("/") > 1 or "\\" in key


def _missing_message(key: str) -> str:
    if looks_like_path(key):
        return f"no diffusers model folder at {key} (check --hf_key, or use --sd_version builtin)"
    return (
        f"diffusion model '{key}' is not in the Hugging Face cache and could not be downloaded; "
        f"on a machine with internet run `huggingface-cli download {key}` (then copy "
        f"~/.cache/huggingface), or pass --hf_key /path/to/a/diffusers/folder, "
        f"or use --sd_version builtin"
    )


def fingerprint(key: str) -> str:
    """Identity of the text encoder for the embedding cache: the folder and its weights'
    size and mtime for a local model, the cached snapshot (commit) for a hub id."""
    if os.path.isdir(key):
        parts = [os.path.abspath(key)]
        te = Path(key) / "text_encoder"
        for f in sorted(te.glob("*")) if te.is_dir() else []:
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
        return "|".join(parts)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(key, local_files_only=True, allow_patterns=["text_encoder/*"])
    except Exception:  # noqa: BLE001 - not cached: the key alone (embeddings computed anew)
        return key


# --- the reference computation ----------------------------------------------------------------
def model_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype of the UNet and VAE: bf16 or fp16 weights on a GPU with that precision, else fp32.

    >>> model_dtype("fp16", "cpu"), model_dtype("bf16", "cuda")
    (torch.float32, torch.bfloat16)
    """
    if torch.device(device).type != "cuda":
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def load_models(key: str, dtype: torch.dtype, device: torch.device, vram_O: bool = False):
    """(vae, unet, scheduler) of the diffusers model ``key``, frozen, in eval mode, on ``device``;
    ``vram_O`` saves memory (VAE slicing, attention slicing, channels_last UNet)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    vae = _load(AutoencoderKL, key, "vae", torch_dtype=dtype).to(device)
    unet = _load(UNet2DConditionModel, key, "unet", torch_dtype=dtype).to(device)
    scheduler = _load(DDIMScheduler, key, "scheduler")
    for m in (vae, unet):
        m.eval()
        m.requires_grad_(False)  # the prior is frozen: no weight gradients are ever needed
    if vram_O:
        vae.enable_slicing()
        unet.set_attention_slice(1)
        unet.to(memory_format=torch.channels_last)
    return vae, unet, scheduler


def unet_eager(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """The UNet's noise prediction [N,4,h,w] for latents ``x`` [N,4,h,w], timesteps ``t`` [N]
    and text embeddings ``emb`` [N,77,D]."""
    return unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]


def vae_moments(vae: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The encoder half of ``AutoencoderKL.encode``: mean and log-variance [B,8,h,w], stacked,
    of images ``x`` [B,3,H,W] in [-1,1]."""
    h = vae.encoder(x)
    return vae.quant_conv(h) if vae.quant_conv is not None else h


def sds_grad(
    eps_hat: torch.Tensor, noise: torch.Tensor, alphas_t: torch.Tensor, grad_scale: float
) -> torch.Tensor:
    """The SDS update of the latents [B,4,h,w]: ``grad_scale * (1 - alphas_cumprod[t]) *
    (eps_hat - eps)``, from the guided prediction ``eps_hat`` and the noise ``noise`` [B,4,h,w]
    and ``alphas_t`` = ``alphas_cumprod[t]`` [B]. Non-finite entries are kept (the reference
    zeroes them): the loss is then non-finite and the Trainer skips and counts the step.

    >>> sds_grad(torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor([0.75]), 2.0).item()
    0.5
    >>> sds_grad(torch.full((1, 1, 1, 1), float("nan")), torch.zeros(1, 1, 1, 1), torch.tensor([0.75]), 1.0).isnan().all()
    tensor(True)
    """
    w = (1 - alphas_t).view(-1, 1, 1, 1)
    return grad_scale * w * (eps_hat - noise.float())


def predict_x0(alphas_t: torch.Tensor, noisy: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """One-step clean-latent estimate ``(x_t - sqrt(1 - a_t) eps) / sqrt(a_t)`` of ``noisy``
    [B,4,h,w] with predicted noise ``eps`` [B,4,h,w], ``alphas_t`` = ``alphas_cumprod[t]`` [B].

    >>> predict_x0(torch.tensor([0.25]), torch.full((1, 1, 1, 1), 2.0), torch.zeros(1, 1, 1, 1)).item()
    4.0
    """
    a = alphas_t.view(-1, 1, 1, 1)
    return (noisy.float() - torch.sqrt(1 - a) * eps) / torch.sqrt(a)


def save_strip(rows: list[torch.Tensor], path: str | os.PathLike) -> None:
    """Write image batches ``rows`` (each [B,3,H,W] in [0,1]) as one PNG: a row per batch, the
    batch's images side by side (the ``--save_guidance`` preview: render, noisy, x0)."""
    from PIL import Image

    strip = torch.cat([torch.cat(list(p), -1) for p in rows], -2)
    arr = (strip.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


class StableDiffusion(torch.nn.Module):
    """A latent diffusion model used as a score-distillation prior (``guidance.base.Guidance``).

    ``prepare(cond)`` embeds the prompts once; ``train_step(pred_rgb, cameras)`` is the SDS loss
    of a batch of renders with the view-dependent embeddings of their cameras (``views``);
    ``sds_step`` is that step on given embeddings. The built-in prior is this class on the
    shipped weights (``--sd_version builtin``).

    Args:
        sd: which model (``sd_version``, ``hf_key``) and ``vram_O``.
        speed: the speed levers (``guidance/sd_fast.py``); CUDA only, ignored on a CPU.
        device: where the models run.
        precision: "fp16" or "bf16" load the UNet and VAE in that dtype (CUDA only), else fp32.
        t_range: fractions of the training timesteps that t is drawn from.
    """

    def __init__(
        self,
        sd: SDConfig,
        speed: SDSpeedConfig = SDSpeedConfig(),
        *,
        device: torch.device | str,
        precision: str = "fp32",
        t_range: tuple[float, float] = (0.02, 0.98),
    ):
        super().__init__()
        self.device = torch.device(device)
        self.key = sd.hf_key or MODEL_KEYS[sd.sd_version]
        self.dtype = model_dtype(precision, self.device)
        self.vae, self.unet, self.scheduler = load_models(self.key, self.dtype, self.device, sd.vram_O)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_size = int(self.unet.config.sample_size)
        self.image_size = self.latent_size * self.vae_scale_factor  # the model's native input
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.min_step = int(self.num_train_timesteps * t_range[0])
        self.max_step = int(self.num_train_timesteps * t_range[1])
        self.register_buffer(
            "alphas", self.scheduler.alphas_cumprod.to(self.device, torch.float32), persistent=False
        )
        self.cache_dir = Path.home() / ".cache" / "dreamfusion" / "text_embeds"
        self._text = None  # (tokenizer, text_encoder), loaded only when a prompt is not cached
        self.fast = SDFast(
            self.unet,
            self.vae,
            speed,
            reference_unet=unet_eager,
            reference_moments=vae_moments,
            model_id=functools.partial(fingerprint, self.key),
            device=self.device,
            dtype=self.dtype,
            precision=precision,
        )
        self.cond = GuidanceConfig()
        self.embeddings: dict[str, torch.Tensor] = {}  # [1,77,D] per name of views.conditioning_prompts

    # --- conditioning -------------------------------------------------------------------------
    def prepare(self, cond: GuidanceConfig) -> None:
        """Keep ``cond`` (guidance scale, view policy) and embed its prompts once: the negative
        prompt, the prompt and its view variants (``views.conditioning_prompts``), in one
        disk-cached ``get_text_embeds`` call; then free the text encoder. Without a prompt
        (``cond.text`` None) nothing is embedded."""
        self.cond = cond
        if cond.text is None:
            return
        names, prompts = conditioning_prompts(cond.text, cond.negative)
        # Loading a text encoder initialises weights from the global RNG: keep it out of the
        # training stream so a cached run and a fresh one draw the same random numbers.
        with forked_rng(self.device):
            embeds = self.get_text_embeds(prompts)
        self.embeddings = {n: embeds[i : i + 1] for i, n in enumerate(names)}
        self.release_text_encoder()

    def embeddings_for(self, cameras: dict[str, torch.Tensor]) -> torch.Tensor:
        """[2B,77,D] CFG embeddings of a batch of cameras under ``cond.view_prompt``
        (``views.view_embeddings``): the negative prompt for each view, then its prompt."""
        if not self.embeddings:
            raise RuntimeError("StableDiffusion.prepare(cond) with a text prompt must run first")
        return view_embeddings(self.cond.view_prompt, self.embeddings, cameras)

    def _text_models(self):
        if self._text is None:
            from transformers import CLIPTextModel, CLIPTokenizer

            tok = _load(CLIPTokenizer, self.key, "tokenizer")
            enc = _load(CLIPTextModel, self.key, "text_encoder").to(self.device).eval()
            self._text = (tok, enc)
        return self._text

    def release_text_encoder(self) -> None:
        """Free the text encoder once all prompts are embedded."""
        self._text = None

    @torch.no_grad()
    def get_text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """[B] prompts -> [B, 77, D] CLIP hidden states, cached on disk per model and prompt."""
        from safetensors.torch import load_file, save_file

        fp = fingerprint(self.key)
        out = []
        for p in prompts:
            h = hashlib.sha256(f"{fp}\n{p}".encode()).hexdigest()[:32]
            path = self.cache_dir / f"{h}.safetensors"
            emb = None
            if path.exists():
                try:
                    emb = load_file(str(path))["embeds"]
                except Exception:  # noqa: BLE001 - a corrupt cache entry is recomputed
                    emb = None
            if emb is None:
                tok, enc = self._text_models()
                ids = tok(
                    [p],
                    padding="max_length",
                    max_length=tok.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(self.device)
                emb = enc(ids)[0].float().cpu()
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                atomic_write(path, lambda tmp, emb=emb: save_file({"embeds": emb.contiguous()}, str(tmp)))
            out.append(emb)
        return torch.cat(out).to(self.device)

    # --- UNet and VAE ----------------------------------------------------------------------------
    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """UNet noise prediction for the CFG batch ``x`` [2B,4,h,w] (model dtype), ``t`` [2B],
        ``emb`` [2B,77,D]: the eager UNet under the caller's autocast, or the speed layer."""
        if not self.fast.on:
            return unet_eager(self.unet, x, t, emb)
        return self.fast.predict_noise(x, t, emb)

    def encode_imgs(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> [B,4,h,w] scaled latents (differentiable)."""
        x = (2 * imgs - 1).to(self.dtype)
        if self.fast.encodes(x):
            return self.fast.encode(x) * self.scaling_factor
        return self.vae.encode(x).latent_dist.sample() * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """[B,4,h,w] scaled latents -> [B,3,H,W] in [0,1]."""
        imgs = self.vae.decode((latents / self.scaling_factor).to(self.dtype)).sample
        return ((imgs.float() + 1) / 2).clamp(0, 1)

    # --- score distillation ---------------------------------------------------------------------
    def train_step(
        self,
        pred_rgb: torch.Tensor,
        cameras: dict[str, torch.Tensor],
        *,
        as_latent: bool = False,
        grad_scale: float = 1.0,
        save_guidance_path: str | os.PathLike | None = None,
    ) -> torch.Tensor:
        """The SDS loss of renders ``pred_rgb`` [B,3,H,W] in [0,1] (or [B,4,H,W] normal + mask
        with ``as_latent``) seen from ``cameras`` (a training batch: ``CAMERA_KEYS`` [B] each,
        other keys ignored), with the prepared embeddings and guidance scale (``prepare``)."""
        return self.sds_step(
            self.embeddings_for(cameras),
            pred_rgb,
            self.cond.guidance_scale,
            as_latent=as_latent,
            grad_scale=grad_scale,
            save_guidance_path=save_guidance_path,
        )

    def sds_step(
        self,
        text_embeddings: torch.Tensor,
        pred_rgb: torch.Tensor,
        guidance_scale: float = 100.0,
        as_latent: bool = False,
        grad_scale: float = 1.0,
        save_guidance_path: str | os.PathLike | None = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The SDS loss of a batch of renders on given text embeddings.

        Args:
            text_embeddings: [2B,77,D], the unconditional (negative) embeddings first.
            pred_rgb: [B,3,H,W] renders in [0,1], or [B,4,H,W] (normal + mask) with ``as_latent``.
            guidance_scale: classifier-free guidance scale s.
            grad_scale: lambda multiplying the SDS gradient.
            save_guidance_path: where to write the preview strip (render, noisy, x0 estimate).
            t, noise: [B] timesteps and [B,4,h,w] latent noise to use (drawn when None).

        Returns:
            A scalar loss whose gradient with respect to the latents is
            ``grad_scale * (1 - alphas_cumprod[t]) * (eps_hat - eps) / B``.
        """
        B = pred_rgb.shape[0]
        if as_latent:
            latents = (
                F.interpolate(pred_rgb, (self.latent_size,) * 2, mode="bilinear", align_corners=False) * 2 - 1
            )
        else:
            rgb = F.interpolate(pred_rgb, (self.image_size,) * 2, mode="bilinear", align_corners=False)
            latents = self.encode_imgs(rgb)
        if t is None:
            t = torch.randint(self.min_step, self.max_step + 1, (B,), dtype=torch.long, device=self.device)
        with torch.no_grad():
            if noise is None:
                noise = torch.randn_like(latents)
            noisy = self.scheduler.add_noise(latents.detach(), noise.to(latents.dtype), t)
            noise_pred = self.predict_noise(
                torch.cat([noisy] * 2).to(self.dtype), torch.cat([t] * 2), text_embeddings.to(self.dtype)
            )
            uncond, cond = noise_pred.float().chunk(2)
            eps_hat = cfg(uncond, cond, guidance_scale)
        grad = sds_grad(eps_hat, noise, self.alphas[t], grad_scale)
        if save_guidance_path is not None:
            self.save_guidance(pred_rgb, noisy, eps_hat, t, save_guidance_path)
        return sds_loss(latents, grad)

    @torch.no_grad()
    def predict_x0(self, noisy: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One-step clean-latent estimate of ``noisy`` [B,4,h,w] at timesteps ``t`` [B] (``predict_x0``)."""
        return predict_x0(self.alphas[t], noisy, eps)

    def save_guidance(
        self,
        pred_rgb: torch.Tensor,
        noisy: torch.Tensor,
        eps_hat: torch.Tensor,
        t: torch.Tensor,
        path: str | os.PathLike,
    ) -> None:
        """The ``--save_guidance`` preview: rows of the renders ``pred_rgb`` [B,>=3,H,W], the
        noisy latents ``noisy`` [B,4,h,w] decoded, and their x0 estimate from ``eps_hat``."""
        x0 = self.predict_x0(noisy, eps_hat, t)
        size = (self.image_size,) * 2
        rows = [
            F.interpolate(pred_rgb[:, :3].detach().float(), size, mode="bilinear", align_corners=False),
            self.decode_latents(noisy),
            self.decode_latents(x0),
        ]
        save_strip(rows, path)


def build_stable_diffusion(
    sd: SDConfig,
    speed: SDSpeedConfig,
    *,
    cond: GuidanceConfig,
    device: torch.device | str,
    precision: str = "fp32",
) -> StableDiffusion:
    """``--guidance SD``: Stable Diffusion (or the built-in prior) from its configs.

    Loading initialises weights from the global RNG before reading them: it runs in a forked
    stream so a run's random numbers do not depend on what is cached."""
    with forked_rng(device):
        return StableDiffusion(sd, speed, device=device, precision=precision, t_range=tuple(cond.t_range))


register("SD", (SDConfig, SDSpeedConfig), build_stable_diffusion)
