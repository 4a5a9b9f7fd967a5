"""Second ANP round on a demo run: prune by the demo's chosen rule, learn masks again on the pruned model,
walk again; print the outcome. usage: round2.py RUN SEED [ITERS]"""
import json, sys, time, torch
sys.path.insert(0, "..")
from demo_run import load_run
from anp_fast import ANPConfig, save_masks
from anp_fast.engine import optimize_masks
from anp_fast.datasets import load_digits
from anp_fast.pruning import prune, pruned_count
from anp_fast.selection import walk
run, seed = sys.argv[1], int(sys.argv[2]); iters = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
model, masks, ev = load_run(run)
before = ev(model)
chosen = json.load(open(f"{run}/summary.json"))["chosen"]
if "neurons" not in chosen:
    chosen = walk(model, masks, ev)
p1 = prune(model, masks, **chosen); r1 = ev(p1)
dseed = int(run.rstrip("/").split("/")[-1].split("_")[0][1:])
splits = load_digits(seed=dseed, holdout_fraction=0.1)
t0 = time.perf_counter()
res = optimize_masks(p1, (splits.clean.x, splits.clean.y), ANPConfig(iters=iters, seed=seed, precision="bf16"), progress=False)
tag = run.rstrip("/").split("/")[-1]
save_masks(res.masks, f"./{tag}_round2_s{seed}.masks.txt")
rule2 = walk(p1, res.masks, ev)
p2 = prune(p1, res.masks, **rule2); r2 = ev(p2)
out = {"run": run, "threads": torch.get_num_threads(), "round1": {"pruned": pruned_count(masks, **chosen), "drop": round(100*(before["acc"]-r1["acc"]), 2), "asr": round(100*r1["asr"], 1)},
       "round2": {"pruned": pruned_count(res.masks, **rule2), "drop": round(100*(before["acc"]-r2["acc"]), 2), "asr": round(100*r2["asr"], 1)}, "s": round(time.perf_counter()-t0)}
print(json.dumps(out), flush=True)
open("./round2.jsonl", "a").write(json.dumps(out) + "\n")
