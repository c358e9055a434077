"""Train the built-in prior (a miniature latent Stable Diffusion) from scratch.

    python scripts/train_prior.py --device cuda --out pretrained/builtin

Steps: build a CLIP BPE tokenizer from open_clip's ``bpe_simple_vocab_16e6.txt.gz``
(truncated to the most frequent merges, see ``build_tokenizer``), trace the shapes data on
the GPU, train a small ``AutoencoderKL`` (64x64x3 <-> 16x16x4), set its ``scaling_factor``
so latents have unit variance, then train a small ``UNet2DConditionModel`` jointly with a
small ``CLIPTextModel`` from scratch (epsilon prediction, SD's scaled-linear betas,
caption dropped to "" 10% of the time for classifier-free guidance, EMA weights). The
folder is written in diffusers' layout, fp16 safetensors, with ``training.json`` beside.

``--resume`` continues the UNet phase from ``--ckpt`` (written at the end of every run and
every ``--ckpt-every`` steps) up to ``--unet-steps``.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from guidance.sd_factory import bytes_to_unicode  # noqa: E402
from shapes.dataset import ShapesData, all_captions  # noqa: E402
from shapes.scene import HELD_OUT, TRAIN_PAIRS  # noqa: E402

MAX_LEN = 77  # Stable Diffusion's text length, so guidance code needs no special case
N_CLIP_MERGES = 49152 - 256 - 2  # merges open_clip uses from the file


def find_bpe_file(explicit: str | None) -> Path:
    cands = [explicit] if explicit else []
    try:
        import importlib.util

        spec = importlib.util.find_spec("open_clip")
        if spec and spec.origin:
            cands.append(str(Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"))
    except Exception:  # noqa: BLE001 - open_clip is optional
        pass
    cands += [".whl/bpe_simple_vocab_16e6.txt.gz", "bpe_simple_vocab_16e6.txt.gz"]
    for c in cands:
        if c and Path(c).is_file():
            return Path(c)
    raise FileNotFoundError(
        "bpe_simple_vocab_16e6.txt.gz not found: `pip download --no-deps open-clip-torch`, "
        "unzip open_clip/bpe_simple_vocab_16e6.txt.gz from the wheel and pass --bpe PATH"
    )


def build_tokenizer(bpe_gz: Path, n_merges: int) -> CLIPTokenizer:
    """A real CLIP tokenizer with CLIP's first ``n_merges`` BPE merges.

    CLIP's vocabulary is 256 byte symbols, the same with '</w>', one token per merge (in
    rank order, most frequent first) and two specials. Keeping only the first merges keeps
    every token id of the kept tokens identical to CLIP's (except the two specials, which
    move to the end of the shorter list) and any text still tokenizes: rarer words just
    split into more pieces. It shrinks the text embedding table from 49,408 rows to
    ``514 + n_merges``, which is what lets the model fit in 50 MB.
    """
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : N_CLIP_MERGES + 1][:n_merges]
    base = list(bytes_to_unicode().values())
    vocab_list = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])
    tok.model_max_length = MAX_LEN
    tok.merges_list = merges  # kept for writing merges.txt
    return tok


def build_models(tok: CLIPTokenizer, args) -> tuple[CLIPTextModel, AutoencoderKL, UNet2DConditionModel]:
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=args.text_dim,
            intermediate_size=4 * args.text_dim,
            projection_dim=args.text_dim,
            num_hidden_layers=args.text_layers,
            num_attention_heads=args.text_dim // 64,
            max_position_embeddings=MAX_LEN,
            hidden_act="quick_gelu",
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=1.0,  # set from the trained encoder's latent std
    )
    ch = tuple(int(c) for c in args.unet_channels.split(","))
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (len(ch) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(ch) - 1),
        block_out_channels=ch,
        layers_per_block=args.unet_layers,
        cross_attention_dim=args.text_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return text, vae, unet


def make_scheduler() -> DDIMScheduler:
    # Stable Diffusion's schedule and DDIM settings.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(prog, 1.0))))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    # One multi-tensor op: on the lent GPUs, step time is bound by kernel launches.
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)


def count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def train_vae(vae: AutoencoderKL, data: ShapesData, args, log: dict) -> None:
    dev = data.device
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0, fused=dev.type == "cuda")
    vae.train()
    t0 = time.time()
    for step in range(args.vae_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 100)
        x = data.sample(args.vae_batch)["image"] * 2 - 1
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
        rec = rec.float()
        l1 = (rec - x).abs().mean()
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / (16 * 16 * 4)  # per latent element
        loss = l1 + mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.vae_steps - 1:
            l1, mse, kl = float(l1.detach()), float(mse.detach()), float(kl.detach())
            log["vae_curve"].append([step, l1, mse, kl])
            print(f"vae {step} l1 {l1:.4f} mse {mse:.5f} kl {kl:.3f} {time.time() - t0:.0f}s", flush=True)
    log["vae_seconds"] = time.time() - t0
    vae.eval()


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, data: ShapesData, n: int = 4096) -> float:
    zs = []
    for _ in range(max(1, n // 512)):
        x = data.sample(512)["image"] * 2 - 1
        zs.append(vae.encode(x).latent_dist.sample().float())
    return float(1.0 / torch.cat(zs).std())


def save_folder(out: Path, tok, text, vae, unet, sched, info: dict) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok.save_pretrained(out / "tokenizer")
    # vocab.json + merges.txt too, for transformers versions whose CLIPTokenizer reads those.
    (out / "tokenizer" / "vocab.json").write_text(json.dumps(tok.get_vocab()))
    (out / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(tok.merges_list) + "\n")
    for name, m in (("text_encoder", text), ("vae", vae), ("unet", unet)):
        m = copy.deepcopy(m).to("cpu", torch.float16)
        m.save_pretrained(out / name, safe_serialization=True)
    # transformers' default dtype="auto" would load the fp16 checkpoint as fp16, which is
    # slow or unsupported on CPUs; record float32 so the text encoder loads like the rest.
    cfg_path = out / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    sched.save_pretrained(out / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    info["size_on_disk_bytes"] = size
    (out / "training.json").write_text(json.dumps(info, indent=1))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="pretrained/builtin")
    ap.add_argument(
        "--ckpt",
        default=".cache/builtin_prior_ckpt.pt",
        help="training checkpoint (fp32 weights, EMA, optimiser) for --resume",
    )
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bpe", default=None, help="path to bpe_simple_vocab_16e6.txt.gz")
    ap.add_argument("--merges", type=int, default=16384 - 514, help="BPE merges kept")
    ap.add_argument("--views-per-object", type=int, default=2000)
    ap.add_argument("--supersample", type=int, default=2)
    ap.add_argument("--text-dim", type=int, default=192)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--unet-channels", default="64,128,192")
    ap.add_argument("--unet-layers", type=int, default=2)
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--vae-batch", type=int, default=128)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument(
        "--kl-weight",
        type=float,
        default=1e-4,
        help="weight of the per-element KL (light: keeps latents tame)",
    )
    ap.add_argument("--unet-steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--text-lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--cfg-drop", type=float, default=0.1)
    ap.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR loss weighting")
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop the UNet phase early (and record it) past this wall time",
    )
    ap.add_argument(
        "--unet-minutes",
        type=float,
        default=0.0,
        help="if > 0: after 200 steps, cut --unet-steps to what fits this budget "
        "at the measured speed (the LR schedule follows the new total)",
    )
    ap.add_argument("--ckpt-every", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args(argv)

    t_start = time.time()
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    out = Path(args.out)

    tok = build_tokenizer(find_bpe_file(args.bpe), args.merges)
    text, vae, unet = build_models(tok, args)
    sched = make_scheduler()
    log: dict = {"vae_curve": [], "unet_curve": []}

    t0 = time.time()
    data = ShapesData(args.views_per_object, supersample=args.supersample, device=dev, seed=args.seed)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    data_seconds = time.time() - t0
    print(f"data: {args.views_per_object} views x 10 objects traced in {data_seconds:.1f}s", flush=True)

    vae.to(dev)
    text.to(dev)
    unet.to(dev)
    start_step = 0
    opt = torch.optim.AdamW(
        [
            {"params": unet.parameters(), "lr": args.lr, "base": args.lr},
            {"params": text.parameters(), "lr": args.text_lr, "base": args.text_lr},
        ],
        weight_decay=0.01,
        fused=dev.type == "cuda",
    )
    if args.resume:
        ck = torch.load(args.ckpt, map_location=dev, weights_only=True)  # data only: never runs code
        vae.load_state_dict(ck["vae"])
        vae.register_to_config(scaling_factor=ck["scaling_factor"])
        unet.load_state_dict(ck["unet"])
        text.load_state_dict(ck["text"])
        opt.load_state_dict(ck["opt"])
        start_step = ck["step"]
        log = ck["log"]
        print(f"resumed at UNet step {start_step}", flush=True)
    else:
        train_vae(vae, data, args, log)
        vae.register_to_config(scaling_factor=latent_scale(vae, data))
    vae.eval().requires_grad_(False)
    sf = vae.config.scaling_factor
    print(f"latent scaling_factor {sf:.4f}", flush=True)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_text = copy.deepcopy(text).requires_grad_(False)
    if args.resume:
        ema_unet.load_state_dict(ck["ema_unet"])
        ema_text.load_state_dict(ck["ema_text"])
        del ck

    # Token ids of every (object, colour, view) caption, and "" (the unconditional).
    caps = all_captions() + [""]
    ids_table = tok(
        caps, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt"
    ).input_ids.to(dev)
    uncond_id = len(caps) - 1
    alphas_cum = sched.alphas_cumprod.to(dev)
    snr = alphas_cum / (1 - alphas_cum)
    w_snr = torch.clamp(snr, max=args.snr_gamma) / snr  # min-SNR-gamma for epsilon targets

    unet.train()
    text.train()
    t0 = time.time()
    stopped_early = False
    step = start_step
    run_loss, run_n = 0.0, 0
    while step < args.unet_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.unet_steps, g["base"], args.warmup)
        batch = data.sample(args.batch)
        cid = batch["caption_id"]
        drop = torch.rand(cid.shape, device=dev) < args.cfg_drop
        cid = torch.where(drop, torch.full_like(cid, uncond_id), cid)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            with torch.no_grad():
                z = vae.encode(batch["image"] * 2 - 1).latent_dist.sample().float() * sf
            noise = torch.randn_like(z)
            t = torch.randint(0, 1000, (z.shape[0],), device=dev)
            zt = sched.add_noise(z, noise, t)
            states = text(ids_table[cid])[0]
            pred = unet(zt, t, encoder_hidden_states=states).sample
        per = F.mse_loss(pred.float(), noise, reduction="none").mean((1, 2, 3))
        loss = (per * w_snr[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text.parameters()), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text, decay)
        run_loss = run_loss + per.detach().mean()  # a tensor: no GPU sync per step
        run_n += 1
        step += 1
        if args.unet_minutes and step == start_step + 100:
            t100 = time.time()  # measure after warm-up (cudnn autotuning, allocator)
        if args.unet_minutes and step == start_step + 200:
            rate = 100 / (time.time() - t100)
            fit = step + int(rate * (60 * args.unet_minutes - (time.time() - t0)))
            args.unet_steps = max(step + 1, min(args.unet_steps, fit))
            print(f"{rate:.1f} it/s: training {args.unet_steps} UNet steps", flush=True)
        if step % args.log_every == 0 or step == args.unet_steps:
            el = time.time() - t0
            avg = float(run_loss) / max(1, run_n)
            log["unet_curve"].append([step, avg])
            print(
                f"unet {step} eps-mse {avg:.4f} {el:.0f}s ({(step - start_step) / max(el, 1e-6):.1f} it/s)",
                flush=True,
            )
            run_loss, run_n = 0.0, 0
        if args.ckpt_every and step % args.ckpt_every == 0:
            save_ckpt(args.ckpt, vae, unet, text, ema_unet, ema_text, opt, step, log)
        if args.max_minutes and time.time() - t_start > 60 * args.max_minutes:
            stopped_early = True
            print(f"time limit: stopping at step {step}", flush=True)
            break
    unet_seconds = time.time() - t0
    if args.ckpt:
        save_ckpt(args.ckpt, vae, unet, text, ema_unet, ema_text, opt, step, log)

    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
    info = {
        "seed": args.seed,
        "settings": vars(args),
        "command": " ".join(["python", "scripts/train_prior.py"] + (argv or sys.argv[1:])),
        "data": {
            "train_pairs": len(TRAIN_PAIRS),
            "held_out_pairs": [list(p) for p in HELD_OUT],
            "views_traced": args.views_per_object * 10,
            "resolution": 64,
            "supersample": args.supersample,
            "vae_images_seen": args.vae_steps * args.vae_batch,
            "unet_images_seen": step * args.batch,
        },
        "params": {"text_encoder": count(text), "vae": count(vae), "unet": count(unet)},
        "vocab_size": len(tok),
        "scaling_factor": sf,
        "unet_steps_done": step,
        "stopped_early": stopped_early,
        "final_losses": {
            "vae_l1": log["vae_curve"][-1][1] if log["vae_curve"] else None,
            "vae_mse": log["vae_curve"][-1][2] if log["vae_curve"] else None,
            "vae_kl_per_element": log["vae_curve"][-1][3] if log["vae_curve"] else None,
            "unet_eps_mse": log["unet_curve"][-1][1] if log["unet_curve"] else None,
        },
        "seconds": {
            "data": data_seconds,
            "vae": log.get("vae_seconds"),
            "unet_this_run": unet_seconds,
            "total_this_run": time.time() - t_start,
        },
        "device": gpu,
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "transformers": __import__("transformers").__version__,
        "curves": {"vae": log["vae_curve"], "unet": log["unet_curve"]},
        "weights": f"EMA (decay {args.ema}) of the UNet and text encoder, fp16",
    }
    save_folder(out, tok, ema_text, vae, ema_unet, sched, info)
    print(
        f"saved {out} ({info['size_on_disk_bytes'] / 1e6:.1f} MB) in {time.time() - t_start:.0f}s", flush=True
    )


def save_ckpt(path, vae, unet, text, ema_unet, ema_text, opt, step, log) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(
        {
            "vae": vae.state_dict(),
            "scaling_factor": vae.config.scaling_factor,
            "unet": unet.state_dict(),
            "text": text.state_dict(),
            "ema_unet": ema_unet.state_dict(),
            "ema_text": ema_text.state_dict(),
            "opt": opt.state_dict(),
            "step": step,
            "log": log,
        },
        path,
    )


if __name__ == "__main__":
    main()
