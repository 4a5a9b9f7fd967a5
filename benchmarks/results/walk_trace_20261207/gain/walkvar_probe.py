"""Replay selection.walk with changed keyword arguments on every matrix cell/method whose model is on disk.
usage: walkvar_probe.py NAME 'k=v,k=v' [cell-substring]   (values are Python literals). Resumable."""
import ast, glob, json, os, sys, time
import torch
torch.set_num_threads(1)
from anp_fast_bench import quality
from anp_fast import load_masks, selection
from anp_fast.pruning import prune, pruned_count

name = sys.argv[1]
kw = {k: ast.literal_eval(v) for k, v in (p.split("=") for p in sys.argv[2].split(",") if p)}
import re
only = re.compile(sys.argv[3] if len(sys.argv) > 3 else "")
s = quality.Settings(work="/work/matrix")
for ev_path in sorted(glob.glob("/work/matrix/*/*/s*/*/eval.json")):
    parts = ev_path.split("/")
    data, ar, sd, method = parts[3], parts[4], parts[5], parts[6]
    if not only.search(ev_path):
        continue
    if not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(ev_path)), "backdoored.safetensors")):
        continue
    out = f"OUT/{name}_{data}_{ar}_{sd}_{method}.json"
    if os.path.exists(out):
        continue
    attack, rate = ar.split("@")
    cell = quality.Cell(data, attack, float(rate), int(sd[1:]))
    model, _, ev = quality._setup(cell, s)
    masks = load_masks(os.path.join(s.work, cell.key, method, "masks.txt"))
    base = json.load(open(ev_path))
    t = time.time()
    rule, info = selection.walk(model, masks, ev, budget_points=s.budget, **kw)
    after = ev(prune(model, masks, **rule))
    r = {"cell": cell.key, "method": method, "variant": name, "kwargs": kw, "before": base["before"],
         "after": after, "pruned": pruned_count(masks, **rule), "evidence": info,
         "default_after": base["after"], "default_pruned": base["pruned"], "seconds": time.time() - t}
    json.dump(r, open(out, "w"))
    b = base["before"]
    print(f"{cell.key} {method} {name}: drop {100*(b['acc']-after['acc']):.1f} ASR {100*after['asr']:.1f} "
          f"({r['pruned']}) | default: drop {100*(b['acc']-base['after']['acc']):.1f} "
          f"ASR {100*base['after']['asr']:.1f} ({base['pruned']}) [{r['seconds']:.0f}s]", flush=True)
