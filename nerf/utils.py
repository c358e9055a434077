"""Small shared helpers, and the names stable-dreamfusion users look for here.

The Trainer lives in ``nerf/trainer.py`` (``Trainer``, ``TrainerConfig``); its parts in
``nerf/losses.py`` (regularizers), ``nerf/step_gate.py`` (non-finite steps),
``nerf/checkpoint.py`` and ``nerf/outputs.py``. They are re-exported here, so
``from nerf.utils import Trainer`` keeps working.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from .checkpoint import CheckpointError, atomic_save, load_checkpoint
from .losses import weight_entropy
from .outputs import write_image, write_video
from .step_gate import TrainingDiverged
from .trainer import Trainer, TrainerConfig

__all__ = [
    "CheckpointError",
    "Trainer",
    "TrainerConfig",
    "TrainingDiverged",
    "atomic_save",
    "load_checkpoint",
    "seed_everything",
    "weight_entropy",
    "write_image",
    "write_video",
]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every GPU) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
