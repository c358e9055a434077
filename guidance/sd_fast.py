"""Stable Diffusion's speed layer: opt-in paths (CUDA graphs, torch.compile, ahead-of-time
traced UNets, fused kernels) that compute what the eager reference in ``sd_utils.py`` does.

Every lever is a field of ``SDSpeedConfig``; with all of them off (and ``unet_traced="off"``)
the prior runs the reference computation alone. ``-O`` turns on the ones measured faster
(docs/benchmarks.md). ``SDFast`` holds one model's enabled paths: it changes the UNet and VAE
modules once (fused projections, fused GroupNorms, memory formats) and wraps the reference
UNet call (``sd_utils.unet_eager``) and VAE encoder half (``sd_utils.vae_moments``).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import option

UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
MAX_GRAPHS = 4  # CUDA graphs kept per model (one per input signature); beyond that: eager
_warned: set[str] = set()


@dataclass(frozen=True)
class SDSpeedConfig:
    """Speed levers of the diffusion prior (CUDA only; on a CPU they are ignored)."""

    unet_graph: bool | None = option(
        None,
        "replay the UNet's CFG call from a CUDA graph per input shape [default: on with -O, else off]",
        tristate=True,
    )
    vae_graph: bool | None = option(
        None,
        "replay the VAE encoder's forward and backward from CUDA graphs [default: on with -O, else off]",
        tristate=True,
    )
    compile_vae: bool | None = option(
        None,
        "torch.compile the VAE encoder (about 30 s on first use) [default: on with -O, else off]",
        tristate=True,
    )
    channels_last: bool | None = option(
        None,
        "UNet weights and inputs in channels_last memory format [default: on with -O, else off]",
        tristate=True,
    )
    vae_channels_last: bool = option(
        False, "VAE encoder weights and inputs in channels_last on the graphed/compiled encoder path"
    )
    vae_fused_gn: bool | None = option(
        None,
        "the VAE encoder's GroupNorm + SiLU pairs as our CUDA kernels (implies --vae_channels_last) "
        "[default: on with -O, else off]",
        tristate=True,
    )
    unet_fused_qkv: bool | None = option(
        None,
        "one GEMM for the q/k/v projections of each UNet attention [default: on with -O, else off]",
        tristate=True,
    )
    compile_unet: bool | None = option(
        None,
        "torch.compile the UNet (about a minute on first use, seconds from torch's compile cache) "
        "[default: on with -O, else off]",
        tristate=True,
    )
    unet_traced: str = option(
        "auto",
        "UNet compiled ahead of time by trace.py: auto loads a matching one from "
        "~/.cache/dreamfusion/unet_traced, PATH loads that .pt2, off never loads one",
        metavar="auto|off|PATH",
    )


def warn_once(msg: str) -> None:
    """One line on stderr, once per message (fallbacks must be visible but not spam the log)."""
    if msg not in _warned:
        _warned.add(msg)
        print(f"[speed] {msg}", file=sys.stderr, flush=True)


def signature(*tensors: torch.Tensor) -> tuple:
    """What a captured graph or an ahead-of-time compiled UNet is specialised to.

    >>> signature(torch.zeros(2, 3))
    (((2, 3), 'torch.float32', False),)
    """
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


class SDFast:
    """The enabled speed paths of one Stable Diffusion model (its UNet and VAE encoder).

    Built once, after the models are loaded: it resolves the levers of ``speed`` (graphs,
    compilation and traced UNets need CUDA; on a CPU they are off), changes the modules the
    levers ask for, and then serves ``predict_noise`` and ``encode`` in place of the reference.

    Args:
        unet, vae: the loaded (frozen, eval) models; changed in place.
        speed: the levers.
        reference_unet: ``(unet, x, t, emb) -> eps``, the reference UNet call this layer
            speeds up (``sd_utils.unet_eager``).
        reference_moments: ``(vae, x) -> moments``, the reference encoder half
            (``sd_utils.vae_moments``).
        model_id: ``() -> str``, the model's identity for traced UNets' keys
            (``sd_utils.fingerprint`` of its hub id or folder; called only when one is looked up).
        device, dtype: where the models are, and their dtype.
        precision: the run's precision ("bf16" runs the prior in its own dtype, autocast off).
        traced_dir: where ``unet_traced="auto"`` looks (default ``default_traced_dir()``).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        speed: SDSpeedConfig,
        *,
        reference_unet: Callable[..., torch.Tensor],
        reference_moments: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
        model_id: Callable[[], str],
        device: torch.device,
        dtype: torch.dtype,
        precision: str = "fp32",
        traced_dir: str | Path | None = None,
    ):
        # The reference this layer wraps, passed in: the speed layer imports nothing of it.
        self.reference_unet, self.reference_moments, self.model_id = (
            reference_unet,
            reference_moments,
            model_id,
        )
        self.unet, self.vae, self.dtype = unet, vae, dtype
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.unet_graph = bool(speed.unet_graph) and cuda
        self.vae_graph = bool(speed.vae_graph) and cuda
        self.compile_vae = bool(speed.compile_vae) and cuda
        self.compile_unet = bool(speed.compile_unet) and cuda
        fast_vae = self.vae_graph or self.compile_vae
        if fast_vae:
            # The VAE's mid-block attention has one 512-wide head over 64x64 tokens: too wide for
            # flash attention, and the memory-efficient kernel's backward took 6.4 ms of every
            # step on the H100. Plain matmul + softmax (a 4096^2 fp16 matrix, 32 MiB) takes a
            # fraction of that, with the same gradient.
            from diffusers.models.attention_processor import AttnProcessor

            vae.set_attn_processor(AttnProcessor())
        self.vae_fused_gn = False
        if speed.vae_fused_gn and fast_vae:
            from .groupnorm import fuse_group_norms, kernels

            # Without our kernels (no CUDA compiler) the op would run its slower PyTorch twin
            # inside the compiled encoder: keep Inductor's own GroupNorm kernels then.
            self.vae_fused_gn = kernels() is not None
            if self.vae_fused_gn:
                fuse_group_norms(vae.encoder)
        self.vae_channels_last = (speed.vae_channels_last or self.vae_fused_gn) and fast_vae
        if self.vae_channels_last:
            vae.encoder.to(memory_format=torch.channels_last)
            if vae.quant_conv is not None:
                vae.quant_conv.to(memory_format=torch.channels_last)
        self.channels_last = bool(speed.channels_last)
        # Before any compile or graph capture: they would hold the unfused modules.
        self.unet_fused_qkv = bool(speed.unet_fused_qkv) and fuse_qkv(unet)
        traced = speed.unet_traced
        self.unet_traced = None if traced in (None, "", "off") or not cuda else str(traced)
        self.traced_dir = Path(traced_dir) if traced_dir else default_traced_dir()
        # Whether the UNet call leaves the reference path (the fused q/k/v projections change
        # modules, not the call path: not a lever here).
        levers = (self.unet_graph, self.vae_graph, self.compile_vae, self.compile_unet)
        self.on = any(levers) or self.channels_last or precision == "bf16" or self.unet_traced is not None
        if self.channels_last:
            unet.to(memory_format=torch.channels_last)  # a no-op where vram_O did it already
        self._unet_fn: UNetFn = self.unet_eager
        if self.compile_unet:
            self._unet_fn = torch.compile(self.unet_eager)
        self._graphs: dict[tuple, CudaGraphed] = {}
        self._traced: dict[tuple, UNetFn | None] = {}  # per input signature: the artifact or None
        self._vae_graphs: dict[tuple, Callable] = {}
        self.device_name = torch.cuda.get_device_name(self.device) if cuda else "cpu"

    # --- UNet ------------------------------------------------------------------------------------
    def unet_eager(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The reference UNet call (``sd_utils.unet_eager``) on this model."""
        return self.reference_unet(self.unet, x, t, emb)

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """UNet noise prediction for the CFG batch ``x`` [2B,4,h,w] (model dtype), ``t`` [2B],
        ``emb`` [2B,77,D], through the fastest enabled path for its signature: traced,
        compiled, CUDA graph, or eager; in the model's dtype with autocast off."""
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
            self._unet_fn = self.unet_eager
            return CudaGraphed(self.unet_eager, args)

    def traced_key_for(self, sig: tuple) -> str:
        """``traced_key`` of this model (with its q/k/v fusion: other weight names) for inputs ``sig``."""
        model = self.model_id() + ("+fused_qkv" if self.unet_fused_qkv else "")
        return traced_key(model, self.dtype, sig, self.device_name)

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

    # --- VAE encoder -----------------------------------------------------------------------------
    def encodes(self, x: torch.Tensor) -> bool:
        """Whether the fast encoder path takes ``x``: it is built for a backward pass."""
        return (self.vae_graph or self.compile_vae) and x.requires_grad and torch.is_grad_enabled()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] images in [-1,1] (model dtype) -> [B,4,h,w] unscaled latents, a sample of
        the posterior whose moments come from the enabled encoder paths (autocast off)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        with torch.autocast(self.device.type, enabled=False):
            moments = self.vae_moments(x)
        # Sampled outside the graph, as diffusers does, so the same RNG stream gives the same latents.
        return DiagonalGaussianDistribution(moments).sample()

    def vae_moments_eager(self, x: torch.Tensor) -> torch.Tensor:
        """The reference encoder half (``sd_utils.vae_moments``) on this model."""
        return self.reference_moments(self.vae, x)

    def vae_moments(self, x: torch.Tensor) -> torch.Tensor:
        """``vae_moments_eager`` through the enabled levers (compiled and/or graphed), one per signature."""
        if self.vae_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        sig = signature(x)
        fn = self._vae_graphs.get(sig)
        if fn is None:
            if self.vae_graph and len(self._vae_graphs) >= MAX_GRAPHS:
                warn_once(f"{MAX_GRAPHS} VAE CUDA graphs captured already; inputs {sig} run eager")
                return self.vae_moments_eager(x)
            # Inductor keeps this graph's activations channels_last only when forced: its
            # heuristic declines (the 3-channel input conv), and cuDNN then converted NCHW<->NHWC
            # around every convolution (VAE forward + backward 11.1 -> 9.1 ms per step on the H100).
            base = (
                torch.compile(
                    self.vae_moments_eager, dynamic=False, options={"force_layout_optimization": True}
                )
                if self.compile_vae
                else self.vae_moments_eager
            )
            try:
                fn = self._wrap_vae(base, x)
            except Exception as e:  # noqa: BLE001 - any compiler failure: run eager, say so once
                if not self.compile_vae:
                    raise
                warn_once(f"torch.compile of the VAE encoder failed ({type(e).__name__}); running it eager")
                self.compile_vae = False
                fn = self._wrap_vae(self.vae_moments_eager, x)
            self._vae_graphs[sig] = fn
        return fn(x)

    def _wrap_vae(self, base: Callable, x: torch.Tensor) -> Callable:
        if not self.vae_graph:
            base(x.detach().clone().requires_grad_(True)).sum().backward()  # compile now, not mid-step
            return base
        example = x.detach().clone().requires_grad_(True)
        return torch.cuda.make_graphed_callables(base, (example,))
