#!/usr/bin/env bash
# The MQAR recall-vs-state-size study (issue #7) on one GPU, in one call of at most 10 minutes:
#   bash experiments/gpu_mqar_study.sh            # 12 variants x dims {128, 64, 256}, 480 s budget
#   bash experiments/gpu_mqar_study.sh smoke      # seconds: checks the script and the machine
# Extra arguments go to `python -m experiments.mqar_study` (e.g. --variants softmax,based).
# MQAR_BUDGET_S (default 480) is the study's own wall-clock budget: it measures every group's
# step time first and then picks the step count that fits (see experiments/mqar_study.py); a
# hard `timeout` 60 s later guarantees the copy below. Needs only jax, flax, optax, numpy and
# matplotlib (no ml-collections / grain / tfds); wheels in .whl/ are installed only if one of
# those is missing. Outputs in $OUT: mqar_study.{json,md,png} (copy them to benchmarks/) and
# mqar_study.log; they are rewritten after every group, so a killed run still leaves a table.
set -uo pipefail
preset=${1:-default}
[ $# -gt 0 ] && shift
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import jax, flax, optax, matplotlib" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-$PWD/runs/gpu_mqar_out}
mkdir -p "$OUT" runs
budget=${MQAR_BUDGET_S:-480}
prefix=runs/mqar_study_$preset
[ "$preset" = smoke ] && budget=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
limit=$(( ${budget%.*} > 0 ? ${budget%.*} + 60 : 300 ))
timeout -k 10 "$limit" python3 -m experiments.mqar_study --preset "$preset" --budget_s "$budget" \
  --out "$prefix" --cache_dir runs/jax_cache "$@" 2>&1 | tee "$OUT/mqar_study.log"
echo "exit: ${PIPESTATUS[0]}"
for ext in json md png; do cp "$prefix.$ext" "$OUT/mqar_study.$ext" 2>/dev/null || true; done
ls -la "$OUT"
