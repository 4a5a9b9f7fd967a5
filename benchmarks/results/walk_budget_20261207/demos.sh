#!/usr/bin/env bash
# The ten demos (seeds 0-4 x {1, 2} threads, bf16) with the walk deciding on half the budget, then the current
# default (budget 2, decisions on the whole budget) replayed on each run's checkpoint and masks.
# Usage: demos.sh OUT HALF_SRC   HALF_SRC: a copy of anp_fast/ (with its built .so files) whose
#        selection.WALK_DECIDE_FRACTION is 0.5; it goes first on PYTHONPATH for the demos only.
# The 1- and 2-thread demo of a seed run at once (OMP_WAIT_POLICY=PASSIVE; the thread count, not the load, sets
# the reduction order). About 6-11 minutes per seed on 2 cores.
set -euo pipefail
out=${1:?usage: demos.sh OUT HALF_SRC}; half=${2:?usage: demos.sh OUT HALF_SRC}
mkdir -p "$out/replay"
for s in 0 1 2 3 4; do
  for t in 1 2; do
    PYTHONPATH=$half OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=$t MKL_NUM_THREADS=$t anp-fast demo --seed $s \
      --precision bf16 --no-progress --overwrite --out "$out/s${s}_t${t}" > "$out/s${s}_t${t}.log" 2>&1 &
  done
  wait
done
for s in 0 1 2 3 4; do
  for t in 1 2; do
    d=$out/s${s}_t${t}
    OMP_NUM_THREADS=$t MKL_NUM_THREADS=$t anp-fast prune --arch resnet18 --arch-arg width=16 --data digits \
      --checkpoint $d/backdoored.safetensors --masks $d/masks.txt --clean-count 360 --holdout-fraction 0.5 \
      --seed $s --trigger badnets --target 0 --prune auto --budget 2 --out "$out/replay/s${s}_t${t}" \
      --no-progress --overwrite > "$out/replay/s${s}_t${t}.log" 2>&1
  done
done
