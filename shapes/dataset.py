"""Training pairs (64x64 image, caption) for the built-in prior, generated on the GPU.

Geometry (normals and part ids) is traced once per (object, camera) at ``supersample`` x
the output resolution and kept on the device; every ``sample`` call then draws a training
pair (held-out pairs never), a colour, a light, an ambient ratio and a background, shades
and box-filters down to 64x64. So lighting and background never repeat, while the
expensive tracing is paid once.

Cameras: ``rand_poses`` over the default polar (45..105) and azimuth (-180..180) ranges,
radius fixed at 3.2 and fovy at 20 (the default view's). Captions are
``view_prompt(caption, get_view_direction(theta, phi, 30, 60))``, exactly what SDS asks.

Lighting (documented choice): with probability ``p_albedo`` (0.2) the ambient ratio is 1
(the albedo image, which SDS sees in its albedo phase); otherwise it is uniform in
[0.1, 1]. The light is ``normalize(camera_position + N(0, I))``. The background is a
uniform random RGB colour per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nerf.provider import (
    CameraRanges,
    get_rays,
    get_view_direction,
    intrinsics_from_fovy,
    rand_poses,
    view_prompt,
)
from shapes.scene import (
    CAPTIONS,
    N_COLOURS,
    N_OBJECTS,
    TRAIN_PAIRS,
    caption_index,
    light_near_camera,
    part_albedo,
    trace,
)

RADIUS, FOVY = 3.2, 20.0
ANGLE_OVERHEAD, ANGLE_FRONT = 30.0, 60.0
TRAIN_RANGES = CameraRanges(
    radius=(RADIUS, RADIUS), theta=(45.0, 105.0), phi=(-180.0, 180.0), fovy=(FOVY, FOVY)
)
N_VIEW_CLASSES = 6  # get_view_direction's classes


def full_caption(obj: int, colour: int, view: int) -> str:
    """The caption with the view suffix that SDS appends for view class ``view``."""
    return view_prompt(CAPTIONS[caption_index(obj, colour)], view)


def all_captions() -> list[str]:
    """Every (object, colour, view class) caption; index ((obj * 8) + colour) * 6 + view."""
    return [
        full_caption(o, c, v)
        for o in range(N_OBJECTS)
        for c in range(N_COLOURS)
        for v in range(N_VIEW_CLASSES)
    ]


class ShapesData:
    """On-device generator of (image, caption) training pairs.

    Args:
        views_per_object: cameras traced per object.
        res: output resolution (64).
        supersample: tracing resolution factor (anti-aliasing by box filter).
        pairs: (object, colour) pairs to draw from; default the 70 training pairs.
    """

    def __init__(
        self,
        views_per_object: int = 2000,
        *,
        res: int = 64,
        supersample: int = 2,
        pairs: tuple[tuple[int, int], ...] = TRAIN_PAIRS,
        device: str | torch.device = "cpu",
        seed: int = 0,
        chunk: int = 256,
        p_albedo: float = 0.2,
    ):
        self.device = torch.device(device)
        self.res, self.ss = res, supersample
        self.pairs = torch.tensor(pairs, device=self.device)  # [P,2]
        self.p_albedo = p_albedo
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        torch.manual_seed(seed)  # rand_poses draws from the global generator
        S = res * supersample
        V = views_per_object
        self.normal = torch.empty(N_OBJECTS, V, S * S, 3, dtype=torch.float16, device=self.device)
        self.part = torch.empty(N_OBJECTS, V, S * S, dtype=torch.uint8, device=self.device)
        self.cam_pos = torch.empty(N_OBJECTS, V, 3, device=self.device)
        self.view = torch.empty(N_OBJECTS, V, dtype=torch.long, device=self.device)
        for o in range(N_OBJECTS):
            cams = rand_poses(V, TRAIN_RANGES, device=self.device)
            self.cam_pos[o] = cams["poses"][:, :3, 3]
            self.view[o] = get_view_direction(cams["theta"], cams["phi"], ANGLE_OVERHEAD, ANGLE_FRONT)
            for s in range(0, V, chunk):
                e = min(V, s + chunk)
                intr = intrinsics_from_fovy(cams["fovy"][s:e], S, S)
                ro, rd = get_rays(cams["poses"][s:e], intr, S, S)
                g = trace(o, ro, rd)
                self.normal[o, s:e] = g["normal"].half()
                self.part[o, s:e] = g["part"]
        # Albedo table [O, C, 4, 3] indexed by part id.
        self.albedo = torch.stack(
            [
                torch.stack([part_albedo(o, c, self.device) for c in range(N_COLOURS)])
                for o in range(N_OBJECTS)
            ]
        )
        self.views_per_object = V

    def sample(self, batch: int) -> dict[str, torch.Tensor]:
        """A batch of training pairs.

        Returns dict: ``image`` [B,3,res,res] in [0,1]; ``obj``, ``colour``, ``view`` [B]
        (view = ``get_view_direction`` class); ``caption_id`` [B] (index into
        ``all_captions()``).
        """
        g, dev = self.gen, self.device
        k = torch.randint(len(self.pairs), (batch,), generator=g, device=dev)
        obj, col = self.pairs[k, 0], self.pairs[k, 1]
        vi = torch.randint(self.views_per_object, (batch,), generator=g, device=dev)
        normal = self.normal[obj, vi].float()  # [B,S*S,3]
        part = self.part[obj, vi].long()  # [B,S*S]
        albedo = self.albedo[obj, col].gather(1, part[..., None].expand(-1, -1, 3))
        mask = part > 0
        light = light_near_camera(self.cam_pos[obj, vi], generator=g)
        ambient = torch.rand(batch, generator=g, device=dev) * 0.9 + 0.1
        ambient = torch.where(
            torch.rand(batch, generator=g, device=dev) < self.p_albedo, torch.ones_like(ambient), ambient
        )
        bg = torch.rand(batch, 3, generator=g, device=dev)
        lam = (normal * light[:, None]).sum(-1, keepdim=True).clamp(min=0)
        rgb = albedo * (ambient[:, None, None] + (1 - ambient[:, None, None]) * lam)
        rgb = torch.where(mask[..., None], rgb, bg[:, None])
        S = self.res * self.ss
        img = rgb.reshape(batch, S, S, 3).permute(0, 3, 1, 2)
        if self.ss > 1:
            img = F.avg_pool2d(img, self.ss)
        view = self.view[obj, vi]
        return {
            "image": img.contiguous(),
            "obj": obj,
            "colour": col,
            "view": view,
            "caption_id": (obj * N_COLOURS + col) * N_VIEW_CLASSES + view,
        }
