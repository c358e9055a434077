"""The built-in prior's world: ten analytic objects, eight colours, captions, a GT renderer.

Geometry follows ``docs/builtin-prior.md`` / the spec (y up, front faces +z, every object
inside a sphere of radius 0.6). Each object is an exact signed distance function (or a
conservative lower bound where a part is clipped by a half-space), rendered by sphere
tracing to a 1e-4 tolerance: far below a pixel (a 64x64 pixel at radius 3.2 / fovy 20 is
about 0.018 scene units wide).

Shading is the NeRF's Lambertian model,
``rgb = albedo * (ambient + (1 - ambient) * max(0, n . l))``, composited over a solid
background colour.
"""

from __future__ import annotations

import torch

from nerf.provider import safe_normalize

OBJECTS = (
    "sphere",
    "cube",
    "cylinder",
    "cone",
    "torus",
    "mug",
    "house",
    "snowman",
    "table",
    "mushroom",
)
COLOUR_NAMES = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white")
COLOURS = torch.tensor(
    [
        [0.85, 0.10, 0.10],
        [0.95, 0.50, 0.10],
        [0.95, 0.85, 0.15],
        [0.15, 0.70, 0.20],
        [0.15, 0.30, 0.85],
        [0.55, 0.20, 0.75],
        [0.95, 0.50, 0.70],
        [0.92, 0.92, 0.92],
    ]
)
N_OBJECTS, N_COLOURS = len(OBJECTS), len(COLOUR_NAMES)

# Fixed part colours (part 0 is background, part 1 follows the prompt's colour).
ROOF_GREY = (0.3, 0.3, 0.3)
DOOR_BROWN = (0.35, 0.2, 0.1)
NOSE_ORANGE = (0.95, 0.5, 0.1)
EYE_BLACK = (0.02, 0.02, 0.02)
STEM_WHITE = (0.92, 0.92, 0.92)
# [object] -> colours of parts 2 and 3 (None: unused).
_FIXED_PARTS: dict[int, tuple] = {
    6: (ROOF_GREY, DOOR_BROWN),
    7: (NOSE_ORANGE, EYE_BLACK),
    9: (STEM_WHITE, None),
}

BOUND = 0.62  # tracing starts where the ray enters this sphere (objects fit in r = 0.6)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(obj: int, colour: int) -> str:
    """'a red sphere', 'an orange cube', ... (no view suffix)."""
    c = COLOUR_NAMES[colour]
    return f"{article(c)} {c} {OBJECTS[obj]}"


# Caption index = obj * 8 + colour.
CAPTIONS: tuple[str, ...] = tuple(caption(o, c) for o in range(N_OBJECTS) for c in range(N_COLOURS))


def caption_index(obj: int, colour: int) -> int:
    return obj * N_COLOURS + colour


HELD_OUT: tuple[tuple[int, int], ...] = tuple(
    (OBJECTS.index(o), COLOUR_NAMES.index(c))
    for o, c in [
        ("sphere", "purple"),
        ("cube", "yellow"),
        ("cylinder", "pink"),
        ("cone", "blue"),
        ("torus", "green"),
        ("mug", "orange"),
        ("house", "white"),
        ("snowman", "red"),
        ("table", "blue"),
        ("mushroom", "pink"),
    ]
)
TRAIN_PAIRS: tuple[tuple[int, int], ...] = tuple(
    (o, c) for o in range(N_OBJECTS) for c in range(N_COLOURS) if (o, c) not in HELD_OUT
)
# The 20 benchmark prompts: the held-out pairs, then object i with colour (i + 3) mod 8.
BENCHMARK: tuple[tuple[int, int], ...] = HELD_OUT + tuple((i, (i + 3) % N_COLOURS) for i in range(N_OBJECTS))


