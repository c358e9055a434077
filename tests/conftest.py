"""Shared fixtures: a tiny random Stable Diffusion written in diffusers' layout, and small
run options that keep the real pipeline to seconds on a 2-core CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

from nerf.representation import nerf_configs  # noqa: E402, F401 - tests import it from here

# Options of a tiny but complete run (grid backbone, occupancy grid, 16x16 renders).
TINY_RUN = [
    "--w",
    "16",
    "--h",
    "16",
    "--W",
    "24",
    "--H",
    "24",
    "--dataset_size_train",
    "10",
    "--dataset_size_valid",
    "2",
    "--dataset_size_test",
    "3",
    "--grid_levels",
    "4",
    "--grid_log2_size",
    "12",
    "--grid_finest",
    "64",
    "--grid_size",
    "32",
    "--max_steps",
    "64",
    "--quiet",
]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A random-weight SD model (real diffusers/transformers classes) saved with save_pretrained."""
    from guidance.sd_factory import build_sd

    return build_sd(tmp_path_factory.mktemp("tiny_sd"), "tiny")


@pytest.fixture()
def embed_cache(tmp_path, monkeypatch) -> Path:
    """Keep text-embedding caches inside the test's folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path / ".cache" / "dreamfusion" / "text_embeds"
