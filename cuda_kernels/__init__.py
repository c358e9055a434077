"""Our CUDA kernels' build and the lazy CUDA-or-twin choice, for every package that has kernels.

``cuda_kernels.build`` compiles the sources of ``raymarching/csrc``, ``gridencoder/csrc``,
``nerf/csrc`` (the fused Adan step) and ``guidance/csrc`` (the VAE's GroupNorm) as ONE extension
on first use, cached per torch/CUDA/Python version; ``load_kernels()`` returns it, or None when
it cannot be built (callers then run their PyTorch twins). ``cuda_kernels.backend.CudaBackend``
picks, lazily, between a package's ``_cuda`` module and its twin. This package knows only the
source paths: it imports none of the packages whose kernels it builds.

(Not named ``kernels``: that is Hugging Face's kernel hub package, which diffusers and peft
import; a top-level ``kernels`` here would shadow it.)
"""
