#!/bin/bash
# a walk variant (python kwargs for the default walk) on a demo_half run: anp-fast prune --prune auto, at the run's thread count
. /work/main/.venv/bin/activate
s=$1; t=$2; name=$3; kw=$4; d=/work/notes/demo_half/s${s}_t${t}
OMP_NUM_THREADS=$t MKL_NUM_THREADS=$t python -c "
import anp_fast.selection as S, sys
S._WALKS['walk'] = ('clean-walk+evidence', dict(evidence=True, $kw))
from anp_fast.cli import main
sys.exit(main(sys.argv[1:]))" prune --arch resnet18 --arch-arg width=16 --data digits \
  --checkpoint $d/backdoored.safetensors --masks $d/masks.txt --clean-count 360 --holdout-fraction 0.5 \
  --seed $s --trigger badnets --target 0 --prune auto --budget 2 --out /work/notes/replay/${name}_s${s}_t${t} \
  --no-progress --overwrite > /work/notes/replay/${name}_s${s}_t${t}.log 2>&1
