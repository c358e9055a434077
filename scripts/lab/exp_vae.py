"""Experiment: VAE encoder forward + backward-to-input at 512x512 (SD 2.1 VAE, random weights).

python scripts/lab/exp_vae.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from guidance.sd_factory import random_vae  # noqa: E402
from scripts.bench_render import timeit as bench_timeit  # noqa: E402


def timeit(fn, n=20, warm=3):
    return bench_timeit(fn, n, torch.device("cuda"), warmup=warm)[0]


def main():
    vae = random_vae("sd2.1-base").cuda().half().eval().requires_grad_(False)
    enc = lambda x: vae.quant_conv(vae.encoder(x))  # noqa: E731
    g = torch.randn(1, 8, 64, 64, device="cuda", dtype=torch.half)

    def mk(fn, cl=False):
        def step():
            x = torch.rand(1, 3, 512, 512, device="cuda", dtype=torch.half)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            y = fn(x)
            y.backward(g)
            return x.grad

        return step

    ref_x = torch.rand(1, 3, 512, 512, device="cuda", dtype=torch.half)

    def grad_of(fn):
        x = ref_x.clone().requires_grad_(True)
        fn(x).backward(g)
        return x.grad.float()

    ref = grad_of(enc)
    print("eager", timeit(mk(enc)), flush=True)
    from diffusers.models.attention_processor import AttnProcessor

    vae.set_attn_processor(AttnProcessor())  # as the guidance does under its VAE levers
    print("eager, AttnProcessor", timeit(mk(enc)), flush=True)
    for cl in (False, True):
        if cl:
            vae.to(memory_format=torch.channels_last)
        ex = ref_x.clone().contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        t0 = time.time()
        c = torch.compile(enc, dynamic=False)
        gc = torch.cuda.make_graphed_callables(c, (ex.requires_grad_(True),))
        ct = time.time() - t0
        x = ex.detach().clone().requires_grad_(True)
        gc(x).backward(g)
        d = (x.grad.float() - ref).norm() / ref.norm()
        print(
            f"compile + graph, channels_last={cl}",
            timeit(mk(gc, cl)),
            f"({ct:.0f} s) rel {d:.2e}",
            flush=True,
        )
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
