"""2D benchmark of the built-in prior: sample every caption and view class, score by retrieval.

    python scripts/eval_prior_2d.py --model pretrained/builtin --device cuda \
        --out docs/builtin-prior

Components are loaded with diffusers/transformers ``from_pretrained`` from the folder and
sampled with DDIM and classifier-free guidance ("" as the unconditional prompt).

Scoring: a sample has no camera, only a view class (front / side / back; the default
polar range 45..105 never yields "overhead" with angle_overhead 30, so the prior is not
trained or scored on it). Each sample is compared, with ``shapes.metrics.match_distances``
((1 - mask IoU) + rms chromaticity difference), against albedo ground truth of all 80
captions at a grid of reference cameras covering its class (polar 50 / 70 / 90, azimuths
every 12 to 15 degrees inside the class's wedge); a caption's distance is its best camera's.
The sample retrieves the caption with the smallest distance. The sample's mask is the set
of pixels that differ from the background colour (the median of the border pixels) by more
than 0.1 in some channel.

Writes ``eval_2d.json``, ``eval_2d.md`` and ``contact_sheet.png`` (per caption: ground truth
at polar 75 / azimuth 0, 90, 180 above one sample per class), and ``training_curves.png``
from ``training.json`` when matplotlib is available.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nerf.provider import (  # noqa: E402
    BACK,
    FRONT,
    SIDE,
    circle_poses,
    get_rays,
    intrinsics_from_fovy,
    view_prompt,
)
from shapes.metrics import gt_albedo_bank, match_distances  # noqa: E402
from shapes.scene import (  # noqa: E402
    CAPTIONS,
    COLOUR_NAMES,
    HELD_OUT,
    N_COLOURS,
    N_OBJECTS,
    OBJECTS,
    render_gt,
)

CLASSES = {FRONT: "front", SIDE: "side", BACK: "back"}
REF_POLARS = (50.0, 70.0, 90.0)
REF_AZIMUTHS = {
    FRONT: (-24.0, -12.0, 0.0, 12.0, 24.0),
    SIDE: tuple(s * a for s in (1, -1) for a in (37.5, 52.5, 67.5, 82.5, 97.5, 112.5, 127.5, 142.5)),
    BACK: (156.0, 168.0, 180.0, 192.0, 204.0),
}
CANONICAL_AZ = {FRONT: 0.0, SIDE: 90.0, BACK: 180.0}


def rays_for(polars, azimuths, H: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    th = torch.tensor(polars, dtype=torch.float32)
    ph = torch.tensor(azimuths, dtype=torch.float32)
    n = th.shape[0]
    poses = circle_poses(torch.full((n,), 3.2), th, ph, device)
    return get_rays(poses, intrinsics_from_fovy(torch.full((n,), 20.0, device=device), H, H), H, H)


def reference_bank(view: int, H: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Albedo GT of all captions at the class's reference cameras: [80,K,N], [80,K,N,3]."""
    pol, az = zip(*[(p, a) for p in REF_POLARS for a in REF_AZIMUTHS[view]])
    ro, rd = rays_for(pol, az, H, device)
    m, a = gt_albedo_bank(ro, rd)
    return m, a, len(pol)


def segment(img: torch.Tensor, thresh: float = 0.1) -> torch.Tensor:
    """Foreground mask [B,H,W] of images [B,H,W,3] on a solid background."""
    border = torch.cat([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], 1)  # [B,4H,3]
    bg = border.median(1).values
    return (img - bg[:, None, None]).abs().amax(-1) > thresh


