"""The 3D quality benchmark of the built-in prior (docs/results.md).

For each benchmark prompt (10 held-out colour/object pairs, 10 training pairs; see
``shapes.scene.BENCHMARK``) run text-to-3D at the built-in prior's defaults, render the EMA
weights at the 8 evaluation cameras (azimuth 0..315, polar 75, radius 3.2, fovy 20) in albedo
mode, and score against the analytic ground truth: silhouette IoU (opacity > 0.5; also after
the best uniform rescaling), colour error inside the ground-truth mask, and 3D R-precision over
all 80 captions. Writes ``results.json``, ``results.md`` and ``contact_sheet.png``.

    python scripts/eval_3d.py --out eval3d [--prompts 0 5 12] [--device cpu|cuda] [-- extra main.py args]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from main import configs_from, parse_args  # noqa: E402
from main import main as run_main  # noqa: E402
from nerf.fields import build_field  # noqa: E402
from shapes.metrics import (  # noqa: E402
    colour_error,
    eval_cameras,
    gt_albedo_bank,
    mask_iou,
    r_precision,
    rescaled_silhouette_iou,
)
from shapes.scene import BENCHMARK, HELD_OUT, caption, caption_index  # noqa: E402


def render_result(args_list: list[str], device: torch.device, H: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Opacity [8,N] and albedo [8,N,3] of a finished run's EMA weights (``df.pth``)."""
    opt, _ = parse_args(args_list)
    cfg = configs_from(opt)
    model = build_field(cfg.field, cfg.renderer, cfg.nerf_speed).to(device)
    ckpt = torch.load(Path(opt.workspace) / "checkpoints" / "df.pth", map_location=device, weights_only=True)
    model.load_state_dict(ckpt["model"])
    model.eval()
    cams = eval_cameras(H, device=device)
    with torch.no_grad():
        out = model.render(
            cams["rays_o"],
            cams["rays_d"],
            shading="albedo",
            bg_color=torch.zeros(3, device=device),
            max_ray_batch=8192,
        )
    alpha = out["weights_sum"].float().cpu()
    albedo = (out["image"].float().cpu() / alpha[..., None].clamp(min=1e-4)).clamp(0, 1)
    return alpha, albedo


def report(rows: list[dict], sheet_rows: list[torch.Tensor], out: Path, device: torch.device) -> None:
    """Write results.json, results.md and contact_sheet.png for the runs so far."""
    ok = [r for r in rows if "error" not in r]

    def mean(key, sel):
        v = [r[key] for r in ok if sel(r)]
        return float(np.mean(v)) if v else float("nan")

    summary = {}
    for name, sel in (
        ("all", lambda r: True),
        ("held_out", lambda r: r["held_out"]),
        ("training", lambda r: not r["held_out"]),
    ):
        summary[name] = {
            k: mean(k, sel) for k in ("iou", "iou_rescaled", "colour_error", "r_precision", "seconds")
        }
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    meta = {"command": "python " + " ".join(sys.argv), "device": dev, "torch": torch.__version__}
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=2))
    lines = [
        f"Command: `{meta['command']}` on {dev}.",
        "",
        "| prompt | held out | IoU | IoU rescaled (scale) | colour error | R-precision | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['prompt']} | | {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['prompt']} | {'yes' if r['held_out'] else 'no'} | {r['iou']:.3f} | "
            f"{r['iou_rescaled']:.3f} ({r['best_scale']:.2f}) | {r['colour_error']:.3f} | "
            f"{r['r_precision']:.2f} | {r['seconds']:.0f} |"
        )
    lines += [
        "",
        "| subset | IoU | IoU rescaled | colour error | R-precision | s per run |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['iou']:.3f} | {s['iou_rescaled']:.3f} | {s['colour_error']:.3f} | "
            f"{s['r_precision']:.2f} | {s['seconds']:.0f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    if sheet_rows:
        from PIL import Image

        sheet = torch.cat(sheet_rows, 0).clamp(0, 1).numpy()
        Image.fromarray((sheet * 255).round().astype(np.uint8)).save(out / "contact_sheet.png")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="eval3d", help="output folder (runs in <out>/runs/<k>)")
    ap.add_argument("--prompts", type=int, nargs="*", default=None, help="benchmark indices (default all 20)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=64, help="evaluation render size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="more main.py arguments after --")
    args = ap.parse_args()
    extra = [a for a in args.extra if a != "--"]
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cams = eval_cameras(args.size, device="cpu")
    bank_masks, bank_rgb = gt_albedo_bank(cams["rays_o"], cams["rays_d"])

    rows, sheet_rows = [], []
    for k in args.prompts if args.prompts is not None else range(len(BENCHMARK)):
        obj, col = BENCHMARK[k]
        text = caption(obj, col)
        ws = out / "runs" / f"{k:02d}"
        run_args = [
            "--sd_version",
            "builtin",
            "--text",
            text,
            "--workspace",
            str(ws),
            "-O",
            "--seed",
            str(args.seed),
            "--device",
            str(device),
            "--quiet",
            "--ckpt",
            "scratch",
            *extra,
        ]
        t0 = time.time()
        rc = run_main(run_args)
        secs = time.time() - t0
        if rc != 0:
            rows.append({"k": k, "prompt": text, "error": f"main.py exited {rc}"})
            continue
        alpha, albedo = render_result(run_args, device, args.size)
        target = caption_index(obj, col)
        gt_mask, gt_rgb = bank_masks[target], bank_rgb[target]
        iou = float(mask_iou(alpha > 0.5, gt_mask).mean())
        iou_s, scale = rescaled_silhouette_iou(alpha, obj, cams["rays_o"], cams["rays_d"])
        cerr = colour_error(albedo, gt_rgb, gt_mask)
        rprec, retrieved = r_precision(
            alpha > 0.5, albedo * (alpha > 0.5)[..., None], target, bank_masks, bank_rgb
        )
        rows.append(
            {
                "k": k,
                "prompt": text,
                "held_out": (obj, col) in HELD_OUT,
                "iou": iou,
                "iou_rescaled": iou_s,
                "best_scale": scale,
                "colour_error": cerr,
                "r_precision": rprec,
                "retrieved": [caption(int(i) // 8, int(i) % 8) for i in retrieved],
                "seconds": secs,
            }
        )
        print(
            f"[{k:02d}] {text}: IoU {iou:.3f} (rescaled {iou_s:.3f} at x{scale:.2f}), colour error {cerr:.3f}, "
            f"R-precision {rprec:.2f}, {secs:.0f} s",
            flush=True,
        )
        S = args.size
        views = [0, 2, 4, 6]  # azimuth 0, 90, 180, 270
        res = [(albedo[v] * alpha[v, :, None] + (1 - alpha[v, :, None])).reshape(S, S, 3) for v in views]
        gt = [torch.where(gt_mask[v, :, None], gt_rgb[v], torch.ones(3)).reshape(S, S, 3) for v in views]
        sheet_rows.append(torch.cat(res + gt, 1))

        report(rows, sheet_rows, out, device)


if __name__ == "__main__":
    main()
