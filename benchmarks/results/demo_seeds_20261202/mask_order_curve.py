"""Dense pruning curve of a finished demo run (clean-data metrics and test ACC/ASR per number pruned)."""
import json, sys
from anp_fast.pruning import sweep
from demo_run import load_run

run = sys.argv[1]
model, masks, ev = load_run(run)
numbers = list(range(0, 240, 2)) + list(range(240, 600, 12))
rows = sweep(model, masks, ev, numbers=numbers)
json.dump(rows, open(f"{run}/dense.json", "w"))
print(run, "done", len(rows))