@torch.no_grad()
def sample(
    components, prompts: list[str], *, steps: int, guidance: float, seed: int, device, batch: int = 256
) -> torch.Tensor:
    """DDIM + CFG samples [B,64,64,3] in [0,1] for ``prompts``."""
    tok, text, unet, vae, sched = components
    sf = vae.config.scaling_factor
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []

    def encode(ps):
        ids = tok(
            ps, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        return text(ids)[0]

    uncond1 = encode([""])
    for s in range(0, len(prompts), batch):
        ps = prompts[s : s + batch]
        cond = encode(ps)
        uncond = uncond1.expand(len(ps), -1, -1)
        size = unet.config.sample_size
        z = torch.randn(len(ps), unet.config.in_channels, size, size, generator=gen).to(device)
        sched.set_timesteps(steps)
        z = z * sched.init_noise_sigma
        for t in sched.timesteps:
            eps = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            eu, ec = eps.chunk(2)
            z = sched.step(eu + guidance * (ec - eu), t, z).prev_sample
        img = vae.decode(z / sf).sample
        out.append(((img + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).float().cpu())
    return torch.cat(out)


def oracle_images(jobs, H: int, seed: int) -> torch.Tensor:
    """Shaded GT [B,H,W,3] for jobs (obj, colour, view) at random cameras of the class."""
    from shapes.scene import light_near_camera

    g = torch.Generator().manual_seed(seed)
    out = []
    for o, c, v in jobs:
        pol = 45.0 + 60.0 * float(torch.rand((), generator=g))
        u = float(torch.rand((), generator=g))
        az = {FRONT: -30 + 60 * u, BACK: 150 + 60 * u}.get(v, 30 + 120 * u)
        if v == SIDE and float(torch.rand((), generator=g)) < 0.5:
            az = -az
        ro, rd = rays_for([pol], [az], H, "cpu")
        light = light_near_camera(ro[:, 0], generator=g)
        amb = 0.1 + 0.9 * float(torch.rand((), generator=g))
        bg = torch.rand(1, 3, generator=g)
        out.append(render_gt(o, c, ro, rd, light_dir=light, ambient=amb, bg=bg)["rgb"])
    return torch.cat(out).reshape(-1, H, H, 3)


def load(model: str, device):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").to(device).eval()
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(device).eval()
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").to(device).eval()
    sched = DDIMScheduler.from_pretrained(model, subfolder="scheduler")
    return tok, text, unet, vae, sched


def to_u8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)


def contact_sheet(samples: dict, H: int, path: Path) -> None:
    """Per caption a cell: GT front/side/back (top) over one sample each (bottom)."""
    from PIL import Image, ImageDraw

    pad, lab_w, lab_h = 4, 70, 14
    cw, chh = 3 * H, 2 * H
    W = lab_w + N_COLOURS * (cw + pad)
    Ht = lab_h + N_OBJECTS * (chh + pad)
    sheet = Image.new("RGB", (W, Ht), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    gt = {}
    bg = torch.full((3, 3), 0.6)
    light_az = [CANONICAL_AZ[v] for v in CLASSES]
    ro, rd = rays_for([75.0] * 3, light_az, H, "cpu")
    for o in range(N_OBJECTS):
        for c in range(N_COLOURS):
            r = render_gt(o, c, ro, rd, ambient=0.3, bg=bg)["rgb"].reshape(3, H, H, 3)
            gt[(o, c)] = r
    for c in range(N_COLOURS):
        draw.text((lab_w + c * (cw + pad) + 4, 1), COLOUR_NAMES[c], fill=(0, 0, 0))
    for o in range(N_OBJECTS):
        y0 = lab_h + o * (chh + pad)
        draw.text((2, y0 + H - 6), OBJECTS[o], fill=(0, 0, 0))
        for c in range(N_COLOURS):
            x0 = lab_w + c * (cw + pad)
            for j, v in enumerate(CLASSES):
                sheet.paste(Image.fromarray(to_u8(gt[(o, c)][j])), (x0 + j * H, y0))
                sheet.paste(Image.fromarray(to_u8(samples[(o, c, v)])), (x0 + j * H, y0 + H))
            if (o, c) in HELD_OUT:
                draw.rectangle([x0 - 2, y0 - 2, x0 + cw + 1, y0 + chh + 1], outline=(255, 0, 0))
    sheet.save(path)


def plot_curves(training_json: Path, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no training_curves.png")
        return False
    info = json.loads(training_json.read_text())
    vae = np.array(info["curves"]["vae"])
    unet = np.array(info["curves"]["unet"])
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    if len(vae):
        ax[0].semilogy(vae[:, 0], vae[:, 1], label="L1")
        ax[0].semilogy(vae[:, 0], vae[:, 2], label="MSE")
        ax[0].set_title("VAE reconstruction (images in [-1, 1])")
        ax[0].set_xlabel("step")
        ax[0].legend()
    if len(unet):
        ax[1].plot(unet[:, 0], unet[:, 1])
        ax[1].set_title("UNet epsilon MSE (unweighted, running mean)")
        ax[1].set_xlabel("step")
        ax[1].set_ylim(0, max(0.3, float(np.percentile(unet[:, 1], 95))))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="pretrained/builtin")
    ap.add_argument("--out", default="docs/builtin-prior")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--per-class", type=int, default=4, help="samples per caption and class")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument(
        "--oracle",
        action="store_true",
        help="score shaded GT renders (random camera in the class, random light, "
        "ambient, background) instead of samples: the scorer's ceiling",
    )
    args = ap.parse_args(argv)
    t0 = time.time()
    dev = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    H = 64
    comps = None if args.oracle else load(args.model, dev)

    held = set(HELD_OUT)
    jobs = [
        (o, c, v)
        for o in range(N_OBJECTS)
        for c in range(N_COLOURS)
        for v in CLASSES
        for _ in range(args.per_class)
    ]
    prompts = [view_prompt(CAPTIONS[o * N_COLOURS + c], v) for o, c, v in jobs]
    if args.oracle:
        imgs = oracle_images(jobs, H, args.seed)
    else:
        imgs = sample(
            comps,
            prompts,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            device=dev,
            batch=args.batch,
        )
    t_sample = time.time() - t0
    masks = segment(imgs)

    retrieved = torch.empty(len(jobs), dtype=torch.long)
    for v in CLASSES:
        bm, ba, K = reference_bank(v, H, dev)
        bm, ba = bm.cpu(), ba.cpu()
        idx = [i for i, j in enumerate(jobs) if j[2] == v]
        q_m = masks[idx].reshape(len(idx), -1)
        q_rgb = imgs[idx].reshape(len(idx), -1, 3)
        d = match_distances(q_m, q_rgb, bm.reshape(-1, H * H), ba.reshape(-1, H * H, 3))
        d = d.reshape(len(idx), N_OBJECTS * N_COLOURS, K).amin(-1)
        retrieved[idx] = d.argmin(-1)

    def summary(sel) -> dict:
        sel = list(sel)
        if not sel:
            return {}
        r = retrieved[sel]
        target = torch.tensor([jobs[i][0] * N_COLOURS + jobs[i][1] for i in sel])
        return {
            "n": len(sel),
            "retrieval": float((r == target).float().mean()),
            "object_acc": float((r // N_COLOURS == target // N_COLOURS).float().mean()),
            "colour_acc": float((r % N_COLOURS == target % N_COLOURS).float().mean()),
        }

    is_held = [(o, c) in held for o, c, _ in jobs]
    res = {
        "train": summary(i for i in range(len(jobs)) if not is_held[i]),
        "held_out": summary(i for i in range(len(jobs)) if is_held[i]),
        "per_class": {
            name: {
                "train": summary(i for i, j in enumerate(jobs) if j[2] == v and not is_held[i]),
                "held_out": summary(i for i, j in enumerate(jobs) if j[2] == v and is_held[i]),
            }
            for v, name in CLASSES.items()
        },
        "per_held_out_pair": {
            CAPTIONS[o * N_COLOURS + c]: summary(i for i, j in enumerate(jobs) if (j[0], j[1]) == (o, c))
            for o, c in HELD_OUT
        },
        "settings": vars(args),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "seconds": {"sampling": t_sample, "total": time.time() - t0},
        "command": " ".join(["python", "scripts/eval_prior_2d.py"] + (argv or sys.argv[1:])),
    }
    stem = "oracle_2d" if args.oracle else "eval_2d"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))

    lines = [
        "| split | samples | retrieval | object acc. | colour acc. |",
        "|---|---|---|---|---|",
    ]
    for name in ("train", "held_out"):
        s = res[name]
        lines.append(
            f"| {name} | {s['n']} | {s['retrieval']:.3f} | {s['object_acc']:.3f} | {s['colour_acc']:.3f} |"
        )
    for vname, d in res["per_class"].items():
        for name in ("train", "held_out"):
            s = d[name]
            lines.append(
                f"| {name}, {vname} view | {s['n']} | {s['retrieval']:.3f} | "
                f"{s['object_acc']:.3f} | {s['colour_acc']:.3f} |"
            )
    lines += ["", "| held-out pair | retrieval | object acc. | colour acc. |", "|---|---|---|---|"]
    for cap, s in res["per_held_out_pair"].items():
        lines.append(f"| {cap} | {s['retrieval']:.3f} | {s['object_acc']:.3f} | {s['colour_acc']:.3f} |")
    lines += ["", f"Command: `{res['command']}` on {res['device']}, {res['seconds']['total']:.0f} s."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.oracle:
        return

    first = {}
    for i, j in enumerate(jobs):
        first.setdefault(j, imgs[i])
    contact_sheet(first, H, out / "contact_sheet.png")
    tj = Path(args.model) / "training.json"
    if tj.is_file():
        plot_curves(tj, out / "training_curves.png")


if __name__ == "__main__":
    main()
