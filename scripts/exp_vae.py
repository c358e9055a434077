"""Experiment: VAE encoder forward + backward-to-input at 512x512 (SD 2.1 VAE, random weights).

python scripts/exp_vae.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from guidance.sd_factory import CONFIGS  # noqa: E402
from scripts.bench_render import timeit as bench_timeit  # noqa: E402


def timeit(fn, n=20, warm=3):
    return bench_timeit(fn, n, torch.device("cuda"), warmup=warm)[0]


def main():
    from diffusers import AutoencoderKL

    spec = CONFIGS["sd2.1-base"]
    n = len(spec["vae"]["block_out_channels"])
    vae = (
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            **spec["vae"],
        )
        .cuda()
        .half()
        .eval()
        .requires_grad_(False)
    )
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
    res = {}
    torch.cuda.reset_peak_memory_stats()
    res["eager"] = timeit(mk(enc))
    print("eager", res["eager"], torch.cuda.max_memory_allocated() / 2**30, flush=True)
    gr = torch.cuda.make_graphed_callables(enc, (ref_x.clone().requires_grad_(True),))
    res["graph"] = timeit(mk(gr))
    print("graph", res["graph"], flush=True)
    for mode in ("default", "max-autotune-no-cudagraphs"):
        t0 = time.time()
        c = torch.compile(enc, mode=mode, dynamic=False)
        step = mk(c)
        step()
        torch.cuda.synchronize()
        ct = time.time() - t0
        d = (grad_of(c) - ref).norm() / ref.norm()
        res[f"compile {mode}"] = timeit(step)
        print(f"compile {mode}", res[f"compile {mode}"], f"compile {ct:.0f}s rel {d:.2e}", flush=True)
        try:
            gc = torch.cuda.make_graphed_callables(c, (ref_x.clone().requires_grad_(True),))
            t = timeit(mk(gc))
            d = (grad_of(gc) - ref).norm() / ref.norm()
            print(f"compile {mode} + graph", t, f"rel {d:.2e}", flush=True)
        except Exception as e:  # noqa: BLE001
            print("graph of compiled failed:", repr(e)[:300], flush=True)
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
