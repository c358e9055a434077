"""3D quality metrics against the analytic ground truth.

Match distance (used by 3D R-precision and by the 2D benchmark):

    d(a, b) = (1 - IoU(mask_a, mask_b)) + rms_chroma(a, b)

where ``rms_chroma`` compares per-pixel chromaticity ``rgb / max(r, g, b)`` on the pixels
inside both masks, as a root-mean-square over pixels and channels, weighted per pixel by
``max_a * max_b`` (so near-black pixels, whose chromaticity is noise, count little). It is
1 when the masks do not overlap. Chromaticity makes the colour term blind to Lambertian
shading (which scales r, g, b alike), so the same distance scores albedo renders and shaded
2D samples. The two terms have comparable ranges: the closest colour pair (red / orange)
differs by about 0.24 in rms chromaticity, different objects by 0.1 to 0.7 in 1 - IoU.
"""

from __future__ import annotations

import torch

from nerf.provider import circle_poses, get_rays, intrinsics_from_fovy
from shapes.scene import N_COLOURS, N_OBJECTS, part_albedo, trace

EVAL_AZIMUTHS = tuple(float(a) for a in range(0, 360, 45))
EVAL_POLAR, EVAL_RADIUS, EVAL_FOVY = 75.0, 3.2, 20.0


def eval_cameras(H: int = 64, W: int | None = None, device: str | torch.device = "cpu") -> dict:
    """The 8 evaluation cameras: azimuth 0, 45, ..., 315, polar 75, radius 3.2, fovy 20.

    Returns dict: ``poses`` [8,4,4], ``rays_o``/``rays_d`` [8,H*W,3], ``azimuth``, ``polar``,
    ``radius``, ``fovy`` [8], ``H``, ``W``. Render the NeRF in albedo mode at these.
    """
    W = W or H
    n = len(EVAL_AZIMUTHS)
    az = torch.tensor(EVAL_AZIMUTHS, device=device)
    polar = torch.full((n,), EVAL_POLAR, device=device)
    radius = torch.full((n,), EVAL_RADIUS, device=device)
    fovy = torch.full((n,), EVAL_FOVY, device=device)
    poses = circle_poses(radius, polar, az, device)
    rays_o, rays_d = get_rays(poses, intrinsics_from_fovy(fovy, H, W), H, W)
    return {
        "poses": poses,
        "rays_o": rays_o,
        "rays_d": rays_d,
        "azimuth": az,
        "polar": polar,
        "radius": radius,
        "fovy": fovy,
        "H": H,
        "W": W,
    }


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-view IoU of boolean masks [V,...] -> [V] (1 where both are empty)."""
    a, b = a.reshape(a.shape[0], -1).bool(), b.reshape(b.shape[0], -1).bool()
    inter = (a & b).sum(-1).float()
    union = (a | b).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def silhouette_iou(opacity: torch.Tensor, gt_mask: torch.Tensor, threshold: float = 0.5):
    """Mean over views of IoU(opacity > threshold, gt_mask); opacity, gt_mask [V,N]."""
    return float(mask_iou(opacity > threshold, gt_mask).mean())


def rescaled_silhouette_iou(
    opacity: torch.Tensor,
    obj: int,
    rays_o: torch.Tensor,
    rays_d: torch.Tensor,
    scales: torch.Tensor | None = None,
    threshold: float = 0.5,
) -> tuple[float, float]:
    """Best mean IoU over uniform rescalings s of the GT object about the origin.

    opacity [V,N]; rays [V,N,3]. Scaling the object by s is tracing the rays from o / s.
    ``scales`` defaults to 0.5..2.0 in 61 log-spaced steps. Returns (best IoU, its scale).
    """
    if scales is None:
        scales = torch.logspace(-0.30103, 0.30103, 61)
    pred = opacity > threshold
    best, best_s = -1.0, 1.0
    for s in scales.tolist():
        m = trace(obj, rays_o / s, rays_d)["mask"]
        iou = float(mask_iou(pred, m).mean())
        if iou > best:
            best, best_s = iou, s
    return best, best_s


def colour_error(albedo: torch.Tensor, gt_albedo: torch.Tensor, gt_mask: torch.Tensor) -> float:
    """Mean absolute albedo difference (over pixels and channels) inside the GT mask.

    albedo, gt_albedo [V,N,3]; gt_mask [V,N].
    """
    m = gt_mask.bool()
    if not bool(m.any()):
        return 0.0
    return float((albedo - gt_albedo).abs()[m].mean())


def chroma(rgb: torch.Tensor, eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(rgb / max channel, max channel) for rgb [...,3]."""
    mx = rgb.amax(-1, keepdim=True)
    return rgb / mx.clamp(min=eps), mx[..., 0]


