"""Premise check for the next session: do the walk's prunings shift clean predictions toward one class?
Usage: WORK=DIR python probe.py CELL... (CELL as data/attack@rate/sSEED; ANP's masks and eval.json there).
Per cell: predicted-class shares on the method's clean set (the walk's deciding data; no triggered data) for the model before, after the suspects
alone (the 'evidence' rule) and after the full rule; the largest share change and its class."""
import json
import os
import sys
import torch
from anp_fast_bench import quality
from anp_fast import load_masks
from anp_fast.pruning import prune
torch.set_num_threads(1)
work = os.environ.get("WORK", "/work/matrix")  # the quality runner's --work folder
cells = sys.argv[1:]
s = quality.Settings(work=work)
for key in cells:
    data, ar, seed = key.split("/")
    attack, rate = ar.split("@")
    cell = quality.Cell(data, attack, float(rate), int(seed[1:]))
    model, clean, ev = quality._setup(cell, s)
    x, y = clean
    for method in ("anp",):
        folder = os.path.join(work, cell.key, method)
        r = json.load(open(os.path.join(folder, "eval.json")))
        masks = load_masks(os.path.join(folder, "masks.txt"))
        def shares(m):
            with torch.no_grad():
                p = torch.cat([m(x[i:i+256]).argmax(1) for i in range(0, len(x), 256)])
            return torch.bincount(p, minlength=10).float() / len(p), float((p == y).float().mean())
        base, a0 = shares(model.eval())
        out = [f"{key} {method}: acc before {a0:.3f}"]
        from anp_fast import selection
        for name, rule in (("evidence", selection.choose(model, masks, ev, 2.0, mode="evidence")["rule"]), ("walk", r["chosen"]["rule"])):
            sh, a = shares(prune(model, masks, **rule).eval())
            d = sh - base
            k = int(d.abs().argmax())
            out.append(f"{name}: acc {a:.3f} max share change {float(d[k]):+.3f} (class {k}); class0 {float(d[0]):+.3f}")
        print("; ".join(out), flush=True)
