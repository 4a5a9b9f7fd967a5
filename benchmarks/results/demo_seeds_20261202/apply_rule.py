"""Apply anp_fast.selection.choose (as the demo does) to a finished demo run; print the outcome."""
import json, sys, time, torch
from anp_fast.pruning import prune, pruned_count
from anp_fast.selection import choose
from demo_run import load_run
run, mode = sys.argv[1], sys.argv[2]; budget = float(sys.argv[3]) if len(sys.argv) > 3 else 2.0
model, masks, ev = load_run(run)
before = ev(model); t0 = time.perf_counter()
rule = choose(model, masks, ev, budget, mode=mode)["rule"]; dt = time.perf_counter() - t0
after = ev(prune(model, masks, **rule))
drop = 100 * (before["acc"] - after["acc"])
res = {"run": run, "mode": mode, "threads": torch.get_num_threads(), "pruned": pruned_count(masks, **rule),
       "acc_before": before["acc"], "acc": after["acc"], "drop": drop, "asr": after["asr"], "choose_s": dt,
       "pass": drop <= 2 + 1e-9 and after["asr"] <= 0.05}
print(json.dumps(res), flush=True)
with open("walk_offline.jsonl", "a") as f:
    f.write(json.dumps(res) + "\n")