def match_distances(
    mask_q: torch.Tensor, rgb_q: torch.Tensor, mask_r: torch.Tensor, rgb_r: torch.Tensor
) -> torch.Tensor:
    """All-pairs match distance (module docstring) between queries and references.

    mask_q [Q,N] bool, rgb_q [Q,N,3]; mask_r [R,N] bool, rgb_r [R,N,3]. Returns [Q,R].
    Written as matrix products, so thousands of pairs are cheap on a CPU.
    """
    mq, mr = mask_q.float(), mask_r.float()
    inter = mq @ mr.T
    union = mq.sum(1, keepdim=True) + mr.sum(1)[None] - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    cq, bq = chroma(rgb_q.float())
    cr, br = chroma(rgb_r.float())
    wq, wr = mq * bq, mr * br  # [Q,N], [R,N]
    wsum = wq @ wr.T
    # sum_n wq wr |cq - cr|^2 = sum wq|cq|^2 wr + wq wr|cr|^2 - 2 sum_k (wq cq_k)(wr cr_k)
    sq = wq * (cq * cq).sum(-1)
    sr = wr * (cr * cr).sum(-1)
    cross = sum((wq * cq[..., k]) @ (wr * cr[..., k]).T for k in range(3))
    num = (sq @ wr.T + wq @ sr.T - 2 * cross).clamp(min=0)
    rms = torch.sqrt(num / (3 * wsum.clamp(min=1e-8)))
    rms = torch.where(wsum > 1e-6, rms.clamp(max=1), torch.ones_like(rms))
    return (1 - iou) + rms


def gt_albedo_bank(rays_o: torch.Tensor, rays_d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Albedo renders of all 80 captions at the given cameras (rays [V,N,3]).

    Returns masks [80,V,N] bool and albedo [80,V,N,3] (0 outside the mask), caption index
    obj * 8 + colour. Each object is traced once and coloured 8 ways.
    """
    masks, albedos = [], []
    for o in range(N_OBJECTS):
        g = trace(o, rays_o, rays_d)
        part = g["part"].long()
        for c in range(N_COLOURS):
            masks.append(g["mask"])
            albedos.append(part_albedo(o, c, rays_o.device)[part])
    return torch.stack(masks), torch.stack(albedos)


def r_precision(
    mask: torch.Tensor,
    rgb: torch.Tensor,
    target: int,
    bank_masks: torch.Tensor,
    bank_rgb: torch.Tensor,
) -> tuple[float, torch.Tensor]:
    """3D R-precision of one result: the fraction of views whose best match is ``target``.

    mask [V,N] bool (e.g. opacity > 0.5), rgb [V,N,3] (albedo render); bank_masks [C,V,N],
    bank_rgb [C,V,N,3] from ``gt_albedo_bank`` at the same cameras. Returns (fraction,
    retrieved caption index per view [V]).
    """
    V = mask.shape[0]
    retrieved = torch.empty(V, dtype=torch.long)
    for v in range(V):
        d = match_distances(mask[v : v + 1], rgb[v : v + 1], bank_masks[:, v], bank_rgb[:, v])
        retrieved[v] = int(d[0].argmin())
    return float((retrieved == target).float().mean()), retrieved
