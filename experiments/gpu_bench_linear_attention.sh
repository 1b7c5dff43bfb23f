#!/usr/bin/env bash
# Linear-attention benchmark (issue #7) on one GPU machine, in one call (< 8 minutes):
#   bash experiments/gpu_bench_linear_attention.sh [extra bench_linear_attention flags]
# Needs .whl/ carried with fla_core-*.whl and einops-*.whl (download them on the dev machine:
#   bash ../tools/gpu_wheels.sh fla-core==0.6.0; python3 -m pip download --no-deps einops -d .whl).
# torch / triton / jax are the machine's own. Runs experiments/bench_linear_attention.py with the
# tile sweep (the Python side stops starting new measurements after BENCH_BUDGET_S seconds and
# records what it skipped; the whole run is killed after BENCH_DEADLINE_S), then copies the JSON
# (also written to benchmarks/) and the log to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/runs/bench_linear_attention_out}
mkdir -p "$OUT" benchmarks
t0=$(date +%s)
site=${SITE:-/tmp/site}
export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('fla') and u.find_spec('einops')))"; then
  whls=$(ls .whl/fla_core-*.whl .whl/einops-*.whl 2>/dev/null)
  if [ -n "$whls" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" $whls \
      || echo "pip install of $whls failed: fla rows will record the import error"
  else
    echo "no fla-core / einops wheels in .whl/ (carry .whl): fla rows will record the import error"
  fi
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # torch (fla) shares the GPU with jax
export TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
timeout -k 10 "${BENCH_DEADLINE_S:-450}" python3 -u -m experiments.bench_linear_attention --sweep \
  --time-budget "${BENCH_BUDGET_S:-370}" --out benchmarks "$@" 2>&1 | tee "$OUT/bench_linear_attention.log"
rc=${PIPESTATUS[0]}
cp benchmarks/bench_linear_attention_*.json "$OUT/" 2>/dev/null || true
echo "exit $rc after $(( $(date +%s) - t0 )) s"
ls -la "$OUT"
exit "$rc"