# ----------------------------------------------------------------------------- SDF pieces
def _len(*xs: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(sum(x * x for x in xs))


def sd_sphere(p: torch.Tensor, c: tuple[float, float, float], r: float) -> torch.Tensor:
    return _len(p[..., 0] - c[0], p[..., 1] - c[1], p[..., 2] - c[2]) - r


def sd_box(p: torch.Tensor, c: tuple[float, float, float], h: tuple[float, float, float]):
    """Exact SDF of an axis-aligned box with centre ``c`` and half sizes ``h``; p [...,3]."""
    q = [(p[..., k] - c[k]).abs() - h[k] for k in range(3)]
    outside = _len(*(x.clamp(min=0) for x in q))
    inside = torch.maximum(torch.maximum(q[0], q[1]), q[2]).clamp(max=0)
    return outside + inside


def sd_box2(u: torch.Tensor, v: torch.Tensor, hu: float, hv: float) -> torch.Tensor:
    """Exact 2D SDF of the rectangle |u| <= hu, |v| <= hv."""
    qu, qv = u.abs() - hu, v.abs() - hv
    return _len(qu.clamp(min=0), qv.clamp(min=0)) + torch.maximum(qu, qv).clamp(max=0)


def sd_triangle2(u: torch.Tensor, v: torch.Tensor, pts) -> torch.Tensor:
    """Exact 2D SDF of a triangle with vertices ``pts`` (3 (u, v) pairs)."""
    d2 = None
    signs = []
    for k in range(3):
        (au, av), (bu, bv) = pts[k], pts[(k + 1) % 3]
        eu, ev = bu - au, bv - av
        wu, wv = u - au, v - av
        t = ((wu * eu + wv * ev) / (eu * eu + ev * ev)).clamp(0, 1)
        dk = (wu - eu * t) ** 2 + (wv - ev * t) ** 2
        d2 = dk if d2 is None else torch.minimum(d2, dk)
        signs.append(eu * wv - ev * wu)
    s0, s1, s2 = signs
    inside = ((s0 >= 0) & (s1 >= 0) & (s2 >= 0)) | ((s0 <= 0) & (s1 <= 0) & (s2 <= 0))
    d = torch.sqrt(d2)
    return torch.where(inside, -d, d)


def extrude(d2: torch.Tensor, w: torch.Tensor, h: float) -> torch.Tensor:
    """Exact SDF of a 2D shape (SDF ``d2``) extruded to |w| <= h."""
    qw = w.abs() - h
    return torch.maximum(d2, qw).clamp(max=0) + _len(d2.clamp(min=0), qw.clamp(min=0))


def _radial_y(p: torch.Tensor) -> torch.Tensor:
    return _len(p[..., 0], p[..., 2])


def object_parts(obj: int, p: torch.Tensor) -> list[torch.Tensor]:
    """Signed distances [...] of each coloured part of object ``obj`` at points p [...,3].

    Part k of the list is colour part k+1 (part 1 follows the prompt; see ``part_albedo``).
    """
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    if obj == 0:  # sphere
        return [sd_sphere(p, (0, 0, 0), 0.5)]
    if obj == 1:  # cube
        return [sd_box(p, (0, 0, 0), (0.325, 0.325, 0.325))]
    if obj == 2:  # cylinder
        return [sd_box2(_radial_y(p), y, 0.35, 0.45)]
    if obj == 3:  # cone: the revolved profile is the triangle in the (r, y) plane
        return [sd_triangle2(_radial_y(p), y, ((-0.4, -0.4), (0.4, -0.4), (0.0, 0.4)))]
    if obj == 4:  # torus, ring in the xy plane (axis z)
        return [_len(_len(x, y) - 0.38, z) - 0.13]
    if obj == 5:  # mug
        body = sd_box2(_radial_y(p), y, 0.3, 0.3)
        ring = _len(_len(x - 0.3, y) - 0.17, z) - 0.05
        handle = torch.maximum(ring, 0.3 - x)  # the x >= 0.3 half (a lower bound: safe)
        return [torch.minimum(body, handle)]
    if obj == 6:  # house
        body = sd_box(p, (0, -0.125, 0), (0.35, 0.225, 0.28))
        roof = extrude(sd_triangle2(x, y, ((-0.4, 0.1), (0.4, 0.1), (0.0, 0.45))), z, 0.325)
        door = sd_box(p, (0, -0.21, 0.28), (0.08, 0.14, 0.015))
        return [body, roof, door]
    if obj == 7:  # snowman
        body = torch.minimum(
            torch.minimum(sd_sphere(p, (0, -0.3, 0), 0.28), sd_sphere(p, (0, 0.1, 0), 0.2)),
            sd_sphere(p, (0, 0.38, 0), 0.14),
        )
        nose = sd_triangle2(_len(x, y - 0.38), z, ((-0.03, 0.12), (0.03, 0.12), (0.0, 0.26)))
        eyes = torch.minimum(
            sd_sphere(p, (0.05, 0.42, 0.125), 0.025), sd_sphere(p, (-0.05, 0.42, 0.125), 0.025)
        )
        return [body, nose, eyes]
    if obj == 8:  # table
        d = sd_box(p, (0, 0.1, 0), (0.45, 0.03, 0.3))
        for sx in (-0.36, 0.36):
            for sz in (-0.21, 0.21):
                d = torch.minimum(d, sd_box(p, (sx, -0.14, sz), (0.03, 0.21, 0.03)))
        return [d]
    if obj == 9:  # mushroom
        cap = torch.maximum(sd_sphere(p, (0, 0, 0), 0.4), -y)
        stem = sd_box2(_radial_y(p), y + 0.225, 0.12, 0.225)
        return [cap, stem]
    raise ValueError(f"unknown object {obj}")


def object_sdf(obj: int, p: torch.Tensor) -> torch.Tensor:
    """Signed distance [...] (a lower bound where parts are clipped) to object ``obj``."""
    parts = object_parts(obj, p)
    d = parts[0]
    for q in parts[1:]:
        d = torch.minimum(d, q)
    return d


def part_albedo(obj: int, colour: int | torch.Tensor, device=None) -> torch.Tensor:
    """Albedo table [4,3] (colour scalar) or [B,4,3] (colour [B]): part 0 bg (black), 1..3."""
    device = device or (colour.device if isinstance(colour, torch.Tensor) else "cpu")
    col = COLOURS.to(device)
    base = col[colour] if isinstance(colour, torch.Tensor) else col[int(colour)]
    fixed = _FIXED_PARTS.get(obj, (None, None))
    extra = [torch.tensor(f if f is not None else (0.0, 0.0, 0.0), device=device) for f in fixed]
    if base.dim() == 1:
        return torch.stack([torch.zeros(3, device=device), base, *extra])
    B = base.shape[0]
    rows = [torch.zeros(B, 3, device=device), base] + [e.expand(B, 3) for e in extra]
    return torch.stack(rows, 1)


# ----------------------------------------------------------------------------- tracing
@torch.no_grad()
def trace(
    obj: int,
    rays_o: torch.Tensor,
    rays_d: torch.Tensor,
    *,
    max_steps: int = 160,
    eps: float = 1e-4,
    hit_tol: float = 1e-3,
) -> dict[str, torch.Tensor]:
    """Sphere-trace object ``obj`` along rays [...,3] (unit directions).

    Returns ``mask`` [...] bool, ``depth`` [...] (distance along the ray; 0 on misses),
    ``normal`` [...,3] (unit; 0 on misses) and ``part`` [...] uint8 (0 = background).
    A ray counts as a hit when it converges to |sdf| < ``hit_tol`` (1e-3, ~0.06 pixel at
    64x64 / fovy 20 / radius 3.2): grazing rays converge slowly, and this bounds their
    silhouette error far below a pixel.
    """
    shape = rays_o.shape[:-1]
    o = rays_o.reshape(-1, 3).float()
    d = rays_d.reshape(-1, 3).float()
    # Entry/exit of the bounding sphere.
    b = (o * d).sum(-1)
    c = (o * o).sum(-1) - BOUND**2
    disc = b * b - c
    valid = disc > 0
    sq = torch.sqrt(disc.clamp(min=0))
    t = (-b - sq).clamp(min=0)
    t_far = -b + sq
    done = ~valid
    dist = torch.full_like(t, 1e9)
    for step in range(max_steps):
        p = o + t[:, None] * d
        dist = object_sdf(obj, p)
        t = torch.where(done, t, t + dist)
        done = done | (dist.abs() < eps) | (t > t_far)
        if step % 16 == 15 and bool(done.all()):
            break
    mask = valid & (dist.abs() < hit_tol) & (t <= t_far)
    p = o + t[:, None] * d
    # Central differences: exact SDF gradients give the surface normal.
    h = 2e-4
    grads = []
    for k in range(3):
        e = torch.zeros(3, device=o.device)
        e[k] = h
        grads.append(object_sdf(obj, p + e) - object_sdf(obj, p - e))
    normal = safe_normalize(torch.stack(grads, -1)) * mask[:, None]
    parts = torch.stack(object_parts(obj, p), -1)
    part = (parts.argmin(-1) + 1).to(torch.uint8) * mask
    return {
        "mask": mask.reshape(shape),
        "depth": (t * mask).reshape(shape),
        "normal": normal.reshape(*shape, 3),
        "part": part.reshape(shape),
    }


def shade(
    albedo: torch.Tensor,
    normal: torch.Tensor,
    mask: torch.Tensor,
    light_dir: torch.Tensor,
    ambient: float | torch.Tensor,
    bg: torch.Tensor,
) -> torch.Tensor:
    """NeRF Lambertian shading composited over ``bg``.

    albedo, normal [B,N,3]; mask [B,N]; light_dir [B,3] (unit); ambient float or [B];
    bg [B,3]. Returns rgb [B,N,3].
    """
    amb = torch.as_tensor(ambient, dtype=albedo.dtype, device=albedo.device)
    amb = amb.reshape(-1, 1, 1) if amb.dim() else amb
    lam = (normal * light_dir[:, None, :]).sum(-1, keepdim=True).clamp(min=0)
    rgb = albedo * (amb + (1 - amb) * lam)
    return torch.where(mask[..., None], rgb, bg[:, None, :].to(rgb))


def light_near_camera(cam_pos: torch.Tensor, generator: torch.Generator | None = None):
    """Light directions [B,3] = normalize(camera_position + N(0, I)), as in NeRF training."""
    noise = torch.randn(cam_pos.shape, generator=generator, device=cam_pos.device)
    return safe_normalize(cam_pos + noise)


def render_gt(
    obj: int,
    colour: int,
    rays_o: torch.Tensor,
    rays_d: torch.Tensor,
    *,
    light_dir: torch.Tensor | None = None,
    ambient: float | torch.Tensor = 1.0,
    bg: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Ground-truth render of (object, colour).

    Args:
        rays_o, rays_d: [B,N,3] (unit directions), e.g. from ``nerf.provider.get_rays``.
        light_dir: [B,3] light directions; None: a headlight at the camera (rays_o[:, 0]).
        ambient: ambient ratio, float or [B]; 1 gives the albedo image.
        bg: [B,3] background colours; None: white.

    Returns:
        dict of rgb [B,N,3] (shaded, over bg), albedo [B,N,3] (over bg), mask [B,N] bool,
        depth [B,N] (ray distance, 0 on background), normal [B,N,3] (0 on background).
    """
    B = rays_o.shape[0]
    device = rays_o.device
    g = trace(obj, rays_o, rays_d)
    table = part_albedo(obj, colour, device)  # [4,3]
    albedo = table[g["part"].long()]
    if bg is None:
        bg = torch.ones(B, 3, device=device)
    if light_dir is None:
        light_dir = safe_normalize(rays_o[:, 0])
    rgb = shade(albedo, g["normal"], g["mask"], light_dir, ambient, bg)
    albedo = torch.where(g["mask"][..., None], albedo, bg[:, None, :])
    return {"rgb": rgb, "albedo": albedo, "mask": g["mask"], "depth": g["depth"], "normal": g["normal"]}
