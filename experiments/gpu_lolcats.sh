#!/usr/bin/env bash
# LoLCATs linearisation (issue #7) on one GPU machine, in one call (< 10 minutes):
#   bash experiments/gpu_lolcats.sh [quickstart|shapes_vqa_base] [variant spec ...]
# Trains the base config's teacher (TRAIN_STEPS, default: the config's own; skipped when a
# still-warm machine already holds that checkpoint), then linearises it with each variant
# (default: LoLCATs window 16 and 4, pure Hedgehog, BASED, elu+1 linear) through
# experiments/linearize.py and copies each linearize.{md,json} and loss plot to $OUT.
# Needs the wheels of ml_collections/grain/tfds/array_record in .whl/ (carry it). Stops starting
# new variants LOLCATS_DEADLINE_S seconds (default 540) after it started. Extra flags:
# TRAIN_FLAGS (experiments.train), LINEARIZE_FLAGS (experiments.linearize), e.g.
#   LINEARIZE_FLAGS="--config.linearize.transfer.steps=600 --config.linearize.batch_size=128"
set -uo pipefail
base=${1:-quickstart}
shift || true
if [ "$#" -gt 0 ]; then
  variants=("$@")
else
  variants=(
    "linear_swa(feature_map='hedgehog', feature_dim=32, window=16)"
    "linear_swa(feature_map='hedgehog', feature_dim=32, window=4)"
    "hedgehog(feature_dim=32)"
    "based"
    "linear"
  )
fi
cd "$(dirname "$0")/.."
t0=$(date +%s)
deadline=$(( t0 + ${LOLCATS_DEADLINE_S:-540} ))
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import ml_collections, grain, tensorflow_datasets, array_record" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export EFFICIENT_MLLM_DATA_DIR=${EFFICIENT_MLLM_DATA_DIR:-$PWD/runs/data}
export TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-$PWD/runs/lolcats_out}
mkdir -p "$OUT" runs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"

teacher=runs/lolcats_teacher_$base
steps_flag=()
[ -n "${TRAIN_STEPS:-}" ] && steps_flag=(--config.train.steps="$TRAIN_STEPS")
echo "== training the $base teacher ($(date +%T))"
timeout -k 10 $(( deadline - $(date +%s) )) python3 -u -m experiments.train \
  --config "configs/$base.py" --workdir "$teacher" --config.output.progress=False \
  ${steps_flag[@]+"${steps_flag[@]}"} ${TRAIN_FLAGS:-} 2>&1 | tee "$OUT/train_$base.log" | grep -E "report|validation|Error" || true
cp "$teacher/report.md" "$OUT/teacher_report_$base.md" 2>/dev/null || true
cp "$teacher/final_metrics.json" "$OUT/teacher_metrics_$base.json" 2>/dev/null || true

i=0
for v in "${variants[@]}"; do
  i=$(( i + 1 ))
  left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt 60 ]; then
    echo "== skipped (deadline): $v" | tee -a "$OUT/skipped.txt"
    continue
  fi
  work=runs/lolcats_${base}_$i
  echo "== $i: $v ($(date +%T), ${left}s left)"
  timeout -k 10 "$left" python3 -u -m experiments.linearize --config "configs/lolcats.py:$base" \
    --checkpoint "$teacher" --workdir "$work" --config.output.progress=False \
    "--config.linearize.variant=$v" ${LINEARIZE_FLAGS:-} 2>&1 | tee "$OUT/linearize_${base}_$i.log" | grep -E "^\[linearize\]|Error" || true
  for f in linearize.md linearize.json linearize_losses.png; do
    cp "$work/$f" "$OUT/${base}_${i}_$f" 2>/dev/null || true
  done
done
echo "done after $(( $(date +%s) - t0 )) s"
ls -la "$OUT"
