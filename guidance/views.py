"""View-dependent conditioning: the discrete view classes, their prompt suffixes, and the
policy that turns a batch of cameras into text embeddings (``--view_prompt``).

The cameras (``nerf.provider``) classify each view (``dir``, one of ``FRONT`` ... ``BOTTOM``)
and compute blend weights over ``INTERP_VIEWS`` (``view_weights``); the guidance embeds the
prompts of ``conditioning_prompts`` once and picks, per batch, with ``view_embeddings``.
"""

from __future__ import annotations

import torch

# Discrete view classes (``nerf.provider.get_view_direction`` returns them).
FRONT, SIDE, BACK, SIDE_OTHER, OVERHEAD, BOTTOM = 0, 1, 2, 3, 4, 5
VIEW_NAMES = ("front", "side", "back", "side", "overhead", "bottom")
# The views whose embeddings the "interp" policy blends, in the order of ``view_weights``.
INTERP_VIEWS = ("front", "side", "back", "overhead", "bottom")
VIEW_POLICIES = ("interp", "discrete", "none")


def view_prompt(text: str, direction: int) -> str:
    """The discrete view-dependent prompt for a class from ``get_view_direction``.

    >>> view_prompt("a red cube", FRONT), view_prompt("a red cube", OVERHEAD)
    ('a red cube, front view', 'a red cube, overhead view')
    """
    return f"{text}, {VIEW_NAMES[int(direction)]} view"


def conditioning_prompts(text: str, negative: str) -> tuple[list[str], list[str]]:
    """(names, prompts) embedded once per run: the negative prompt ("uncond"), the prompt alone
    ("default") and one view-suffixed prompt per ``INTERP_VIEWS`` entry, in that order.

    >>> names, prompts = conditioning_prompts("a cube", "blurry")
    >>> names[:3], prompts[:3]
    (['uncond', 'default', 'front'], ['blurry', 'a cube', 'a cube, front view'])
    """
    classes = {"front": FRONT, "side": SIDE, "back": BACK, "overhead": OVERHEAD, "bottom": BOTTOM}
    names = ["uncond", "default"] + list(INTERP_VIEWS)
    prompts = [negative, text] + [view_prompt(text, classes[v]) for v in INTERP_VIEWS]
    return names, prompts


def view_embeddings(
    policy: str, embeddings: dict[str, torch.Tensor], cameras: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The CFG batch of text embeddings [2B,77,D] for a batch of cameras: the negative prompt
    for each view, then the view-dependent prompt chosen by ``policy``.

    Args:
        policy: "interp" blends the ``INTERP_VIEWS`` embeddings by ``cameras["view_weights"]``
            [B,5]; "discrete" takes the embedding of each view's class ``cameras["dir"]`` [B];
            "none" the prompt alone for every view.
        embeddings: [1,77,D] per name of ``conditioning_prompts``.
        cameras: a batch's camera tensors (``guidance.base.CAMERA_KEYS``; other keys ignored),
            ``polar`` [B] gives the batch size.

    >>> E = {n: torch.full((1, 1, 1), float(i)) for i, n in enumerate(conditioning_prompts("x", "")[0])}
    >>> cams = {"polar": torch.zeros(2), "dir": torch.tensor([FRONT, BACK]),
    ...         "view_weights": torch.tensor([[0.5, 0.5, 0, 0, 0], [0, 0, 1.0, 0, 0]])}
    >>> [view_embeddings(p, E, cams).flatten().tolist() for p in VIEW_POLICIES]
    [[0.0, 0.0, 2.5, 4.0], [0.0, 0.0, 2.0, 4.0], [0.0, 0.0, 1.0, 1.0]]
    """
    E = embeddings
    B = cameras["polar"].shape[0]
    if policy == "interp":
        w = cameras["view_weights"]  # interp_view_weights, computed with the cameras
        stack = torch.cat([E[v] for v in INTERP_VIEWS])  # [5,77,D]
        cond = torch.einsum("bk,kld->bld", w.to(stack.dtype), stack)
    elif policy == "discrete":
        cond = torch.cat([E[VIEW_NAMES[int(d)]] for d in cameras["dir"]])
    else:
        cond = E["default"].expand(B, -1, -1)
    return torch.cat([E["uncond"].expand(B, -1, -1), cond])
