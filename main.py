"""Text-to-3D with Score Distillation Sampling: the one command-line entry point.

    python main.py --text "a hamburger" --workspace trial -O      # train
    python main.py --workspace trial -O --test [--save_mesh]      # 360-degree video (+ mesh)

Every option is documented where it is defined below; ``python main.py -h`` prints them.
Options that change other options print what they changed at start-up.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

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


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad input in one line instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _pair(kind):
    return dict(type=kind, nargs=2, metavar=("MIN", "MAX"))


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
        help="read more arguments from a file (shell quoting works); "
        "they are inserted where --file stands, so later arguments override them",
    )
    g.add_argument("-O", action="store_true", help="= --cuda_ray --fp16 (the instant-ngp path)")
    g.add_argument("-O2", action="store_true", help="= --backbone vanilla --fp16 --progressive_level")
    g.add_argument(
        "--vram_O",
        action="store_true",
        help="save GPU memory in the guidance model (VAE slicing, attention slicing, channels_last)",
    )

    g = p.add_argument_group("prompt, mode and outputs")
    g.add_argument("--text", default=None, help="text prompt (required unless --test)")
    g.add_argument("--negative", default="", help="negative prompt, used as the unconditional branch of CFG")
    g.add_argument("--workspace", default="workspace", help="output folder")
    g.add_argument("--seed", type=int, default=0, help="random seed (the whole run is reproducible on CPU)")
    g.add_argument("--test", action="store_true", help="render the 360-degree video from a checkpoint")
    g.add_argument(
        "--six_views", action="store_true", help="with --test: also write 6 canonical views as PNG"
    )
    g.add_argument(
        "--save_mesh",
        action="store_true",
        help="export a textured mesh (docs/mesh.md): at the end of training, or from the checkpoint with --test",
    )
    g.add_argument("--eval_interval", type=int, default=1, help="validate every N epochs")
    g.add_argument(
        "--test_interval", type=int, default=100, help="write the test video every N epochs (and at the end)"
    )
    g.add_argument("--dataset_size_train", type=int, default=100, help="iterations per epoch")
    g.add_argument("--dataset_size_valid", type=int, default=8, help="validation frames")
    g.add_argument("--dataset_size_test", type=int, default=100, help="test video frames")
    g.add_argument("--exp_start_iter", type=int, default=None, help="start of the schedules (default 0)")
    g.add_argument("--exp_end_iter", type=int, default=None, help="end of the schedules (default --iters)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")

    g = p.add_argument_group("guidance")
    g.add_argument("--guidance", nargs="*", default=["SD"], choices=["SD"], help="guidance models")
    g.add_argument("--guidance_scale", type=float, default=100.0, help="classifier-free guidance scale")
    g.add_argument(
        "--sd_version",
        default="2.1",
        choices=["1.5", "2.0", "2.1", "builtin"],
        help="Stable Diffusion version (the *-base 512 px models), or the shipped built-in prior",
    )
    g.add_argument(
        "--hf_key", default=None, help="diffusers model: hub id or local folder (overrides --sd_version)"
    )
    g.add_argument(
        "--t_range",
        **_pair(float),
        default=[0.02, 0.98],
        help="fractions of the diffusion timesteps t is drawn from",
    )
    g.add_argument(
        "--view_prompt",
        default="interp",
        choices=["interp", "discrete", "none"],
        help="view-dependent prompting: blend front/side/back embeddings by azimuth, append the "
        "discrete view suffix, or use the prompt alone",
    )
    g.add_argument(
        "--save_guidance", action="store_true", help="write [render, noisy, x0] strips to workspace/guidance/"
    )
    g.add_argument(
        "--save_guidance_interval", type=int, default=10, help="period of --save_guidance in steps"
    )

    g = p.add_argument_group("training")
    g.add_argument("--iters", type=int, default=10000, help="training iterations")
    g.add_argument(
        "--lr", type=float, default=1e-3, help="base learning rate (Adan uses 5x; the grid a further 10x)"
    )
    g.add_argument("--ckpt", default="latest", help="latest | scratch | best | latest_model | PATH")
    g.add_argument("--optim", default="adan", choices=["adan", "adam"], help="optimizer")
    g.add_argument("--fp16", action="store_true", help="= --precision fp16")
    g.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "fp16", "bf16"],
        help="fp16: autocast + GradScaler; bf16: autocast; CUDA only (fp32 on CPU)",
    )
    g.add_argument(
        "--ema_decay",
        type=float,
        default=0.99,
        help="EMA of the weights, updated every step (0 = off); validation and test render the EMA weights",
    )
    g.add_argument("--grad_clip", type=float, default=-1, help="clip gradient values (negative = off)")
    g.add_argument(
        "--grad_clip_rgb",
        type=float,
        default=-1,
        help="clip the gradient on the rendered image (negative = off)",
    )
    g.add_argument(
        "--max_nonfinite", type=int, default=20, help="stop after this many non-finite steps in a row"
    )
    g.add_argument("--keep_ckpts", type=int, default=2, help="full checkpoints kept")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--batch_size", type=int, default=1, help="views per iteration")

    g = p.add_argument_group("rendering and model")
    g.add_argument("--backbone", default="grid", choices=["grid", "vanilla"], help="NeRF backbone")
    g.add_argument(
        "--cuda_ray",
        action="store_true",
        help="occupancy-grid ray marching (CUDA kernels on a GPU, their PyTorch twin on CPU)",
    )
    g.add_argument("--max_steps", type=int, default=1024, help="lattice points per ray (--cuda_ray)")
    g.add_argument(
        "--num_steps", type=int, default=64, help="stratified samples per ray (without --cuda_ray)"
    )
    g.add_argument(
        "--upsample_steps", type=int, default=32, help="importance samples per ray (without --cuda_ray)"
    )
    g.add_argument(
        "--update_extra_interval", type=int, default=16, help="occupancy-grid refresh period (steps)"
    )
    g.add_argument("--grid_size", type=int, default=128, help="occupancy-grid cells per axis")
    g.add_argument(
        "--grid_update_frac",
        type=float,
        default=0.25,
        help="fraction of cells re-evaluated per "
        "refresh after the first 16 (plus as many occupied ones); 1 = every cell, as the reference",
    )
    g.add_argument(
        "--graph_pass",
        action="store_true",
        help="--cuda_ray training on a GPU: replay the network pass (field, shading, compositing; "
        "forward and backward) from CUDA graphs captured per shading and per sample-count bucket "
        "(padding rows get zero gradient; up to 4 graphs, sharing one memory pool, each with its own "
        "saved activations). Fewer host launches when sample counts repeat (fixed views); in a run "
        "where they rarely do, more than 8 captures in 64 passes turn it off with one line",
    )
    g.add_argument(
        "--graph_buckets",
        type=int,
        default=8,
        help="--graph_pass: sample-count buckets per octave (8: at most 9%% padding; fewer buckets "
        "mean more padding and fewer captures)",
    )
    g.add_argument(
        "--graph_render",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--cuda_ray training on a GPU: replay the whole training render (march, pruning, field, "
        "shading, composite; forward and backward) from CUDA graphs, one per shading, at fixed sizes "
        "(the largest sample counts seen, plus 10%%), with no host sync. Rows past the samples get "
        "zero weight and gradient. A render that needs more samples than fit is marked incomplete on "
        "the device and training skips that step's update; one line says so, and the render is "
        "captured again larger. On under -O, up to --graph_render_max_work",
    )
    g.add_argument(
        "--graph_render_headroom",
        type=float,
        default=1.1,
        help="--graph_render: graph sizes are the largest sample counts seen times this (more: fewer "
        "steps that lose samples and new captures, more memory; the field's kernels skip the padding)",
    )
    g.add_argument(
        "--graph_render_max_work",
        type=int,
        default=3 * 2**20,
        help="--graph_render: renders needing more rows of field evaluation than this (marched samples, "
        "plus 7 per kept sample with fd normals) run eagerly, and after one, 32 smaller renders in a "
        "row before graphs again (twice as many after each further one, up to 1024). Above it the "
        "GPU bounds the render and a graph's padding costs more than the launches it saves "
        "(bench_sds on the H100: a fitted scene's 1.9M rows, 5.0 -> 2.9 ms per render; a fresh "
        "field's 2.2M-5M, slower); 0: no limit",
    )
    g.add_argument(
        "--prune_samples",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--cuda_ray training with normals (lambertian/textureless shading, orientation loss): one "
        "density pass without gradients, then the full pass (gradients, normals) only on samples in "
        "front of where transmittance falls below 1e-5 (the same image and gradients: the others get "
        "weight 0)",
    )
    g.add_argument(
        "--fused_mlp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="on a GPU under --fp16, the field's MLP and density/albedo head as two fused Triton kernels "
        "(forward; backward recomputing the forward) instead of cuBLAS GEMMs and separate element-wise "
        "passes, and the fd normals and shading of a merged field call as one kernel each way: fewer "
        "launches, and no hidden activations kept for the backward (nerf/fused_mlp.py; the PyTorch "
        "path where Triton is missing or the MLP has another shape) [default: on with -O, else off]",
    )
    g.add_argument(
        "--infer_T_thresh",
        type=float,
        default=1e-3,
        help="--cuda_ray frames (validation, videos): a ray stops once its transmittance falls below "
        "this, leaving at most that fraction of a pixel's colour out. 1e-3 (the default) changed the "
        "H100 benchmark frame by at most 0.0009 (under a quarter of an 8-bit level) with 17%% fewer "
        "samples than the reference's 1e-4; 1e-2 by 0.0093 with 35%% fewer (docs/benchmarks.md)",
    )
    g.add_argument("--max_ray_batch", type=int, default=4096, help="rays per chunk when rendering frames")
    g.add_argument(
        "--latent_iter_ratio",
        type=float,
        default=0.2,
        help="fraction of the run that feeds "
        "normal shading + mask to the diffusion model as its latent (Fantasia3D warm-up)",
    )
    g.add_argument(
        "--albedo_iter_ratio",
        type=float,
        default=0.0,
        help="fraction of the run (counted from the start) with albedo-only shading",
    )
    g.add_argument(
        "--min_ambient_ratio", type=float, default=0.1, help="lower bound of the random ambient ratio"
    )
    g.add_argument("--textureless_ratio", type=float, default=0.2, help="probability of textureless shading")
    g.add_argument(
        "--normal_method",
        default=None,
        choices=["fd", "tetra", "autograd"],
        help="normals: central differences (6 density passes, second order), a 4-point tetrahedral "
        "stencil (4 passes, first order) or autograd (default: fd for grid, autograd for vanilla)",
    )
    g.add_argument("--jitter_pose", action="store_true", help="jitter training cameras")
    g.add_argument("--jitter_center", type=float, default=0.2, help="camera position jitter (uniform, width)")
    g.add_argument("--jitter_target", type=float, default=0.2, help="look-at target jitter (Gaussian sigma)")
    g.add_argument("--jitter_up", type=float, default=0.02, help="up-vector jitter (Gaussian sigma)")
    g.add_argument(
        "--uniform_sphere_rate",
        type=float,
        default=0.0,
        help="probability of a camera drawn uniformly on the upper hemisphere",
    )
    g.add_argument(
        "--bg_radius",
        type=float,
        default=1.4,
        help="> 0: learn a background network on ray directions (only the sign matters)",
    )
    g.add_argument(
        "--density_activation", default="exp", choices=["exp", "softplus"], help="density activation"
    )
    g.add_argument(
        "--density_thresh", type=float, default=10.0, help="occupancy and mesh threshold (x25 for softplus)"
    )
    g.add_argument("--blob_density", type=float, default=5.0, help="peak of the initial density blob")
    g.add_argument("--blob_radius", type=float, default=0.2, help="radius of the initial density blob")
    g.add_argument("--w", type=int, default=64, help="training render width")
    g.add_argument("--h", type=int, default=64, help="training render height")
    g.add_argument("--W", type=int, default=800, help="validation and test render width")
    g.add_argument("--H", type=int, default=800, help="validation and test render height")
    g.add_argument("--bound", type=float, default=1.0, help="the scene is [-bound, bound]^3")
    g.add_argument("--dt_gamma", type=float, default=0.0, help="adaptive step: dt = t * dt_gamma (0 = fixed)")
    g.add_argument("--min_near", type=float, default=0.01, help="near plane")
    g.add_argument("--grid_levels", type=int, default=16, help="hash-grid levels")
    g.add_argument("--grid_log2_size", type=int, default=19, help="log2 of the hash table size per level")
    g.add_argument("--grid_base", type=int, default=16, help="coarsest hash-grid resolution")
    g.add_argument("--grid_finest", type=int, default=2048, help="finest hash-grid resolution (times bound)")

    g = p.add_argument_group("cameras (angles in degrees)")
    g.add_argument("--radius_range", **_pair(float), default=[3.0, 3.5], help="camera distance")
    g.add_argument("--theta_range", **_pair(float), default=[45.0, 105.0], help="polar angle (90 = horizon)")
    g.add_argument("--phi_range", **_pair(float), default=[-180.0, 180.0], help="azimuth (0 = front)")
    g.add_argument("--fovy_range", **_pair(float), default=[10.0, 30.0], help="vertical field of view")
    g.add_argument("--default_radius", type=float, default=3.2, help="validation/test camera distance")
    g.add_argument("--default_polar", type=float, default=90.0, help="validation/test polar angle")
    g.add_argument("--default_azimuth", type=float, default=0.0, help="validation/test starting azimuth")
    g.add_argument("--default_fovy", type=float, default=20.0, help="validation/test field of view")
    g.add_argument(
        "--progressive_view",
        action="store_true",
        help="widen the camera ranges from the default "
        "view to the full ranges over the run (turns off --jitter_pose and --uniform_sphere_rate)",
    )
    g.add_argument(
        "--progressive_view_init_ratio",
        type=float,
        default=0.2,
        help="starting fraction for --progressive_view",
    )
    g.add_argument(
        "--progressive_level",
        action="store_true",
        help="coarse-to-fine: the fraction of encoder levels in use is min(1, 0.25 + 2 * progress)",
    )
    g.add_argument(
        "--angle_overhead",
        type=float,
        default=30.0,
        help="polar <= this is 'overhead' (>= 180 - this is 'bottom')",
    )
    g.add_argument(
        "--angle_front",
        type=float,
        default=60.0,
        help="width of the front wedge: |azimuth| < this/2 is 'front', |azimuth| > 180 - this/2 is 'back'",
    )

    g = p.add_argument_group("regularizers and loss weights")
    g.add_argument(
        "--lambda_entropy",
        type=float,
        default=1e-3,
        help="binary entropy of per-sample weights, ramped in over the first half",
    )
    g.add_argument("--lambda_opacity", type=float, default=0.0, help="mean squared opacity")
    g.add_argument(
        "--lambda_orient", type=float, default=1e-2, help="orientation loss (normals facing the camera)"
    )
    g.add_argument("--lambda_tv", type=float, default=0.0, help="total variation of hash-grid features")
    g.add_argument("--lambda_wd", type=float, default=0.0, help="weight decay of hash-grid features")
    g.add_argument("--lambda_guidance", type=float, default=1.0, help="scale of the SDS gradient")
    g.add_argument(
        "--lambda_2d_normal_smooth", type=float, default=0.0, help="TV of the rendered normal image"
    )
    g.add_argument(
        "--lambda_3d_normal_smooth", type=float, default=0.0, help="|n(x) - n(x + N(0, 0.01))| on the surface"
    )

    g = p.add_argument_group("speed", "guidance speed levers (CUDA only; docs/benchmarks.md)")
    flag = argparse.BooleanOptionalAction
    g.add_argument(
        "--unet_graph",
        action=flag,
        default=None,
        help="replay the UNet's classifier-free-guidance call from a CUDA graph captured once per "
        "input shape and dtype (other shapes run eager) [default: on with -O, else off]",
    )
    g.add_argument(
        "--vae_graph",
        action=flag,
        default=None,
        help="replay the VAE encoder's forward and backward from CUDA graphs [default: on with -O, else off]",
    )
    g.add_argument(
        "--compile_vae",
        action=flag,
        default=None,
        help="torch.compile the VAE encoder (fused GroupNorm + SiLU; about 30 s to compile on first "
        "use; replayed as CUDA graphs with --vae_graph) [default: on with -O, else off]",
    )
    g.add_argument(
        "--channels_last",
        action=flag,
        default=None,
        help="UNet weights and inputs in channels_last memory format [default: on with -O, else off]",
    )
    g.add_argument(
        "--vae_channels_last",
        action="store_true",
        help="VAE encoder weights and inputs in channels_last on the graphed/compiled encoder path",
    )
    g.add_argument(
        "--vae_fused_gn",
        action=flag,
        default=None,
        help="on the graphed/compiled VAE encoder path, its GroupNorm + SiLU pairs as our CUDA kernels "
        "on channels_last activations (implies --vae_channels_last) [default: on with -O, else off]",
    )
    g.add_argument(
        "--unet_fused_qkv",
        action=flag,
        default=None,
        help="one GEMM for the q/k/v projections of each UNet attention (diffusers' "
        "fuse_qkv_projections; same products, fewer and larger GEMMs) [default: on with -O, else off]",
    )
    g.add_argument(
        "--compile_unet",
        action=flag,
        default=None,
        help="torch.compile the UNet (replayed as a CUDA graph with --unet_graph; the first run compiles "
        "for about a minute, later runs load torch's compile cache in seconds) [default: on with -O, "
        "else off]",
    )
    g.add_argument(
        "--unet_traced",
        default="auto",
        metavar="auto|off|PATH",
        help="UNet compiled ahead of time by trace.py: auto loads the one in "
        "~/.cache/dreamfusion/unet_traced matching model, dtype and input shapes (none: eager); "
        "PATH loads that .pt2 (a mismatch runs eager with a warning); off never loads one",
    )

    g = p.add_argument_group("mesh export (docs/mesh.md)")
    g.add_argument("--mcubes_resolution", type=int, default=256, help="marching-cubes lattice resolution")
    g.add_argument("--decimate_target", type=float, default=5e4, help="target face count")
    g.add_argument("--texture_size", type=int, default=2048, help="albedo texture size")
    g.add_argument(
        "--mesh_format",
        nargs="+",
        default=["obj", "glb"],
        choices=["obj", "glb", "ply"],
        help="files to write",
    )
    return p


def expand_files(argv: list[str]) -> list[str]:
    """Replace every ``--file PATH`` by the arguments in PATH (shell quoting, # comments)."""
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
        out += expand_files(shlex.split(Path(path).read_text(), comments=True))
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
    if not (0 <= opt.t_range[0] and opt.t_range[1] <= 1):
        err("--t_range must lie in [0, 1]")
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


def build_guidance(opt: argparse.Namespace, device) -> dict:
    """The guidance models a run asks for, keyed by name (``{"SD": StableDiffusion}``).

    Loading draws from the global RNG (weight init before loading): it runs in a forked RNG
    so a run's random stream does not depend on what is cached.
    """
    import torch

    from guidance.sd_utils import StableDiffusion

    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        sd = StableDiffusion(
            device,
            opt.precision == "fp16",
            opt.vram_O,
            opt.sd_version,
            opt.hf_key,
            tuple(opt.t_range),
            bf16=opt.precision == "bf16",
            unet_graph=opt.unet_graph,
            vae_graph=opt.vae_graph,
            channels_last=opt.channels_last,
            vae_channels_last=opt.vae_channels_last,
            vae_fused_gn=opt.vae_fused_gn,
            unet_fused_qkv=opt.unet_fused_qkv,
            compile_unet=opt.compile_unet,
            compile_vae=opt.compile_vae,
            unet_traced=opt.unet_traced,
        )
    return {"SD": sd}


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
    from nerf.provider import CameraRanges, NeRFDataset
    from nerf.utils import CheckpointError, Trainer, TrainingDiverged, seed_everything

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
    seed_everything(opt.seed)

    if opt.backbone == "grid":
        from nerf.network_grid import NeRFNetwork
    else:
        from nerf.network import NeRFNetwork
    model = NeRFNetwork(opt)

    def dataset(kind: str, size: int, H: int, W: int) -> NeRFDataset:
        return NeRFDataset(
            type=kind,
            H=H,
            W=W,
            size=size,
            ranges=CameraRanges(
                tuple(opt.radius_range), tuple(opt.theta_range), tuple(opt.phi_range), tuple(opt.fovy_range)
            ),
            default_radius=opt.default_radius,
            default_polar=opt.default_polar,
            default_azimuth=opt.default_azimuth,
            default_fovy=opt.default_fovy,
            angle_overhead=opt.angle_overhead,
            angle_front=opt.angle_front,
            uniform_sphere_rate=opt.uniform_sphere_rate,
            jitter_pose=opt.jitter_pose,
            jitter_center=opt.jitter_center,
            jitter_target=opt.jitter_target,
            jitter_up=opt.jitter_up,
            batch_size=opt.batch_size,
            device=device,
        )

    try:
        if opt.test:
            trainer = Trainer(opt, model, {}, device)
            used = trainer.load_checkpoint(opt.ckpt if opt.ckpt != "scratch" else "latest")
            if used is None:
                raise CheckpointError(f"no checkpoint in {Path(opt.workspace) / 'checkpoints'}: train first")
            trainer.test(dataset("test", opt.dataset_size_test, opt.H, opt.W))
            if opt.six_views:
                trainer.six_views(opt.H, opt.W)
            if opt.save_mesh:
                trainer.save_mesh()
            return 0
        guidance = build_guidance(opt, device)
        trainer = Trainer(opt, model, guidance, device)
        trainer.load_checkpoint(opt.ckpt)
        trainer.train(
            dataset("train", opt.dataset_size_train, opt.h, opt.w),
            dataset("val", opt.dataset_size_valid, opt.H, opt.W),
            dataset("test", opt.dataset_size_test, opt.H, opt.W),
        )
        if opt.save_mesh:
            trainer.save_mesh()
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
