"""Text-to-3D with Score Distillation Sampling: the one command-line entry point.

    python main.py --text "a hamburger" --workspace trial -O      # train
    python main.py --workspace trial -O --test [--save_mesh]      # 360-degree video (+ mesh)

Every option is documented where it is defined below; ``python main.py -h`` prints them.
Options that change other options print what they changed at start-up.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from common.config import add_config_arguments, from_namespace, option
from guidance import sd_utils  # noqa: F401 - registers --guidance SD (and its configs)
from guidance.base import REGISTRY, GuidanceConfig
from nerf.fast import NeRFSpeedConfig
from nerf.losses import LossConfig
from nerf.mesh import MeshConfig
from nerf.network_base import FieldConfig
from nerf.provider import CameraConfig
from nerf.renderer import RendererConfig
from nerf.representation import nerf_configs  # noqa: F401 - scripts import it from here
from nerf.trainer import TrainerConfig

BUILTIN_DEFAULTS = {
    # The built-in prior sees objects at one distance and field of view (docs/builtin-prior.md);
    # its run defaults match them. Chosen by measurement (docs/results.md) to fit a 2-core CPU:
    # 32x32 renders (the prior upsamples to its native 64), albedo shading (no normal passes),
    # a small hash grid and occupancy grid.
    "radius_range": [3.2, 3.2],
    "fovy_range": [20.0, 20.0],
    "w": 32,
    "h": 32,
    "W": 96,
    "H": 96,
    "guidance_scale": 20.0,
    "iters": 800,
    "dataset_size_train": 100,
    "dataset_size_valid": 4,
    "dataset_size_test": 36,
    "eval_interval": 4,
    "grid_levels": 8,
    "grid_log2_size": 14,
    "grid_finest": 256,
    "grid_size": 64,
    "max_steps": 128,
    "bg_radius": -1.0,
    "latent_iter_ratio": 0.0,
    "albedo_iter_ratio": 1.0,
    "lambda_orient": 0.0,
    "normal_method": "tetra",
    "mcubes_resolution": 128,
    "texture_size": 1024,
    "decimate_target": 20000,
}


# Speed levers that -O turns on (each measured faster and SDS-equivalent on an H100:
# docs/benchmarks.md, "SDS speed (H100)"); an explicit --no-<flag> keeps one off.
O_SPEED_DEFAULTS = {
    "unet_graph": True,
    "vae_graph": True,
    "compile_vae": True,
    "compile_unet": True,
    "channels_last": True,
    "vae_fused_gn": True,
    "unet_fused_qkv": True,
    "fused_mlp": True,
    "graph_render": True,
}


@dataclass(frozen=True)
class RunConfig:
    """What main.py itself does with a run (not a component's setting)."""

    seed: int = option(0, "random seed (the whole run is reproducible on a CPU)")
    test: bool = option(False, "render the 360-degree video from a checkpoint")
    six_views: bool = option(False, "with --test: also write 6 canonical views as PNG")
    save_mesh: bool = option(
        False, "export a textured mesh (docs/mesh.md): at the end of training, or with --test"
    )
    device: str = option("auto", "auto | cpu | cuda | cuda:N")


# Each component's config, as an option group of the command line (the guidance models'
# own configs follow, from guidance.base.REGISTRY).
CONFIG_GROUPS: list[tuple[str, type]] = [
    ("run", RunConfig),
    ("prompt and guidance", GuidanceConfig),
    ("training", TrainerConfig),
    ("regularizers and loss weights", LossConfig),
    ("rendering", RendererConfig),
    ("field", FieldConfig),
    ("cameras (angles in degrees)", CameraConfig),
    ("mesh export (docs/mesh.md)", MeshConfig),
    ("speed: the field and the training render (CUDA; docs/benchmarks.md)", NeRFSpeedConfig),
]


def guidance_config_classes() -> list[type]:
    """The config classes of every registered guidance model, each once."""
    out: list[type] = []
    for classes, _ in REGISTRY.values():
        out += [c for c in classes if c not in out]
    return out


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad input in one line instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="main.py",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("shortcuts")
    g.add_argument(
        "--file",
        metavar="PATH",
        help="read more arguments from a file (shell quoting works); later arguments override them",
    )
    g.add_argument("-O", action="store_true", help="preset: --cuda_ray --fp16 and the measured speed levers")
    g.add_argument("-O2", action="store_true", help="preset: --backbone vanilla --fp16 --progressive_level")
    g.add_argument("--fp16", action="store_true", help="= --precision fp16")
    groups = CONFIG_GROUPS + [(f"guidance: {c.__name__}", c) for c in guidance_config_classes()]
    for title, cls in groups:
        add_config_arguments(p.add_argument_group(title, (cls.__doc__ or "").split("\n")[0]), cls)
    return p


def expand_files(argv: list[str], _open: tuple[str, ...] = ()) -> list[str]:
    """Replace every ``--file PATH`` by the arguments in PATH (shell quoting, # comments).
    A file that includes itself, directly or through others, is an error (``_open``: the files
    being expanded)."""
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        path = None
        if tok == "--file":
            if i + 1 >= len(argv):
                raise SystemExit("main.py: error: --file needs a path")
            path, i = argv[i + 1], i + 2
        elif tok.startswith("--file="):
            path, i = tok.split("=", 1)[1], i + 1
        else:
            out.append(tok)
            i += 1
            continue
        if not Path(path).is_file():
            raise SystemExit(f"main.py: error: argument file {path} not found")
        key = str(Path(path).resolve())
        if key in _open:
            raise SystemExit(f"main.py: error: argument file {path} includes itself")
        try:
            words = shlex.split(Path(path).read_text(), comments=True)
        except ValueError as e:  # shlex: "No closing quotation" and the like
            raise SystemExit(f"main.py: error: argument file {path}: {e}") from None
        out += expand_files(words, (*_open, key))
    return out


def _given(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations of the options that appear on the command line."""
    flags = {tok.split("=", 1)[0] for tok in argv if tok.startswith("-")}
    return {a.dest for a in parser._actions if any(s in flags for s in a.option_strings)}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Parse, apply the documented overrides and validate. Returns (opt, notes)."""
    parser = build_parser()
    argv = expand_files(list(sys.argv[1:] if argv is None else argv))
    opt = parser.parse_args(argv)
    given = _given(parser, argv)
    notes: list[str] = []

    def set_(name, value, why):
        if getattr(opt, name) != value:
            setattr(opt, name, value)
            notes.append(f"{name} = {value} ({why})")

    if opt.O:
        set_("cuda_ray", True, "-O")
        set_("fp16", True, "-O")
    if opt.O2:
        set_("backbone", "vanilla", "-O2")
        set_("fp16", True, "-O2")
        set_("progressive_level", True, "-O2")
    if opt.fp16:
        set_("precision", "fp16", "--fp16")
    for name, value in O_SPEED_DEFAULTS.items():
        if getattr(opt, name) is None:
            if opt.O:
                set_(name, value, "-O")
            else:
                setattr(opt, name, False)
    if opt.sd_version == "builtin" and opt.hf_key is None:
        for k, v in BUILTIN_DEFAULTS.items():
            if k not in given:
                set_(k, v, "built-in prior default")
    if opt.progressive_view:
        if "jitter_pose" not in given:
            set_("jitter_pose", False, "--progressive_view")
        set_("uniform_sphere_rate", 0.0, "--progressive_view")

    err = parser.error
    if not opt.test and not (opt.text and opt.text.strip()):
        err("--text is required (and must not be empty) unless --test is given")
    for name, value in vars(opt).items():  # NaN and inf pass argparse's float(); no option takes them
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            err(f"--{name} must be a finite number, got {value}")
    if not 0 <= opt.seed < 2**32:  # what NumPy's generator takes
        err(f"--seed must be in [0, 2**32), got {opt.seed}")
    if opt.lr <= 0:
        err(f"--lr must be positive, got {opt.lr}")
    if opt.guidance_scale < 0:
        err(f"--guidance_scale must be >= 0, got {opt.guidance_scale}")
    for name in (
        "iters",
        "dataset_size_train",
        "dataset_size_valid",
        "dataset_size_test",
        "w",
        "h",
        "W",
        "H",
        "num_steps",
        "max_steps",
        "grid_size",
        "batch_size",
        "eval_interval",
        "test_interval",
        "update_extra_interval",
        "max_ray_batch",
        "keep_ckpts",
        "max_nonfinite",
        "mcubes_resolution",
        "texture_size",
        "save_guidance_interval",
        "grid_levels",
        "grid_base",
        "grid_finest",
        "graph_buckets",
    ):
        if getattr(opt, name) <= 0:
            err(f"--{name} must be positive, got {getattr(opt, name)}")
    if opt.upsample_steps < 0:
        err(f"--upsample_steps must be >= 0, got {opt.upsample_steps}")
    if opt.graph_render_headroom < 1:
        err(f"--graph_render_headroom must be at least 1, got {opt.graph_render_headroom}")
    if opt.graph_render_max_work < 0:
        err(f"--graph_render_max_work must be >= 0 (0: no limit), got {opt.graph_render_max_work}")
    for name in ("radius_range", "theta_range", "phi_range", "fovy_range", "t_range"):
        lo, hi = getattr(opt, name)
        if lo > hi:
            err(f"--{name}: min {lo} is greater than max {hi}")
    if opt.radius_range[0] <= opt.bound * 3**0.5 / 3:
        err(f"--radius_range {opt.radius_range[0]} puts the camera inside the scene")
    if not (0 <= opt.theta_range[0] and opt.theta_range[1] <= 180):
        err("--theta_range must lie in [0, 180]")
    if not (0 < opt.fovy_range[0] and opt.fovy_range[1] < 180):
        err("--fovy_range must lie in (0, 180)")
    if opt.device != "auto":
        import torch

        try:
            dev = torch.device(opt.device)
        except RuntimeError:
            err(f"--device must be auto, cpu, cuda or cuda:N, got {opt.device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            err(f"--device {opt.device}: no CUDA device is available here (use --device cpu or auto)")
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            err(f"--device {opt.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if dev.type not in ("cpu", "cuda"):
            err(f"--device must be auto, cpu, cuda or cuda:N, got {opt.device!r}")
    if not opt.workspace.strip():
        err("--workspace must name a folder (an empty name would write into the current one)")
    if Path(opt.workspace).exists() and not Path(opt.workspace).is_dir():
        err(f"--workspace {opt.workspace} is a file, not a folder")
    if not (0 <= opt.t_range[0] < opt.t_range[1] <= 1):
        err(f"--t_range must satisfy 0 <= min < max <= 1, got {opt.t_range[0]} {opt.t_range[1]}")
    if opt.grid_size % 2 or opt.grid_size > 1024:
        err("--grid_size must be even and at most 1024")
    if not 0 < opt.infer_T_thresh < 1:
        err("--infer_T_thresh must be in (0, 1)")
    if not 0 < opt.grid_update_frac <= 1:
        err("--grid_update_frac must be in (0, 1]")
    if opt.bound <= 0:
        err("--bound must be positive")
    for name in (
        "latent_iter_ratio",
        "albedo_iter_ratio",
        "textureless_ratio",
        "uniform_sphere_rate",
        "min_ambient_ratio",
    ):
        if not 0 <= getattr(opt, name) <= 1:
            err(f"--{name} must be in [0, 1]")
    if not 0 <= opt.ema_decay < 1:
        err("--ema_decay must be in [0, 1)")
    return opt, notes


@dataclass(frozen=True)
class Configs:
    """Every component's config of one run, built from the parsed options."""

    run: RunConfig
    cond: GuidanceConfig
    trainer: TrainerConfig
    losses: LossConfig
    renderer: RendererConfig
    field: FieldConfig
    cameras: CameraConfig
    mesh: MeshConfig
    nerf_speed: NeRFSpeedConfig


def configs_from(opt: argparse.Namespace) -> Configs:
    """The components' configs from ``parse_args``' options (the only reader of them)."""
    return Configs(
        run=from_namespace(RunConfig, opt),
        cond=from_namespace(GuidanceConfig, opt),
        trainer=from_namespace(TrainerConfig, opt),
        losses=from_namespace(LossConfig, opt),
        renderer=from_namespace(RendererConfig, opt),
        field=from_namespace(FieldConfig, opt),
        cameras=from_namespace(CameraConfig, opt),
        mesh=from_namespace(MeshConfig, opt),
        nerf_speed=from_namespace(NeRFSpeedConfig, opt),
    )


def build_guidance(opt: argparse.Namespace, device) -> dict:
    """The guidance models a run asks for, keyed by name (``{"SD": StableDiffusion}``)."""
    import torch

    from guidance.base import build

    cond = from_namespace(GuidanceConfig, opt)
    out = {}
    for name in opt.guidance:
        configs = tuple(from_namespace(c, opt) for c in REGISTRY[name][0])
        out[name] = build(name, configs, cond, torch.device(device), opt.precision)
    return out


def configure_cuda_allocator() -> None:
    """Let PyTorch's CUDA caching allocator grow segments in place (``expandable_segments``):
    the same speed, and about half the reserved memory of a training run (docs/benchmarks.md).
    Must run before CUDA starts; a user's own allocator setting wins."""
    import os

    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def main(argv: list[str] | None = None) -> int:
    opt, notes = parse_args(argv)
    configure_cuda_allocator()

    import torch

    from guidance.sd_utils import ModelNotFoundError
    from nerf.checkpoint import CheckpointError
    from nerf.fields import build_field
    from nerf.provider import NeRFDataset
    from nerf.step_gate import TrainingDiverged
    from nerf.trainer import Trainer
    from nerf.utils import seed_everything

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if opt.device == "auto" else opt.device
    )
    if device.type != "cuda" and opt.precision != "fp32":
        notes.append(f"precision = fp32 (no CUDA device: {opt.precision} autocast is for GPUs)")
        opt.precision = "fp32"
    if device.type != "cuda" and opt.cuda_ray:
        notes.append("cuda_ray runs the PyTorch twin of the ray-marching kernels (no CUDA device)")
    for n in notes:
        print(f"[option] {n}")
    cfg = configs_from(opt)
    seed_everything(cfg.run.seed)
    model = build_field(cfg.field, cfg.renderer, cfg.nerf_speed)

    def dataset(kind: str) -> NeRFDataset:
        return NeRFDataset(cfg.cameras, type=kind, device=device)

    def trainer(guidance: dict) -> Trainer:
        return Trainer(
            cfg.trainer, model, guidance, device, losses=cfg.losses, cond=cfg.cond, options=vars(opt)
        )

    try:
        if cfg.run.test:
            t = trainer({})
            used = t.load_checkpoint(cfg.trainer.ckpt if cfg.trainer.ckpt != "scratch" else "latest")
            if used is None:
                raise CheckpointError(
                    f"no checkpoint in {Path(cfg.trainer.workspace) / 'checkpoints'}: train first"
                )
            t.test(dataset("test"))
            if cfg.run.six_views:
                t.six_views(cfg.cameras)
            if cfg.run.save_mesh:
                t.save_mesh(cfg.mesh)
            return 0
        t = trainer(build_guidance(opt, device))
        t.load_checkpoint(cfg.trainer.ckpt)
        t.train(dataset("train"), dataset("val"), dataset("test"))
        if cfg.run.save_mesh:
            t.save_mesh(cfg.mesh)
        return 0
    except (ModelNotFoundError, CheckpointError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if type(e).__name__ != "EmptyMeshError":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the last finished checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
