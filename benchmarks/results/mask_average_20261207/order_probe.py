"""Mask order from the final masks vs the mean of the last K snapshots: the mask-order curve (analysis only: uses
triggered data) on matrix cells. Prints per cell: best ASR within 2 test points, first cut with ASR <= 5%."""
import json, os, sys, time
import torch
torch.set_num_threads(1)
from anp_fast_bench import quality
from anp_fast import load_masks
from anp_fast.pruning import sweep
s = quality.Settings(work="/work/matrix")
K = int(sys.argv[1])
for key in sys.argv[2:]:
    data, rest = key.split("/", 1); attack, rest = rest.split("@"); rate, seed = rest.split("/s")
    cell = quality.Cell(data, attack, float(rate), int(seed))
    t = time.time()
    model, _, ev = quality._setup(cell, s)
    folder = os.path.join(s.work, cell.key, "anp")
    masks = load_masks(os.path.join(folder, "masks.txt"))
    snaps = torch.load(os.path.join(folder, "snapshots.pt"), weights_only=True)
    sizes = [int(masks[n].numel()) for n in snaps["layers"]]
    mean = snaps["masks"][-K:].float().mean(0)
    avg = dict(zip(snaps["layers"], torch.split(mean, sizes)))
    out = {"cell": key, "K": K}
    for name, m in (("final", masks), (f"mean{K}", avg)):
        rows, base = [], None
        for n in range(0, 400, 8):
            (r,) = sweep(model, m, ev, numbers=[n])
            rows.append(r)
            base = r["acc"] if base is None else base
            if base - r["acc"] > 0.10:
                break
        ok = [r for r in rows if base - r["acc"] <= 0.02 + 1e-9]
        best = min(ok, key=lambda r: (r["asr"], r["number"]))
        first = next((r for r in rows if r["asr"] <= 0.05), None)
        out[name] = {"best2": (best["number"], round(100 * (base - best["acc"]), 1), round(100 * best["asr"], 1)),
                     "first5": None if first is None else (first["number"], round(100 * (base - first["acc"]), 1))}
    print(json.dumps(out), f"{time.time() - t:.0f}s", flush=True)
