#!/usr/bin/env bash
# One GPU session's checks in one command: the CUDA tests (the Triton kernels compiled, CUDA graphs, the CUDA
# ledger path) and the GPU benchmarks, each under its own time limit so one slow step cannot eat the others.
# Writes one log (log.txt) and the benchmarks' JSON to $OUT (default bench/out/gpu). Expects the machine's
# torch/triton and diffusers importable (on the lent GPU machine: wheels carried in .whl/, see
# ../shared/gpu/README.md):
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   bash bench/gpu_session.sh [tests|e2e|gated|compile|loss|direction|layout|refbatch|cli ...]   # default: all, in order
#
# One device call may run 600 s at most and a session has ~15 minutes of device time, machine start included: the
# default list takes longer than that (worst case ~17 min of step limits), so name the steps of each call, most
# wanted first, e.g. `e2e layout` (~6 min), then `cli refbatch tests` (~6 min).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
PY=${PY:-python3}
REPEATS=${REPEATS:-100}  # timed runs per kernel case (the tests run a smoke with a few)
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests e2e gated compile loss direction layout refbatch cli)
# Unknown steps fail before any install or import.
for step in "${steps[@]}"; do
  case $step in tests|e2e|gated|compile|loss|direction|layout|refbatch|cli) ;;
    *) echo "unknown step $step (steps: tests e2e gated compile loss direction layout refbatch cli)"; exit 2 ;;
  esac
done
mkdir -p "$OUT"

# spo_fast.kernels is the top-level kernels/ folder mapped by setup.py: an editable install makes it importable.
# The C++ extension is skipped (SPO_FAST_BUILD_EXT=0): nothing here needs it and CI tests it.
if ! $PY -c "import spo_fast.kernels" 2>/dev/null; then
  SPO_FAST_BUILD_EXT=${SPO_FAST_BUILD_EXT:-0} $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . \
    >> "$OUT/log.txt" 2>&1 || echo "editable install failed (see log.txt)" | tee -a "$OUT/log.txt"
fi

$PY - <<'EOF' 2>&1 | tee -a "$OUT/log.txt"
import platform, torch, triton, spo_fast.kernels
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
try:
    import diffusers, transformers, peft
    print("diffusers", diffusers.__version__, "transformers", transformers.__version__, "peft", peft.__version__)
except Exception as exc:  # the benches need them; say so in the log
    print("missing:", exc)
EOF

for step in "${steps[@]}"; do
  t0=$(date +%s)
  echo "== $step" >> "$OUT/log.txt"
  case $step in
    tests)
      # Kernel test files run compiled on the GPU (their CPU shapes too); -m cuda adds the GPU-only tests elsewhere.
      timeout 150 $PY -m pytest -q -p no:cacheprovider --timeout 90 --maxfail 10 -rs --durations 15 \
        tests/test_kernel_spo_loss.py tests/test_head_kernel.py tests/test_direction_kernel.py \
        tests/test_cuda_graphs.py tests/test_ledger.py >> "$OUT/log.txt" 2>&1 ;;
    loss)
      timeout 80 $PY bench/bench_loss.py --repeats "$REPEATS" --out "$OUT/bench_loss.json" >> "$OUT/log.txt" 2>&1 ;;
    direction)
      timeout 50 $PY bench/bench_direction_tail.py --repeats "$REPEATS" --out "$OUT/bench_direction_tail.json" \
        >> "$OUT/log.txt" 2>&1 ;;
    e2e)
      # One warm-up and one timed iteration per mode: on an H200 an iteration takes ~19-24 s (official, fast), 6-14 s
      # (head modes) and building a mode ~5-17 s: the four first modes took 208 s there (2026-12-04).
      # E2E_MODES overrides the list (e.g. the modes a session has not measured yet); a mode that fails (out of
      # memory) is reported under failed_modes in the JSON and the others go on.
      # shellcheck disable=SC2086
      timeout 330 $PY bench/bench_e2e.py --scale full --modes ${E2E_MODES:-official fast fast+head fast+head_verify fast+head_refresh_x0} \
        --warmup 1 --iters 1 --out "$OUT/bench_e2e_full.json" >> "$OUT/log.txt" 2>&1 ;;
    gated)
      # The head modes with the teacher on the scored steps above t = GATE_T (preference.head_max_timestep; 500:
      # 5 of 16 steps at SD1.5's 20 steps, divert 4), beside the official loop: ~3 min.
      timeout 240 $PY bench/bench_e2e.py --scale full --modes official fast+head fast+head_refresh_x0 \
        --head-max-timestep "${GATE_T:-500}" --warmup 1 --iters 1 --out "$OUT/bench_e2e_full_gated.json" \
        >> "$OUT/log.txt" 2>&1 ;;
    compile)
      # model.compile at SD1.5 size: the fast path and the head alone, eager vs torch.compile (training and reference
      # forwards compiled; sampling stays on CUDA graphs). Two warm-up iterations absorb the compilation (several
      # graphs, ~1 min each on a GPU host): not measured yet, hence the generous limit.
      timeout 420 $PY bench/bench_e2e.py --scale full --modes official fast fast@compile fast+head fast+head@compile \
        --warmup 2 --iters 1 --out "$OUT/bench_e2e_full_compile.json" >> "$OUT/log.txt" 2>&1 ;;
    layout)
      # NCHW vs channels_last (and cuDNN autotuning) for the VAE decode and the UNet at SD1.5 size, bf16: ~1 min.
      timeout 90 $PY bench/bench_conv_layout.py --dtypes bf16 --repeats 10 --out "$OUT/bench_conv_layout.json" \
        >> "$OUT/log.txt" 2>&1 ;;
    refbatch)
      # The training phase at SD1.5 size with the reference per micro-batch vs ahead in larger forwards: ~1-2 min.
      timeout 150 $PY bench/bench_reference_batches.py --scale full --repeats 3 --settings 1 4 \
        --out "$OUT/bench_reference_batches.json" >> "$OUT/log.txt" 2>&1 ;;
    cli)
      # python -m spo_fast.train / train_head / torchrun on the device, resume and LoRA export included: ~2-3 min.
      timeout 200 $PY bench/cli_check.py --device "${CLI_DEVICE:-cuda}" --iterations 2 --out "$OUT/cli_check.json" \
        >> "$OUT/log.txt" 2>&1 ;;
  esac
  echo "== $step: rc $? in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/log.txt"
done
