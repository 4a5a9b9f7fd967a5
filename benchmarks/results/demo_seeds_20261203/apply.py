"""The library's clean walk (with options) on a finished demo run: python apply.py RUN_DIR '[{OPTIONS}, ...]' OUT.jsonl

RUN_DIR is an `anp-fast demo --seed S` output folder named sS_tT (its backdoored.pt and masks.txt); the walk
sees the demo's clean data only (held-out split and ANP's clean set); triggered data is only measured."""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "demo_seeds_20261202"))
from demo_run import load_run  # noqa: E402

from anp_fast.pruning import prune  # noqa: E402
from anp_fast.selection import walk  # noqa: E402

run, variants, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model, masks, ev = load_run(run)
before = ev(model)
for v in variants:
    t0 = time.perf_counter()
    rule, report = walk(model, masks, ev, **v)
    after = ev(prune(model, masks, **rule))
    row = dict(run=os.path.basename(run.rstrip("/")), variant=v, threads=torch.get_num_threads(),
               pruned=sum(len(i) for i in rule["neurons"].values()), **report,
               acc_before=round(100 * before["acc"], 2), acc_after=round(100 * after["acc"], 2),
               drop=round(100 * (before["acc"] - after["acc"]), 2), asr_before=round(100 * before["asr"], 1),
               asr=round(100 * after["asr"], 1), s=round(time.perf_counter() - t0, 1))
    print(json.dumps(row), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
