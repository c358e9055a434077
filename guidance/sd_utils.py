"""Stable Diffusion as a score-distillation prior (``StableDiffusion.train_step``).

Self-contained: it scores images and knows nothing of NeRFs. Models load through
diffusers/transformers ``from_pretrained`` from the Hugging Face cache (offline once
cached), a hub id, or a local folder in diffusers' layout (``--hf_key``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common.config import option
from common.files import atomic_write

from .base import GuidanceConfig, register
from .sd_fast import SDSpeedConfig

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


def _missing_message(key: str) -> str:
    return (
        f"diffusion model '{key}' is not in the Hugging Face cache and could not be downloaded; "
        f"on a machine with internet run `huggingface-cli download {key}` (then copy "
        f"~/.cache/huggingface), or pass --hf_key /path/to/a/diffusers/folder, "
        f"or use --sd_version builtin"
    )


def _fingerprint(key: str) -> str:
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


# --- speed paths -----------------------------------------------------------------------------------
UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
MAX_GRAPHS = 4  # CUDA graphs kept per model (one per input signature); beyond that: eager
_warned: set[str] = set()


def warn_once(msg: str) -> None:
    """One line on stderr, once per message (fallbacks must be visible but not spam the log)."""
    if msg not in _warned:
        _warned.add(msg)
        print(f"[speed] {msg}", file=sys.stderr, flush=True)


def signature(*tensors: torch.Tensor) -> tuple:
    """What a captured graph or an ahead-of-time compiled UNet is specialised to."""
    return tuple(
        (tuple(x.shape), str(x.dtype), x.is_contiguous(memory_format=torch.channels_last)) for x in tensors
    )


def traced_key(model: str, dtype: torch.dtype, sig: tuple, device_name: str) -> str:
    """File stem of a traced UNet: model identity, dtype, input shapes, torch and GPU."""
    text = json.dumps([model, str(dtype), [list(map(str, s)) for s in sig], torch.__version__, device_name])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def bind_live_weights(runner, unet: torch.nn.Module) -> None:
    """Point an AOTInductor runner compiled without its weights (trace.py's artifacts) at the
    live UNet's tensors: no second copy of the weights on the GPU, and nothing to go stale."""
    state = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    fqns = runner.get_constant_fqns()
    runner.load_constants({k: state[k] for k in fqns}, check_full_update=True, user_managed=True)


def fuse_qkv(unet: torch.nn.Module) -> bool:
    """One GEMM for q, k and v of each self-attention and for k and v of each cross-attention
    (diffusers' ``fuse_qkv_projections``): the same products on concatenated weights, fewer and
    larger GEMMs. The unfused projections that no longer run are dropped, so the weights are not
    held twice. False (with a warning) where diffusers cannot fuse this UNet."""
    try:
        unet.fuse_qkv_projections()
    except Exception as e:  # noqa: BLE001 - an experimental diffusers API: run unfused, say so
        warn_once(f"fusing the UNet's q/k/v projections failed ({type(e).__name__}: {e}); running unfused")
        return False
    from diffusers.models.attention_processor import Attention

    for m in unet.modules():
        if isinstance(m, Attention) and m.fused_projections:
            # Self-attention runs to_qkv; cross-attention runs to_q on the image and to_kv on the text.
            for name in ("to_k", "to_v") if m.is_cross_attention else ("to_q", "to_k", "to_v"):
                delattr(m, name)
    unet.requires_grad_(False)  # the fused layers are new parameters
    return True


def default_traced_dir() -> Path:
    return Path.home() / ".cache" / "dreamfusion" / "unet_traced"


class CudaGraphed:
    """A fixed-shape function replayed from a CUDA graph: static input buffers, captured once.

    The returned tensor is the graph's static output: it is overwritten by the next replay,
    so callers consume it before calling again (the SDS step does).
    """

    def __init__(self, fn: UNetFn, example: tuple[torch.Tensor, ...], warmup: int = 3):
        self.static_in = [x.detach().clone() for x in example]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):  # cuDNN/cuBLAS autotuning and lazy init stay out of the graph
                fn(*self.static_in)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.static_out = fn(*self.static_in)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        for buf, x in zip(self.static_in, args):
            buf.copy_(x)
        self.graph.replay()
        return self.static_out


