#!/usr/bin/env bash
# Mosaic GPU flash-attention forward (issue #5) on one Hopper GPU, in one call (< 8 minutes):
#   bash experiments/gpu_flash_mosaic.sh
# 1) correctness vs XLA (out / lse / -inf rows / grads through the custom_vjp), killed after
#    CHECK_DEADLINE_S; 2) forward TFLOP/s vs cuDNN and the Triton kernel (dense T 2K/8K/32K,
#    D 64/128, H 16, causal and not; block-sparse 50/25/10 % at T 16K/32K), new measurements
#    stop after BENCH_BUDGET_S, the process is killed after BENCH_DEADLINE_S. Each phase runs in
#    its own process (a hung or faulting kernel cannot take the other down) and writes its JSON
#    to $OUT after every case. jax is the machine's own; no extra packages.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/runs/gpu_flash_mosaic_out}
mkdir -p "$OUT"
t0=$(date +%s)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
timeout -k 10 "${CHECK_DEADLINE_S:-180}" python3 -u -m experiments.check_flash_mosaic --section check \
  --out "$OUT" 2>&1 | tee "$OUT/check.log" | grep -v '^  \|^Traceback\|^    '
rc_check=${PIPESTATUS[0]}
echo "check exit $rc_check after $(( $(date +%s) - t0 )) s"
left=$(( 440 - ($(date +%s) - t0) ))
budget=$(( left - 50 ))
[ "$budget" -gt "${BENCH_BUDGET_S:-260}" ] && budget=${BENCH_BUDGET_S:-260}
timeout -k 10 "${BENCH_DEADLINE_S:-$left}" python3 -u -m experiments.check_flash_mosaic --section bench \
  --budget "$budget" --out "$OUT" 2>&1 | tee "$OUT/bench.log" | grep -v '^  \|^Traceback\|^    '
rc_bench=${PIPESTATUS[0]}
echo "bench exit $rc_bench after $(( $(date +%s) - t0 )) s"
grep -h "^check .*: \(FAIL\|ERROR\)" "$OUT/check.log" | cut -c1-300 || true
ls -la "$OUT"
exit $(( rc_check || rc_bench ))
