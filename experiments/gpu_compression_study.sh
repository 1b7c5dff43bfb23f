#!/usr/bin/env bash
# The compression study (issue #4) on one GPU machine, one dataset per call:
#   bash experiments/gpu_compression_study.sh shapes    # then, in a second call:
#   bash experiments/gpu_compression_study.sh digits
# ("all" runs both, one after the other: more than one 10-minute call's worth.)
# Needs the wheels of ml_collections/grain/tfds/array_record in .whl/ (carry it). Each part
# stops itself after STUDY_DEADLINE_S seconds (default 470) and writes what is done; the same
# call again on a still-warm machine resumes (models and rows under runs/ are kept).
# Results go to $OUT (the files of benchmarks/ to copy back, README snippet, logs tarball).
# STUDY_ARGS (optional): more --config.* overrides, e.g. the process counts
#   STUDY_ARGS="--config.study.train_parallel=11 --config.study.sweep_workers=12".
set -euo pipefail
part=${1:-shapes}
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import ml_collections, grain, tensorflow_datasets, array_record" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # several processes share the GPU
export EFFICIENT_MLLM_DATA_DIR=${EFFICIENT_MLLM_DATA_DIR:-$PWD/runs/data}
export TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-$PWD/runs/gpu_study_out}
mkdir -p "$OUT"
deadline=${STUDY_DEADLINE_S:-470}

run_part() {  # $1: shapes | digits | smoke (toy scale, 2 processes: checks the script)
  local p=$1 arg=study bench=benchmarks/compression_sweep_$1 extra=()
  [ "$p" = digits ] && arg=study,digit_grid
  if [ "$p" = smoke ]; then
    arg=smoke bench=runs/study_smoke/bench/compression_sweep_smoke
    extra=(--config.study.train_parallel=2 --config.study.sweep_workers=2)
  fi
  python3 -m experiments.compression_study --config "configs/compression_sweep.py:$arg" \
    --workdir "runs/study_$p" --benchmark_out "$bench" \
    --config.study.deadline_s="$deadline" ${extra[@]+"${extra[@]}"} ${STUDY_ARGS:-} 2>&1 | tee -a "runs/study_$p.log" \
    | grep -E '^\[study\]|Error' || true
  cp "$bench.md" "$bench.json" "$OUT/" || true
  cp "runs/study_$p/readme_table.md" "$OUT/readme_table_$p.md" || true
  [ "$part" = all ] || cp "${bench}"_pareto_*.png "$OUT/" || true
}

case "$part" in
  shapes|digits|smoke) parts=$part ;;
  all) parts="shapes digits" ;;
  *) echo "usage: $0 shapes|digits|all|smoke" >&2; exit 2 ;;
esac
mkdir -p runs
for p in $parts; do run_part "$p"; done
# per-model reports/metrics, sweep rows, logs (and, for "all", the plots), no checkpoints
tar czf "$OUT/study_${part}.tar.gz" --exclude=checkpoints --exclude='*.tmp*' \
  $(for p in $parts; do echo "runs/study_$p" "runs/study_$p.log"; ls benchmarks/compression_sweep_"$p"_pareto_*.png 2>/dev/null; done) || true
ls -la "$OUT"