class StableDiffusion(torch.nn.Module):
    """A latent diffusion model used as a score-distillation prior.

    Args:
        device: where the models run.
        fp16: load UNet and VAE in float16 (CUDA only).
        vram_O: save memory (VAE slicing, attention slicing, channels_last).
        sd_version: "2.1", "2.0", "1.5" or "builtin"; ``hf_key`` overrides it.
        hf_key: hub id or local folder in diffusers' layout.
        t_range: fractions of the training timesteps that t is drawn from.
        cache_dir: where text embeddings are cached (default ~/.cache/dreamfusion/text_embeds).

    Speed levers (CUDA only; any of them runs the prior in its own dtype with autocast off):
        bf16: bfloat16 weights instead of float16 (with ``fp16`` or alone).
        unet_graph: replay the UNet CFG call from a CUDA graph, one per input signature.
        vae_graph: replay the VAE encoder's forward and backward from CUDA graphs.
        channels_last: UNet weights and inputs in channels_last.
        vae_channels_last: VAE encoder weights and inputs in channels_last on the fast encoder
            path (``vae_graph``/``compile_vae``), so that cuDNN needs no NCHW<->NHWC conversions.
        vae_fused_gn: on the fast encoder path, the encoder's GroupNorms (with the SiLU after
            each) run as our CUDA kernels (``guidance/groupnorm.py``) on channels_last
            activations (implies ``vae_channels_last``).
        unet_fused_qkv: one GEMM for the q/k/v projections of each UNet attention (``fuse_qkv``).
        compile_unet: ``torch.compile`` the UNet (CUDA only; the first call compiles for about a
            minute, or seconds from torch's compile cache); a compiler failure runs it eager.
        compile_vae: ``torch.compile`` the VAE encoder (fuses its GroupNorm + SiLU pairs; the
            first call with gradients compiles for about half a minute); with ``vae_graph`` the
            compiled forward and backward are replayed from CUDA graphs. If compilation fails
            the encoder runs eager with a one-line warning.
        unet_traced: "auto" loads a UNet compiled by ``trace.py`` from ``traced_dir`` when one
            matches the model, dtype and input shapes; a path loads that one; None: never.
            A mismatch falls back to eager with a one-line warning.
    """

    def __init__(
        self,
        device: torch.device | str,
        fp16: bool = False,
        vram_O: bool = False,
        sd_version: str = "2.1",
        hf_key: str | None = None,
        t_range: tuple[float, float] = (0.02, 0.98),
        cache_dir: str | os.PathLike | None = None,
        *,
        bf16: bool = False,
        unet_graph: bool = False,
        vae_graph: bool = False,
        channels_last: bool = False,
        vae_channels_last: bool = False,
        vae_fused_gn: bool = False,
        unet_fused_qkv: bool = False,
        compile_unet: bool = False,
        compile_vae: bool = False,
        unet_traced: str | os.PathLike | None = None,
        traced_dir: str | os.PathLike | None = None,
    ):
        super().__init__()
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        self.device = torch.device(device)
        self.key = hf_key or MODEL_KEYS[sd_version]
        cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if bf16 and cuda else torch.float16 if fp16 and cuda else torch.float32
        self.vae = _load(AutoencoderKL, self.key, "vae", torch_dtype=self.dtype).to(self.device)
        self.unet = _load(UNet2DConditionModel, self.key, "unet", torch_dtype=self.dtype).to(self.device)
        self.scheduler = _load(DDIMScheduler, self.key, "scheduler")
        for m in (self.vae, self.unet):
            m.eval()
            m.requires_grad_(False)  # the prior is frozen: no weight gradients are ever needed
        if vram_O:
            self.vae.enable_slicing()
            self.unet.set_attention_slice(1)
            self.unet.to(memory_format=torch.channels_last)
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
        self.cache_dir = Path(cache_dir or Path.home() / ".cache" / "dreamfusion" / "text_embeds")
        self._text = None  # (tokenizer, text_encoder), loaded only when a prompt is not cached

        # Speed paths. Graphs and traced artifacts need CUDA; on a CPU they are ignored.
        self.unet_graph = unet_graph and cuda
        self.vae_graph = vae_graph and cuda
        self.compile_vae = compile_vae and cuda
        self.compile_unet = compile_unet and cuda
        if self.vae_graph or self.compile_vae:
            # The VAE's mid-block attention has one 512-wide head over 64x64 tokens: too wide for
            # flash attention, and the memory-efficient kernel's backward took 6.4 ms of every
            # step on the H100. Plain matmul + softmax (a 4096^2 fp16 matrix, 32 MiB) takes a
            # fraction of that, with the same gradient.
            from diffusers.models.attention_processor import AttnProcessor

            self.vae.set_attn_processor(AttnProcessor())
        fast_vae = self.vae_graph or self.compile_vae
        self.vae_fused_gn = False
        if vae_fused_gn and fast_vae:
            from .groupnorm import fuse_group_norms, kernels

            # Without our kernels (no CUDA compiler) the op would run its slower PyTorch twin
            # inside the compiled encoder: keep Inductor's own GroupNorm kernels then.
            self.vae_fused_gn = kernels() is not None
            if self.vae_fused_gn:
                fuse_group_norms(self.vae.encoder)
        self.vae_channels_last = (vae_channels_last or self.vae_fused_gn) and fast_vae
        if self.vae_channels_last:
            self.vae.encoder.to(memory_format=torch.channels_last)
            if self.vae.quant_conv is not None:
                self.vae.quant_conv.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        # Before any compile or graph capture: they would hold the unfused modules.
        self.unet_fused_qkv = unet_fused_qkv and fuse_qkv(self.unet)
        self.unet_traced = None if unet_traced in (None, "", "off") or not cuda else str(unet_traced)
        self.traced_dir = Path(traced_dir) if traced_dir else default_traced_dir()
        # (The fused q/k/v projections change modules, not the call path: not a lever here.)
        levers = (self.unet_graph, self.vae_graph, self.compile_vae, self.compile_unet, channels_last, bf16)
        self.fast = any(levers) or self.unet_traced is not None
        if channels_last and not vram_O:
            self.unet.to(memory_format=torch.channels_last)
        self._unet_fn: UNetFn = self._unet_eager
        if self.compile_unet:
            self._unet_fn = torch.compile(self._unet_eager)
        self._graphs: dict[tuple, CudaGraphed] = {}
        self._traced: dict[tuple, UNetFn | None] = {}  # per input signature: the artifact or None
        self._vae_graphs: dict[tuple, Callable] = {}
        self._device_name = torch.cuda.get_device_name(self.device) if cuda else "cpu"

    # --- text --------------------------------------------------------------------------------
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

        fp = _fingerprint(self.key)
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

    # --- UNet ------------------------------------------------------------------------------------
    def _unet_eager(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]

    def traced_key_for(self, sig: tuple) -> str:
        """``traced_key`` of this model (with its q/k/v fusion: other weight names) for inputs ``sig``."""
        model = _fingerprint(self.key) + ("+fused_qkv" if self.unet_fused_qkv else "")
        return traced_key(model, self.dtype, sig, self._device_name)

    def _traced_for(self, sig: tuple) -> UNetFn | None:
        """The ahead-of-time compiled UNet for this input signature, loaded once, or None."""
        if sig in self._traced:
            return self._traced[sig]
        fn = None
        key = self.traced_key_for(sig)
        src = self.unet_traced
        if src == "auto":
            meta = self.traced_dir / f"{key}.json"
            if meta.exists():
                fn = self._load_traced(meta)
            elif any(self.traced_dir.glob("*.json")):
                warn_once(f"no traced UNet in {self.traced_dir} matches inputs {sig}; running eager")
        else:
            meta = Path(src).with_suffix(".json")
            info = json.loads(meta.read_text()) if meta.exists() else {}
            if info.get("key") == key:
                fn = self._load_traced(meta)
            else:
                warn_once(
                    f"traced UNet {src} does not match this model/dtype/inputs {sig} "
                    f"(it was made for {info.get('inputs', '?')} {info.get('dtype', '?')}); running eager"
                )
        self._traced[sig] = fn
        return fn

    def _load_traced(self, meta: Path) -> UNetFn | None:
        info = json.loads(meta.read_text())
        package = meta.with_name(info["package"])
        try:
            from torch._inductor import aoti_load_package

            runner = aoti_load_package(str(package))
            if not info.get("constants_in_package", True):
                bind_live_weights(runner, self.unet)
        except Exception as e:  # noqa: BLE001 - a broken artifact must not stop a run
            warn_once(f"traced UNet {package} could not be loaded ({type(e).__name__}: {e}); running eager")
            return None
        print(f"[speed] using traced UNet {package}", flush=True)
        return lambda x, t, emb: runner(x, t, emb)

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """UNet noise prediction for the CFG batch ``x`` [2B,4,h,w] (model dtype), through the
        fastest enabled path for its signature: traced, compiled, CUDA graph, or eager."""
        if not self.fast:
            return self._unet_eager(x, t, emb)  # the reference's computation, under the caller's autocast
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        sig = signature(x, t, emb)
        fn = self._unet_fn
        if self.unet_traced is not None:
            fn = self._traced_for(sig) or fn
        with torch.autocast(self.device.type, enabled=False):
            if not self.unet_graph:
                return fn(x, t, emb)
            graph = self._graphs.get(sig)
            if graph is None:
                if len(self._graphs) >= MAX_GRAPHS:
                    warn_once(f"{MAX_GRAPHS} UNet CUDA graphs captured already; inputs {sig} run eager")
                    return fn(x, t, emb)
                graph = self._graphs[sig] = self._capture_unet(fn, (x, t, emb))
            return graph(x, t, emb)

    def _capture_unet(self, fn: UNetFn, args: tuple) -> CudaGraphed:
        """A CUDA graph of ``fn``; when ``fn`` is the compiled UNet its first call compiles
        (said once), and a compiler failure falls back to the eager UNet."""
        if fn is not self._unet_fn or not self.compile_unet:
            return CudaGraphed(fn, args)
        warn_once(
            "compiling the UNet (--compile_unet): about a minute on first use, seconds once "
            "torch's compile cache holds it"
        )
        try:
            return CudaGraphed(fn, args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: run eager, say so once
            warn_once(f"torch.compile of the UNet failed ({type(e).__name__}); running it eager")
            self.compile_unet = False
            self._unet_fn = self._unet_eager
            return CudaGraphed(self._unet_eager, args)

    # --- images <-> latents ----------------------------------------------------------------------
    def _vae_moments(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder half of ``AutoencoderKL.encode``: mean and log-variance, stacked."""
        h = self.vae.encoder(x)
        return self.vae.quant_conv(h) if self.vae.quant_conv is not None else h

    def encode_imgs(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> [B,4,h,w] scaled latents (differentiable)."""
        x = (2 * imgs - 1).to(self.dtype)
        if not ((self.vae_graph or self.compile_vae) and x.requires_grad and torch.is_grad_enabled()):
            posterior = self.vae.encode(x).latent_dist
            return posterior.sample() * self.scaling_factor
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        with torch.autocast(self.device.type, enabled=False):
            moments = self._fast_moments(x)
        # Sampled outside the graph, as diffusers does, so the same RNG stream gives the same latents.
        return DiagonalGaussianDistribution(moments).sample() * self.scaling_factor

    def _fast_moments(self, x: torch.Tensor) -> torch.Tensor:
        """``_vae_moments`` through the enabled levers (compiled and/or graphed), one per signature."""
        if self.vae_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        sig = signature(x)
        fn = self._vae_graphs.get(sig)
        if fn is None:
            if self.vae_graph and len(self._vae_graphs) >= MAX_GRAPHS:
                warn_once(f"{MAX_GRAPHS} VAE CUDA graphs captured already; inputs {sig} run eager")
                return self._vae_moments(x)
            # Inductor keeps this graph's activations channels_last only when forced: its
            # heuristic declines (the 3-channel input conv), and cuDNN then converted NCHW<->NHWC
            # around every convolution (VAE forward + backward 11.1 -> 9.1 ms per step on the H100).
            base = (
                torch.compile(self._vae_moments, dynamic=False, options={"force_layout_optimization": True})
                if self.compile_vae
                else self._vae_moments
            )
            try:
                fn = self._wrap_vae(base, x)
            except Exception as e:  # noqa: BLE001 - any compiler failure: run eager, say so once
                if not self.compile_vae:
                    raise
                warn_once(f"torch.compile of the VAE encoder failed ({type(e).__name__}); running it eager")
                self.compile_vae = False
                fn = self._wrap_vae(self._vae_moments, x)
            self._vae_graphs[sig] = fn
        return fn(x)

    def _wrap_vae(self, base: Callable, x: torch.Tensor) -> Callable:
        if not self.vae_graph:
            base(x.detach().clone().requires_grad_(True)).sum().backward()  # compile now, not mid-step
            return base
        example = x.detach().clone().requires_grad_(True)
        return torch.cuda.make_graphed_callables(base, (example,))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """[B,4,h,w] scaled latents -> [B,3,H,W] in [0,1]."""
        imgs = self.vae.decode((latents / self.scaling_factor).to(self.dtype)).sample
        return ((imgs.float() + 1) / 2).clamp(0, 1)

    # --- score distillation ---------------------------------------------------------------------
    def train_step(
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
        """The SDS loss of a batch of renders.

        Args:
            text_embeddings: [2B,77,D], the unconditional (negative) embeddings first.
            pred_rgb: [B,3,H,W] renders in [0,1], or [B,4,H,W] (normal + mask) with ``as_latent``.
            guidance_scale: classifier-free guidance scale s.
            grad_scale: lambda multiplying the SDS gradient.
            t, noise: [B] timesteps and latent noise to use (drawn when None).

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
        w = (1 - self.alphas[t]).view(-1, 1, 1, 1)
        grad = torch.nan_to_num(grad_scale * w * (eps_hat - noise.float()))
        if save_guidance_path is not None:
            self._save_guidance(pred_rgb, noisy, eps_hat, t, as_latent, save_guidance_path)
        return sds_loss(latents, grad)

    @torch.no_grad()
    def predict_x0(self, noisy: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One-step clean-latent estimate ``(x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``."""
        a = self.alphas[t].view(-1, 1, 1, 1)
        return (noisy.float() - torch.sqrt(1 - a) * eps) / torch.sqrt(a)

    def _save_guidance(self, pred_rgb, noisy, eps_hat, t, as_latent, path) -> None:
        from PIL import Image

        x0 = self.predict_x0(noisy, eps_hat, t)
        size = (self.image_size,) * 2
        first = pred_rgb[:, :3] if not as_latent else pred_rgb[:, :3]
        panels = [
            F.interpolate(first.detach().float(), size, mode="bilinear", align_corners=False),
            self.decode_latents(noisy),
            self.decode_latents(x0),
        ]
        strip = torch.cat([torch.cat(list(p), -1) for p in panels], -2)  # rows: render, noisy, x0
        arr = (strip.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path)


def build_stable_diffusion(
    cfg: SDConfig,
    speed: SDSpeedConfig,
    *,
    cond: GuidanceConfig,
    device: torch.device | str,
    precision: str = "fp32",
) -> StableDiffusion:
    """``--guidance SD``: Stable Diffusion (or the built-in prior) from its configs.

    Loading initialises weights from the global RNG before reading them: it runs in a forked
    stream so a run's random numbers do not depend on what is cached."""
    from common.rng import forked_rng

    with forked_rng(device):
        return StableDiffusion(
            device,
            precision == "fp16",
            cfg.vram_O,
            cfg.sd_version,
            cfg.hf_key,
            tuple(cond.t_range),
            bf16=precision == "bf16",
            unet_graph=bool(speed.unet_graph),
            vae_graph=bool(speed.vae_graph),
            channels_last=bool(speed.channels_last),
            vae_channels_last=speed.vae_channels_last,
            vae_fused_gn=bool(speed.vae_fused_gn),
            unet_fused_qkv=bool(speed.unet_fused_qkv),
            compile_unet=bool(speed.compile_unet),
            compile_vae=bool(speed.compile_vae),
            unet_traced=speed.unet_traced,
        )


register("SD", (SDConfig, SDSpeedConfig), build_stable_diffusion)
