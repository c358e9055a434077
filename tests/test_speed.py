"""Speed paths of the guidance: same SDS gradient as eager, fallbacks, -O defaults.

The GPU tests compare the fast paths (CUDA graphs, channels_last, bf16) with eager on the
same image, t, noise and VAE posterior sample; the CPU tests cover the fallbacks and flags.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from guidance import sd_fast, sd_utils
from guidance.sd_fast import SDSpeedConfig, signature, traced_key
from guidance.sd_utils import SDConfig, StableDiffusion, unet_eager
from main import O_SPEED_DEFAULTS, parse_args


def _sd(tiny_sd, device: str, precision: str = "fp32", **levers) -> StableDiffusion:
    """The tiny model with these speed levers on (the others off, no traced UNet)."""
    speed = dataclasses.replace(SDSpeedConfig(unet_traced="off"), **levers)
    return StableDiffusion(SDConfig(hf_key=str(tiny_sd)), speed, device=device, precision=precision)


def _sds_grad(sd: StableDiffusion, emb: torch.Tensor, seed: int, as_latent: bool = False) -> torch.Tensor:
    """d SDS / d image on fresh random inputs drawn from ``seed`` (same for every model)."""
    dev = sd.device
    g = torch.Generator().manual_seed(seed)
    c = 4 if as_latent else 3
    img = torch.rand(1, c, 24, 24, generator=g).to(dev).requires_grad_(True)
    noise = torch.randn(1, 4, sd.latent_size, sd.latent_size, generator=g).to(dev)
    t = torch.randint(20, 980, (1,), generator=g).to(dev)
    torch.manual_seed(seed)  # the VAE posterior sample
    amp = torch.bfloat16 if sd.dtype == torch.bfloat16 else torch.float16
    with torch.autocast(dev.type, dtype=amp, enabled=sd.dtype != torch.float32):
        loss = sd.sds_step(emb, img, guidance_scale=7.5, as_latent=as_latent, t=t, noise=noise)
    loss.backward()
    assert torch.isfinite(loss)
    return img.grad.detach().double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.cuda
@pytest.mark.parametrize(
    "levers, tol",
    [
        (dict(unet_graph=True), 2e-2),
        (dict(unet_graph=True, channels_last=True, vae_graph=True), 2e-2),
        (dict(unet_graph=True, channels_last=True, vae_graph=True, compile_vae=True), 2e-2),
        (
            dict(
                unet_graph=True, channels_last=True, vae_graph=True, compile_vae=True, vae_channels_last=True
            ),
            2e-2,
        ),
        (dict(compile_vae=True), 2e-2),
        (dict(vae_graph=True, vae_fused_gn=True), 2e-2),  # our GroupNorm kernels, eager encoder graph
        (  # the -O default before the fused GroupNorm
            dict(unet_graph=True, channels_last=True, vae_graph=True, compile_vae=True, compile_unet=True),
            2e-2,
        ),
        (  # the -O default
            dict(
                unet_graph=True,
                channels_last=True,
                vae_graph=True,
                compile_vae=True,
                compile_unet=True,
                vae_fused_gn=True,
                unet_fused_qkv=True,
            ),
            2e-2,
        ),
        (dict(bf16=True, unet_graph=True, channels_last=True, vae_graph=True), 8e-2),
    ],
)
def test_fast_paths_give_the_eager_sds_gradient(tiny_sd, embed_cache, levers, tol):
    levers = dict(levers)
    precision = "bf16" if levers.pop("bf16", False) else "fp16"
    ref = _sd(tiny_sd, "cuda")  # fp32 eager
    eager = _sd(tiny_sd, "cuda", precision)  # eager, same dtype
    fast = _sd(tiny_sd, "cuda", precision, **levers)
    emb = ref.get_text_embeds(["", "a red cube"])
    for seed in range(3):  # later calls replay the graphs captured by the first
        for as_latent in (False, True):
            g_ref = _sds_grad(ref, emb, seed, as_latent)
            g_eager = _sds_grad(eager, emb, seed, as_latent)
            g_fast = _sds_grad(fast, emb, seed, as_latent)
            assert g_eager.abs().sum() > 0
            # Same noise, t and posterior sample: the fast path's gradient is the eager one
            # up to the dtype's rounding (and both stay near fp32).
            info = (seed, as_latent, _rel(g_fast, g_eager), _rel(g_eager, g_ref), _rel(g_fast, g_ref))
            assert _rel(g_fast, g_eager) < tol, info
            assert _rel(g_fast, g_ref) < 4 * tol, info
    assert len(fast.fast._graphs) == (1 if levers.get("unet_graph") else 0)
    assert len(fast.fast._vae_graphs) == (1 if levers.get("vae_graph") or levers.get("compile_vae") else 0)
    assert fast.fast.compile_vae == levers.get("compile_vae", False)  # compiled, not fallen back
    assert fast.fast.compile_unet == levers.get("compile_unet", False)


@pytest.mark.cuda
def test_graph_replays_fresh_inputs_and_other_shapes_get_their_own(tiny_sd, embed_cache):
    sd = _sd(tiny_sd, "cuda", "fp16", unet_graph=True)
    emb = sd.get_text_embeds(["", "a red cube", "", "a blue ball"]).half()
    for B in (1, 2, 1):
        x = torch.randn(2 * B, 4, sd.latent_size, sd.latent_size, device="cuda").half()
        t = torch.randint(20, 980, (2 * B,), device="cuda")
        e = torch.cat([emb[:B], emb[2 : 2 + B]])
        got = sd.predict_noise(x, t, e).clone()
        with torch.no_grad():
            want = unet_eager(sd.unet, x, t, e)
        assert _rel(got.double(), want.double()) < 5e-3
    assert len(sd.fast._graphs) == 2  # one per batch size, each captured once


def test_cpu_ignores_graph_levers_and_matches_eager(tiny_sd, embed_cache):
    """On a CPU the graph levers are off and the result is the eager one exactly."""
    eager = _sd(tiny_sd, "cpu")
    fast = _sd(
        tiny_sd,
        "cpu",
        unet_graph=True,
        vae_graph=True,
        vae_channels_last=True,
        vae_fused_gn=True,
        unet_traced="auto",
    )
    paths = fast.fast
    assert not paths.unet_graph and not paths.vae_graph and paths.unet_traced is None and not paths.on
    assert not paths.vae_channels_last and not paths.vae_fused_gn  # they belong to the GPU encoder path
    emb = eager.get_text_embeds(["", "a red cube"])
    assert torch.equal(_sds_grad(eager, emb, 0), _sds_grad(fast, emb, 0))


def test_channels_last_gives_the_same_gradient_on_cpu(tiny_sd, embed_cache):
    eager = _sd(tiny_sd, "cpu")
    fast = _sd(tiny_sd, "cpu", channels_last=True)
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    emb = eager.get_text_embeds(["", "a red cube"])
    for as_latent in (False, True):
        a, b = _sds_grad(eager, emb, 3, as_latent), _sds_grad(fast, emb, 3, as_latent)
        assert _rel(b, a) < 1e-5


def test_fused_qkv_gives_the_unfused_prediction_on_cpu(tiny_sd, embed_cache):
    """One GEMM for q/k/v (self-attention) and k/v (cross-attention): the same noise prediction
    and SDS gradient, the unfused projections dropped, and traced artifacts keyed apart."""
    from diffusers.models.attention_processor import Attention

    plain = _sd(tiny_sd, "cpu")
    fused = _sd(tiny_sd, "cpu", unet_fused_qkv=True)
    attns = [m for m in fused.unet.modules() if isinstance(m, Attention)]
    assert fused.fast.unet_fused_qkv and attns and all(m.fused_projections for m in attns)
    assert all(not hasattr(m, "to_k") and not hasattr(m, "to_v") for m in attns)
    assert all(hasattr(m, "to_q") == m.is_cross_attention for m in attns)
    assert not any(p.requires_grad for p in fused.unet.parameters())
    n_plain = sum(p.numel() for p in plain.unet.parameters())
    assert sum(p.numel() for p in fused.unet.parameters()) == n_plain  # weights not held twice
    emb = plain.get_text_embeds(["", "a red cube"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, plain.latent_size, plain.latent_size, generator=g)
    t = torch.tensor([300, 300])
    with torch.no_grad():
        a, b = plain.predict_noise(x, t, emb), fused.predict_noise(x, t, emb)
    assert _rel(b.double(), a.double()) < 1e-5
    assert _rel(_sds_grad(fused, emb, 2), _sds_grad(plain, emb, 2)) < 1e-5
    sig = signature(x, t, emb)
    assert fused.fast.traced_key_for(sig) != plain.fast.traced_key_for(sig)
    assert plain.fast.traced_key_for(sig) == traced_key(
        sd_utils.fingerprint(plain.key), plain.dtype, sig, "cpu"
    )


def _fake_traced(sd: StableDiffusion, tmp_path, sig: tuple, calls: list) -> None:
    """Pretend trace.py made an artifact for ``sig``: the loader returns a counting eager UNet."""
    key = sd.fast.traced_key_for(sig)
    (tmp_path / f"{key}.pt2").write_bytes(b"")
    meta = {"key": key, "package": f"{key}.pt2", "inputs": [list(map(str, s)) for s in sig]}
    (tmp_path / f"{key}.json").write_text(json.dumps(meta))

    def load(meta_path):
        assert meta_path.name == f"{key}.json"

        def fn(x, t, emb):
            calls.append(x.shape)
            return unet_eager(sd.unet, x, t, emb)

        return fn

    sd.fast._load_traced = load


def test_traced_unet_is_used_when_it_matches_and_eager_otherwise(tiny_sd, embed_cache, tmp_path, capsys):
    sd = _sd(tiny_sd, "cpu")
    # Traced artifacts are for CUDA; drive the CPU model through the same lookup.
    sd.fast.unet_traced, sd.fast.traced_dir, sd.fast.on = "auto", tmp_path, True
    emb = sd.get_text_embeds(["", "a red cube"])
    x = torch.randn(2, 4, sd.latent_size, sd.latent_size)
    t = torch.tensor([100, 100])
    calls: list = []
    _fake_traced(sd, tmp_path, signature(x, t, emb), calls)
    with torch.no_grad():
        out = sd.predict_noise(x, t, emb)
        assert calls == [x.shape] and torch.allclose(out, unet_eager(sd.unet, x, t, emb))
        # Another batch size (or Perp-Neg's larger batch): eager, with one warning line.
        x2, t2, e2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([emb, emb])
        sd.predict_noise(x2, t2, e2)
        sd.predict_noise(x2, t2, e2)
    assert len(calls) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[speed]")]
    assert len(err) == 1 and "running eager" in err[0] and "(4, 4," in err[0]


def test_explicit_traced_path_of_another_model_falls_back_with_a_warning(
    tiny_sd, embed_cache, tmp_path, capsys
):
    sd = _sd(tiny_sd, "cpu")
    meta = {"key": "0" * 24, "package": "other.pt2", "inputs": [["(2, 4, 64, 64)"]], "dtype": "torch.float16"}
    (tmp_path / "other.json").write_text(json.dumps(meta))
    sd.fast.unet_traced, sd.fast.on = str(tmp_path / "other.pt2"), True
    emb = sd.get_text_embeds(["", "a red cube"])
    x = torch.randn(2, 4, sd.latent_size, sd.latent_size)
    with torch.no_grad():
        out = sd.predict_noise(x, torch.tensor([5, 5]), emb)
    assert torch.allclose(out, unet_eager(sd.unet, x, torch.tensor([5, 5]), emb))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[speed]")]
    assert len(err) == 1 and "does not match" in err[0] and "running eager" in err[0]


def test_O_turns_on_the_measured_levers_and_says_so():
    opt, notes = parse_args(["--text", "x", "-O"])
    for name, value in O_SPEED_DEFAULTS.items():
        assert getattr(opt, name) == value
        assert f"{name} = {value} (-O)" in notes
    opt, notes = parse_args(["--text", "x", "-O", "--no-unet_graph"])
    assert opt.unet_graph is False and not any(n.startswith("unet_graph") for n in notes)
    opt, _ = parse_args(["--text", "x"])
    assert not (opt.unet_graph or opt.vae_graph or opt.channels_last or opt.compile_unet)
    assert opt.unet_traced == "auto"


def test_trace_keeps_no_package_that_cannot_be_loaded(tmp_path):
    """trace.py loads a compiled package in a fresh process before keeping it: a file that is
    no package (or one whose loader crashes) is reported in one line, not loaded in-process."""
    import importlib.util
    from pathlib import Path

    # By path: "trace" is also a standard-library module name.
    spec = importlib.util.spec_from_file_location("df_trace", Path(__file__).parent.parent / "trace.py")
    trace_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trace_script)
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a package")
    problem = trace_script.load_check(bad)
    assert problem is not None and "fresh process" in problem


def test_traced_package_is_bound_to_the_live_unet_weights():
    """A package compiled without its weights gets the live UNet's own tensors (no copy)."""
    unet = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))

    class Runner:  # the two methods of an AOTInductor runner that binding uses
        def get_constant_fqns(self):
            return ["unet.0.weight", "unet.1.bias"]

        def load_constants(self, constants, check_full_update, user_managed):
            self.got = (constants, check_full_update, user_managed)

    runner = Runner()
    sd_fast.bind_live_weights(runner, unet)
    constants, full, user_managed = runner.got
    assert set(constants) == {"unet.0.weight", "unet.1.bias"} and full and user_managed
    assert constants["unet.0.weight"].data_ptr() == unet[0].weight.data_ptr()
    assert constants["unet.1.bias"].data_ptr() == unet[1].bias.data_ptr()


def test_trace_stats_merges_overlapping_kernels_and_finds_gaps(tmp_path):
    """scripts/trace_stats.py (the busy time quoted in docs/history/benchmarks-log.md): overlapping
    kernels on two streams count once, host-side events are ignored, gaps are ranked."""
    import json

    from scripts.trace_stats import gpu_busy, summary

    ev = [
        {"ph": "X", "cat": "kernel", "name": "a", "ts": 0, "dur": 100},
        {"ph": "X", "cat": "kernel", "name": "b", "ts": 50, "dur": 100},  # overlaps a
        {"ph": "X", "cat": "cpu_op", "name": "host", "ts": 150, "dur": 500},  # not GPU time
        {"ph": "X", "cat": "gpu_memcpy", "name": "copy", "ts": 400, "dur": 50},
        {"ph": "X", "cat": "kernel", "name": "c", "ts": 460, "dur": 40},
    ]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": ev}))
    s = gpu_busy(path)
    assert s["span_ms"] == 0.5 and s["busy_ms"] == 0.24
    assert [g[1:] for g in s["gaps"]] == [("b", "copy"), ("copy", "c")]
    assert s["gaps"][0][0] == 0.25
    assert "busy 0.12 ms/step (48%)" in summary(path, steps=2)
