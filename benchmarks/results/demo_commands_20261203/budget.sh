#!/bin/bash
# apply --prune auto with budgets 2 and 1.5 to each demo run's checkpoint + masks, at the run's thread count
. /work/main/.venv/bin/activate
t=$1; shift
for s in "$@"; do
  for b in 2 1.5; do
    d=/work/demo_new/s${s}_t${t}
    OMP_NUM_THREADS=$t MKL_NUM_THREADS=$t anp-fast prune --arch resnet18 --arch-arg width=16 --data digits \
      --checkpoint $d/backdoored.safetensors --masks $d/masks.txt --clean-count 360 --holdout-fraction 0.5 \
      --seed $s --trigger badnets --target 0 --prune auto --budget $b --out /work/budget/s${s}_t${t}_b$b \
      --no-progress --overwrite > /work/budget/s${s}_t${t}_b$b.log 2>&1
  done
done
