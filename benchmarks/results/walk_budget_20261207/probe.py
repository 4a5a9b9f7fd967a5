"""The default clean walk with other settings on finished quality-matrix cells (their backdoored model and masks).

    python probe.py WORK OUT.jsonl NAME '{walk keyword arguments}' BUDGET [CELL_FILTER]

WORK is a `python -m anp_fast_bench.quality --work` folder; every cell/method with an eval.json and its
backdoored.safetensors is read. The walk sees the cell's clean data only (ANP's clean set decides, the held-out
split checks); the test set and triggered data are only measured. One JSON line per cell/method; resumable."""
import glob
import json
import os
import sys
import time

import torch

from anp_fast import load_masks, selection
from anp_fast.pruning import prune, pruned_count
from anp_fast_bench import quality

work, out, name, kw, budget = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), float(sys.argv[5])
only = sys.argv[6] if len(sys.argv) > 6 else ""
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
done = set()
if os.path.exists(out):
    done = {(r["cell"], r["method"], r["variant"]) for r in map(json.loads, open(out))}
s = quality.Settings(work=work)
for ev_path in sorted(glob.glob(os.path.join(work, "*", "*", "s*", "*", "eval.json"))):
    base = json.load(open(ev_path))
    cell_dir = os.path.dirname(os.path.dirname(ev_path))
    if (only and only not in ev_path) or (base["cell"], base["method"], name) in done \
            or not os.path.exists(os.path.join(cell_dir, "backdoored.safetensors")):
        continue
    cell = quality.Cell(base["data"], base["attack"], base["rate"], base["seed"])
    model, _, ev = quality._setup(cell, s)
    masks = load_masks(os.path.join(cell_dir, base["method"], "masks.txt"))
    t = time.perf_counter()
    rule, report = selection.walk(model, masks, ev, budget, **kw)
    after = ev(prune(model, masks, **rule))
    row = {"cell": base["cell"], "method": base["method"], "variant": name, "walk_options": kw, "budget": budget,
           "before": base["before"], "after": after, "pruned": pruned_count(masks, **rule), "report": report,
           "default_after": base["after"], "default_pruned": base["pruned"],
           "seconds": round(time.perf_counter() - t, 1)}
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{base['cell']} {base['method']} {name}: ACC {100 * base['before']['acc']:.1f} -> {100 * after['acc']:.1f}, "
          f"ASR {100 * after['asr']:.1f} ({row['pruned']} pruned); default {100 * base['after']['acc']:.1f}, "
          f"{100 * base['after']['asr']:.1f} ({base['pruned']})", flush=True)
