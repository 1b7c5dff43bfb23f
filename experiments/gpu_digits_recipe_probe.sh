#!/usr/bin/env bash
# Trains the variants of configs/digits_recipe_probe.py at once on one GPU (one process each) and
# writes $OUT/digits_recipe_probe.json: per variant its teacher-forced accuracy per question type,
# steps, train time and train-loss curve. Needs the ml_collections/grain/tfds wheels in .whl/.
#   bash experiments/gpu_digits_recipe_probe.sh            # every variant (~6 min on an H200)
#   VARIANTS="base gread50_lr1e3" bash experiments/gpu_digits_recipe_probe.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}:$PWD
python3 -c "import ml_collections, grain, tensorflow_datasets, array_record" 2>/dev/null ||
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
export EFFICIENT_MLLM_DATA_DIR=${EFFICIENT_MLLM_DATA_DIR:-$PWD/runs/data}
OUT=${OUT:-$PWD/runs/digits_probe_out}
mkdir -p "$OUT" runs/digits_probe
export VARIANTS=${VARIANTS:-$(python3 -c "
import importlib.util as u; s = u.spec_from_file_location('p', 'configs/digits_recipe_probe.py')
m = u.module_from_spec(s); s.loader.exec_module(m); print(' '.join(m.VARIANTS))")}
limit=${PROBE_LIMIT_S:-540}
t0=$(date +%s)
# build each distinct dataset of the chosen variants once, before the trainings (they would race)
for v in $(python3 -c "from configs.digits_recipe_probe import VARIANTS as V
first = {V[v][0]: v for v in reversed('$VARIANTS'.split())}; print(' '.join(first.values()))"); do
  python3 -c "from efficient_mllm.data.datasets import build_dataset
from configs.digits_recipe_probe import get_config
build_dataset('digit_grid_vqa', **get_config('$v').data.knobs)" > "runs/digits_probe/data_$v.log" 2>&1 &
done
wait
for v in $VARIANTS; do
  timeout $((limit - ($(date +%s) - t0))) python3 -m experiments.train \
    --config "configs/digits_recipe_probe.py:$v" --workdir "runs/digits_probe/$v" \
    > "runs/digits_probe/$v.log" 2>&1 &
done
wait
echo "probe: $(($(date +%s) - t0)) s"
python3 - "$OUT/digits_recipe_probe.json" <<'PY'
import json, os, sys
out = {}
for v in os.environ["VARIANTS"].split():
    d = f"runs/digits_probe/{v}"
    loss = [(r["step"], r["loss"]) for r in map(json.loads, open(f"{d}/metrics.jsonl"))
            if r.get("split") == "train" and "loss" in r] if os.path.exists(f"{d}/metrics.jsonl") else []
    if not os.path.exists(f"{d}/final_metrics.json"):
        out[v] = {"status": "not finished", "train_loss": loss[::10]}
        continue
    m = json.load(open(f"{d}/final_metrics.json"))
    out[v] = {"status": "ok", "final": m["final"], "steps": m["perf"]["steps"],
              "train_time_s": m["perf"]["train_time_s"], "device": m["perf"]["device_kind"],
              "train_loss": loss[::10]}
    acc = {k.split("/")[-1]: round(x, 3) for k, x in m["final"].items() if "tf_accuracy" in k}
    print(v, acc, flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
PY
