"""Randomly initialised Stable Diffusion models of the real classes, written in diffusers'
folder layout, for tests, benchmarks and GPU smoke runs where no weights can be downloaded.

``build_sd(path, "tiny")`` makes a model small enough for CPU tests; ``"sd2.1-base"`` has the
exact Stable Diffusion 2.1-base architecture (same compute as the real one, random weights).

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as d:
...     p = build_sd(d, "tiny")
...     sorted(x.name for x in p.iterdir())[:3]
['model_index.json', 'scheduler', 'text_encoder']
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level BPE alphabet: every byte mapped to a printable character."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_char_tokenizer(path: str | Path, model_max_length: int = 77) -> Path:
    """A real ``CLIPTokenizer`` folder whose vocabulary is the byte alphabet (no merges):
    every word is tokenised into characters. Enough for tests; not for quality."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    cfg = {
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "special_tokens_map.json").write_text(
        json.dumps({k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")})
    )
    return path


CONFIGS = {
    "tiny": dict(
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        vae=dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32),
        unet=dict(
            sample_size=16,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        ),
    ),
    # Stable Diffusion 2.1-base (512x512 images, 64x64 latents, OpenCLIP ViT-H text tower).
    "sd2.1-base": dict(
        text=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            hidden_act="gelu",
            projection_dim=512,
        ),
        vae=dict(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512
        ),
        unet=dict(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
            norm_num_groups=32,
        ),
    ),
}


def random_vae(config: str = "tiny"):
    """The ``AutoencoderKL`` of a ``CONFIGS`` entry with random weights (in memory).

    >>> random_vae("tiny").config.latent_channels
    4
    """
    from diffusers import AutoencoderKL

    spec = CONFIGS[config]
    n = len(spec["vae"]["block_out_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        **spec["vae"],
    )


def build_sd(path: str | Path, config: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight SD model (tokenizer, text encoder, VAE, UNet, DDIM scheduler)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = CONFIGS[config]
    path = Path(path)
    torch.manual_seed(seed)
    write_char_tokenizer(path / "tokenizer")
    vocab_size = len(json.loads((path / "tokenizer" / "vocab.json").read_text()))
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            **spec["text"],
        )
    )
    text.save_pretrained(path / "text_encoder")
    random_vae(config).save_pretrained(path / "vae")
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
    unet.save_pretrained(path / "unet")
    DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    ).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "scheduler": ["diffusers", "DDIMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            },
            indent=2,
        )
    )
    return path
