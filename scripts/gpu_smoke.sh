#!/usr/bin/env bash
# GPU smoke run and figures (H100): CUDA tests, render benchmark, an -O fp16 run with a tiny
# random SD, and -O training speed with a random-weight SD 2.1-base model.
#   bash scripts/gpu_smoke.sh OUTDIR
set -u
OUT=${1:-/tmp/gpu_out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
python3 -c "from guidance.sd_factory import build_sd; build_sd('/tmp/tsd', 'tiny'); build_sd('/tmp/sd21', 'sd2.1-base')" > /dev/null 2>&1
echo "== kernel build (first use; cold when the cache folder is new)"
python3 -c "from cuda_kernels import build; m = build.load_kernels(); print('built' if m else 'FAILED', f'in {build.build_seconds:.1f} s at', build.cache_dir())"
echo "== CUDA tests"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py tests/test_renderer.py tests/test_speed.py tests/test_guidance.py tests/test_provider.py > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"; tail -4 "$OUT/pytest.log"
echo "== render benchmark"
timeout 300 python3 scripts/bench_render.py --repeat 20 --kernel_variants --out "$OUT/bench_render.md" > "$OUT/bench_render.log" 2>&1
echo "bench rc=$?"; tail -12 "$OUT/bench_render.log"
echo "== -O fp16 run, tiny random SD"
timeout 150 python3 main.py --text "a red cube" --workspace /tmp/ws_tiny --hf_key /tmp/tsd -O --iters 300 \
  --dataset_size_valid 2 --W 256 --H 256 --dataset_size_test 12 --quiet > "$OUT/run_tiny.log" 2>&1
echo "run rc=$?"; grep -E "epoch|done|test|error" /tmp/ws_tiny/log_df.txt; tail -2 "$OUT/run_tiny.log"
cp /tmp/ws_tiny/results/*_rgb.mp4 /tmp/ws_tiny/validation/*sheet.png "$OUT/" 2>/dev/null
echo "== -O fp16 run, SD 2.1-base architecture (random weights)"
timeout 150 python3 main.py --text "a hamburger" --workspace /tmp/ws_sd21 --hf_key /tmp/sd21 -O --iters 400 \
  --dataset_size_valid 1 --W 128 --H 128 --dataset_size_test 2 --test_interval 1000 --quiet > "$OUT/run_sd21.log" 2>&1
echo "run rc=$?"; grep -E "epoch|done|error" /tmp/ws_sd21/log_df.txt; tail -2 "$OUT/run_sd21.log"
