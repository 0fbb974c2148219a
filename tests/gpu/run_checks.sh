#!/usr/bin/env bash
# GPU checks that CI cannot run (one GPU, < 5 min). Sections run alone or together:
#
#   tests/gpu/run_checks.sh                       # all: kernels te fp8tp train bench dali
#   tests/gpu/run_checks.sh kernels graphs bench  # any subset, in this order
#
#   kernels  Triton kernels and pinned SDPA backends vs their references (forward + grads)
#   te       Transformer Engine FP8 linear / attention vs torch ("unverified (not installed)" without TE)
#   fp8tp    video 1b, parallel.tp=2 on 2 GPUs: train.fp8=true vs bf16 loss, every TP linear on TE's FP8
#            GEMM, FP8 scales equal over tp ("unverified (...)" with fewer than 2 GPUs or without TE)
#   compile  video 1b: eager vs torch.compile (inductor): loss within bf16 tolerance, step-time speedup
#   graphs   video 1b: eager vs CUDA graphs (train.cuda_graphs=true): same checks
#   train    video 1b: all modes (eager, triton kernels, compile, CUDA graphs)
#   bench    `megagen bench --json` of video 1b on this GPU (MFU)
#   dali     DALI (map, workers) vs torch loaders into GPU memory at the Movie Gen 768 px latent: same
#            batches, GB/s vs raw read ("unverified (not installed)" without nvidia.dali)
#
# Logs and JSON go to $OUT (default ./gpu-out); a short table is printed last. Exit status: non-zero if a
# check failed. Without a GPU it says so and exits 0.
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-./gpu-out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(kernels te fp8tp train bench dali)
for s in "${sections[@]}"; do
  case "$s" in kernels|te|fp8tp|compile|graphs|train|bench|dali) ;; *) echo "unknown section: $s" >&2; exit 2 ;; esac
done

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "run_checks: no GPU (torch.cuda.is_available() is False); nothing to check."
  exit 0
fi

status=0
has() { local x; for x in "${sections[@]}"; do [ "$x" = "$1" ] && return 0; done; return 1; }
run() {  # run NAME TIMEOUT CMD...: log to $OUT/NAME.log, remember failures
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s (log $OUT/$name.log)"
  [ $rc -ne 0 ] && { status=1; tail -n 15 "$OUT/$name.log"; }
  return 0
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "from megagen.kernels import report_extras; print(report_extras(force=True))"; } | tee "$OUT/env.txt"

if has kernels; then
  run kernels 150 "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu/test_kernels_gpu.py \
    --junitxml="$OUT/kernels.xml"
fi
if has te; then
  if "$PY" -c "import transformer_engine.pytorch" 2>/dev/null; then
    rm -f "$OUT/te.txt"
    run te 90 "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu/test_te_gpu.py --junitxml="$OUT/te.xml"
  else
    echo "unverified (not installed)" | tee "$OUT/te.txt"
  fi
fi
if has fp8tp; then
  rm -f "$OUT/fp8tp.txt" "$OUT/fp8tp.json"
  gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if ! "$PY" -c "import transformer_engine.pytorch" 2>/dev/null; then
    echo "unverified (transformer_engine not installed)" | tee "$OUT/fp8tp.txt"
  elif [ "$gpus" -lt 2 ]; then
    echo "unverified (tp=2 needs 2 GPUs, this machine has $gpus)" | tee "$OUT/fp8tp.txt"
  else
    run fp8tp 240 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.gpu.fp8_tp --out "$OUT"
  fi
fi
modes=()
if has train; then modes=(eager triton compile cuda_graphs); else
  has compile && modes+=(eager compile)
  has graphs && { has compile || modes+=(eager); modes+=(cuda_graphs); }
fi
if [ ${#modes[@]} -gt 0 ]; then
  run modes 240 "$PY" -m tests.gpu.train_modes modes --out "$OUT" --only "${modes[@]}"
fi
if has bench; then
  run bench 120 "$PY" -m tests.gpu.train_modes bench --out "$OUT" --steps 5 --warmup 2
fi
if has dali; then
  run dali 150 "$PY" -m tests.gpu.dali_loaders --out "$OUT"
fi

"$PY" -m tests.gpu.summary "$OUT"
exit $status
