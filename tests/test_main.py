"""The command line end to end: runs, resume, and bad input."""

import os
import subprocess
import sys

import pytest
import torch

from main import main, parse_args
from tests.conftest import ROOT, TINY_RUN


def _run(args, env=None, check=True):
    e = {**os.environ, **(env or {})}
    r = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        capture_output=True,
        text=True,
        env=e,
        cwd=ROOT,
        timeout=600,
    )
    if check and r.returncode != 0:
        raise AssertionError(r.stderr[-3000:])
    return r


@pytest.mark.slow
def test_thirty_step_run_writes_checkpoint_validation_and_video(tiny_sd, tmp_path):
    ws = tmp_path / "trial"
    r = _run(
        [
            "--text",
            "a red cube",
            "--workspace",
            str(ws),
            "--hf_key",
            str(tiny_sd),
            "-O",
            "--iters",
            "30",
            *TINY_RUN,
        ],
        env={"HOME": str(tmp_path)},
    )
    assert "[option] cuda_ray = True (-O)" in r.stdout
    if not torch.cuda.is_available():  # on a GPU machine -O keeps fp16
        assert "precision = fp32 (no CUDA device" in r.stdout
    ckpts = sorted(p.name for p in (ws / "checkpoints").iterdir())
    assert ckpts == ["df.pth", "df_ep0002.pth", "df_ep0003.pth"]  # the last 2 full ones + EMA weights
    assert (ws / "validation" / "df_ep0003_0001_rgb.png").exists()
    assert (ws / "validation" / "df_ep0003_sheet.png").exists()
    video = ws / "results" / "df_ep0003_rgb.mp4"
    assert video.stat().st_size > 1000
    import imageio.v3 as iio

    frames = iio.imread(video)
    assert frames.shape[0] == 3 and frames.shape[1:3] == (24, 24)
    assert "test video (rgb)" in (ws / "README.md").read_text()
    ckpt = torch.load(ws / "checkpoints" / "df_ep0003.pth", weights_only=True)
    assert ckpt["global_step"] == 30 and "optimizer" in ckpt and "ema" in ckpt
    # --test renders again from the checkpoint.
    _run(
        [
            "--workspace",
            str(ws),
            "--test",
            "-O",
            *TINY_RUN,
            "--dataset_size_test",
            "2",
            "--six_views",
            "--save_mesh",
            "--mcubes_resolution",
            "48",
            "--texture_size",
            "128",
            "--decimate_target",
            "2000",
            "--mesh_format",
            "obj",
            "glb",
        ],
        env={"HOME": str(tmp_path)},
    )
    assert (ws / "results" / "df_ep0003_top.png").exists()
    import trimesh

    glb = trimesh.load(ws / "mesh" / "mesh.glb", force="mesh")
    assert len(glb.faces) > 100 and glb.visual.material.baseColorTexture is not None
    assert (ws / "mesh" / "mesh.obj").exists() and (ws / "mesh" / "albedo.png").exists()
    assert "mesh (glb)" in (ws / "README.md").read_text()


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted(tiny_sd, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    common = [
        "--text",
        "a blue sphere",
        "--hf_key",
        str(tiny_sd),
        "-O",
        "--iters",
        "20",
        *TINY_RUN,
        "--test_interval",
        "1000",
        "--lambda_orient",
        "0.01",
        "--textureless_ratio",
        "0.5",
        "--latent_iter_ratio",
        "0.1",
        "--device",
        "cpu",  # bit-identical resume is a CPU property (GPU atomics reorder sums)
    ]
    assert main(["--workspace", str(tmp_path / "a"), *common]) == 0
    r = _run(
        ["--workspace", str(tmp_path / "b"), *common],
        env={"DREAMFUSION_KILL_AFTER_STEP": "15", "HOME": str(tmp_path)},
        check=False,
    )
    assert r.returncode == 3  # killed mid-epoch, after the epoch-1 checkpoint
    assert not (tmp_path / "b" / "checkpoints" / "df_ep0002.pth").exists()
    assert main(["--workspace", str(tmp_path / "b"), *common]) == 0
    a = torch.load(tmp_path / "a" / "checkpoints" / "df_ep0002.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "df_ep0002.pth", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["ema"]["shadow"], b["ema"]["shadow"]):
        assert torch.equal(sa, sb)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--iters", "0", "--text", "x"], "--iters must be positive"),
        (["--text", "x", "--radius_range", "4", "3"], "--radius_range: min 4.0 is greater than max 3.0"),
        (["--text", "x", "--fovy_range", "30", "10"], "--fovy_range: min 30.0 is greater than max 10.0"),
        (["--text", "x", "--backbone", "nope"], "argument --backbone: invalid choice"),
        (["--text", "   "], "--text is required"),
        ([], "--text is required"),
        (["--text", "x", "--t_range", "0.5", "1.5"], "--t_range must satisfy 0 <= min < max <= 1"),
        (["--text", "x", "--t_range", "0", "0"], "--t_range must satisfy 0 <= min < max <= 1"),
        (["--text", "x", "--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--text", "x", "--lr", "-1"], "--lr must be positive, got -1.0"),
        (["--text", "x", "--guidance_scale", "nan"], "--guidance_scale must be a finite number"),
        (["--text", "x", "--guidance_scale", "-5"], "--guidance_scale must be >= 0, got -5.0"),
        (["--text", "x", "--radius_range", "nan", "nan"], "--radius_range must be a finite number"),
        (["--text", "x", "--bound", "nan"], "--bound must be a finite number, got nan"),
        (["--text", "x", "--bound", "inf"], "--bound must be a finite number, got inf"),
        (["--text", "x", "--decimate_target", "nan"], "--decimate_target must be a finite number"),
        (["--text", "x", "--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        (["--text", "x", "--seed", str(2**70)], "--seed must be in [0, 2**32)"),
        (["--text", "x", "--device", "gpu0"], "--device must be auto, cpu, cuda or cuda:N, got 'gpu0'"),
        (["--text", "x", "--device", "meta"], "--device must be auto, cpu, cuda or cuda:N"),
        (["--text", "x", "--workspace", ""], "--workspace must name a folder"),
        (["--text", "x", "--workspace", "  "], "--workspace must name a folder"),
        (["--file", "/nonexistent/args.txt"], "argument file /nonexistent/args.txt not found"),
        (["--text", "x", "--graph_render_max_work", "-1"], "--graph_render_max_work must be >= 0"),
        (["--text", "x", "--graph_render_headroom", "0.9"], "--graph_render_headroom must be at least 1"),
    ],
)
def test_bad_input_fails_at_parse_time_in_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(args)
    assert e.value.code != 0
    err = capsys.readouterr().err + str(e.value.code)
    assert message in err
    assert len([line for line in capsys.readouterr().err.splitlines() if line]) <= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_cuda_device_without_cuda_is_one_line(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--text", "x", "--device", "cuda"])
    assert "--device cuda: no CUDA device is available here" in capsys.readouterr().err


def test_a_workspace_that_is_a_file_is_refused_and_kept(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    with pytest.raises(SystemExit):
        parse_args(["--text", "x", "--workspace", str(f)])
    assert f"--workspace {f} is a file, not a folder" in capsys.readouterr().err
    assert f.read_text() == "mine"


@pytest.mark.parametrize(
    "text, message",
    [
        ('--text "unclosed\n', "No closing quotation"),
        ("--file {self}\n", "includes itself"),
    ],
)
def test_bad_argument_files_are_one_line(tmp_path, text, message):
    f = tmp_path / "run.args"
    f.write_text(text.format(self=f))
    with pytest.raises(SystemExit) as e:
        parse_args(["--file", str(f)])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_argument_files_keep_quoted_strings(tmp_path):
    f = tmp_path / "run.args"
    f.write_text('-O --text "a DSLR photo of a hamburger"  # comment\n--w 32 --h 32\n')
    opt, notes = parse_args(["--file", str(f), "--w", "48"])
    assert opt.text == "a DSLR photo of a hamburger" and opt.cuda_ray and opt.precision == "fp16"
    assert opt.w == 48 and opt.h == 32  # later arguments override the file
    assert "cuda_ray = True (-O)" in notes


def test_corrupt_checkpoint_is_a_clear_error_and_is_not_overwritten(tiny_sd, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    ws = tmp_path / "w"
    (ws / "checkpoints").mkdir(parents=True)
    bad = ws / "checkpoints" / "df_ep0001.pth"
    bad.write_bytes(b"not a checkpoint")
    rc = main(
        ["--text", "a cube", "--workspace", str(ws), "--hf_key", str(tiny_sd), *TINY_RUN, "--iters", "5"]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "df_ep0001.pth is corrupt" in err
    assert bad.read_bytes() == b"not a checkpoint"
    rc = main(["--workspace", str(ws), "--test", "--ckpt", str(tmp_path / "missing.pth"), *TINY_RUN])
    assert rc == 1 and "does not exist" in capsys.readouterr().err


def test_missing_model_is_reported_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(
        [
            "--text",
            "a cube",
            "--workspace",
            str(tmp_path / "w"),
            "--hf_key",
            "nobody/missing-model",
            *TINY_RUN,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: diffusion model 'nobody/missing-model'")


def test_non_finite_steps_are_skipped_then_stop_the_run(tiny_sd, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    from guidance import sd_utils

    calls = {"n": 0}
    real = sd_utils.StableDiffusion.train_step

    def flaky(self, *a, **k):
        calls["n"] += 1
        loss = real(self, *a, **k)
        return loss * float("nan") if calls["n"] > 12 else loss  # healthy first epoch, then NaN

    monkeypatch.setattr(sd_utils.StableDiffusion, "train_step", flaky)
    ws = tmp_path / "nan"
    rc = main(
        [
            "--text",
            "a cube",
            "--workspace",
            str(ws),
            "--hf_key",
            str(tiny_sd),
            *TINY_RUN,
            "--iters",
            "40",
            "--max_nonfinite",
            "5",
        ]
    )
    assert rc == 1
    assert "5 non-finite steps in a row" in capsys.readouterr().err
    assert (ws / "checkpoints" / "df_ep0001.pth").exists()  # the last good checkpoint is kept
    log = (ws / "log_df.txt").read_text()
    assert "non-finite loss or gradient: step skipped (1 in a row" in log


@pytest.mark.parametrize(
    "config",
    [
        ["-O2"],  # vanilla backbone, autograd normals, progressive levels
        [],  # plain run(): stratified + importance sampling
        ["-O", "--view_prompt", "discrete", "--progressive_view", "--lambda_2d_normal_smooth", "0.1"],
        [
            "-O",
            "--optim",
            "adam",
            "--lambda_3d_normal_smooth",
            "0.1",
            "--lambda_opacity",
            "0.01",
            "--lambda_tv",
            "0.1",
        ],
        [
            "-O",
            "--normal_method",
            "autograd",
            "--latent_iter_ratio",
            "0.5",
            "--jitter_pose",
            "--grad_clip",
            "1",
        ],
    ],
    ids=["O2", "plain", "discrete-progressive", "adam-regularizers", "autograd-latent-jitter"],
)
def test_each_configuration_runs(config, tiny_sd, tmp_path, monkeypatch):
    """Every backbone/renderer/prompting configuration trains a few CPU iterations and renders."""
    monkeypatch.setenv("HOME", str(tmp_path))
    ws = tmp_path / "cfg"
    args = [
        "--text",
        "a red cube",
        "--workspace",
        str(ws),
        "--hf_key",
        str(tiny_sd),
        *TINY_RUN,
        "--iters",
        "6",
        "--dataset_size_train",
        "3",
        "--num_steps",
        "16",
        "--upsample_steps",
        "8",
        *config,
    ]
    assert main(args) == 0
    ckpt = torch.load(ws / "checkpoints" / "df_ep0002.pth", weights_only=True)
    assert ckpt["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert (ws / "validation" / "df_ep0002_sheet.png").exists()
    # scripts/bench_run.py times whole runs from these epoch lines of the log.
    from scripts.bench_run import parse_log

    rows = parse_log(next(ws.glob("log_*.txt")).read_text())
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 3), (2, 6)]
    assert all(r["its"] > 0 and r["skipped"] == 0 for r in rows)


def test_cuda_allocator_setting_defaults_to_expandable_segments_and_respects_the_user(monkeypatch):
    from main import configure_cuda_allocator

    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.setenv(var, "")  # records the original state, restored after the test
        monkeypatch.delenv(var)
    configure_cuda_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv(var, "max_split_size_mb:128")
        configure_cuda_allocator()
        assert os.environ[var] == "max_split_size_mb:128"
        other = "PYTORCH_ALLOC_CONF" if var == "PYTORCH_CUDA_ALLOC_CONF" else "PYTORCH_CUDA_ALLOC_CONF"
        assert other not in os.environ  # the user's setting alone decides
        monkeypatch.delenv(var)
