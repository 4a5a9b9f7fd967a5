"""Evaluate mask variants on a demo run: walk outcome and mask-order curve summary.
usage: analyse.py RUN NAME SPEC [SPEC...]   SPEC: file.masks.txt | file.snaps.pt@K (mean of last K snapshots)
several SPECs are averaged."""
import json, sys, time, torch
sys.path.insert(0, "..")
from demo_run import load_run
from anp_fast.maskfile import load_masks
from anp_fast.pruning import prune, pruned_count, sweep
from anp_fast.selection import walk
run, name, specs = sys.argv[1], sys.argv[2], sys.argv[3:]
model, ref, ev = load_run(run)
def get(spec):
    if "@" in spec:
        f, k = spec.split("@"); d = torch.load(f, weights_only=True); flat = d["masks"][-int(k):].float().mean(0)
        sizes = [ref[n].numel() for n in d["layers"]]
        return {n: t.reshape(ref[n].shape) for n, t in zip(d["layers"], torch.split(flat, sizes))}
    return load_masks(spec)
ms = [get(s) for s in specs]
masks = {n: torch.stack([m[n].float() for m in ms]).mean(0) for n in ms[0]}
before = ev(model)
t0 = time.perf_counter(); rule = walk(model, masks, ev); dt = time.perf_counter() - t0
after = ev(prune(model, masks, **rule))
rows = sweep(model, masks, ev, numbers=list(range(0, 320, 8)))
first = next((r for r in rows if r["asr"] <= 0.05), None)
ok = [r for r in rows if before["acc"] - r["acc"] <= 0.02]
orc = min(ok, key=lambda r: r["asr"])
res = {"run": run, "name": name, "threads": torch.get_num_threads(), "walk_pruned": pruned_count(masks, **rule),
       "drop": round(100 * (before["acc"] - after["acc"]), 2), "asr": round(100 * after["asr"], 1), "walk_s": round(dt),
       "first_cut_asr5": first and (first["number"], round(100 * first["acc"], 1)),
       "oracle_cut": (orc["number"], round(100 * orc["acc"], 1), round(100 * orc["asr"], 1)),
       "asr_at": {r["number"]: round(100 * r["asr"]) for r in rows[::2]}}
print(json.dumps(res), flush=True)
open("./analyse.jsonl", "a").write(json.dumps(res) + "\n")
