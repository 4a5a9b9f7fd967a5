"""Analysis only (uses triggered data): the ASR along the walk's accepted order, on one cell-method.
usage: trace.py DATA ATTACK@RATE SEED METHOD"""
import json, os, sys, time
import torch, torch.nn.functional as F
torch.set_num_threads(1)
from anp_fast_bench import quality
from anp_fast import load_masks, selection
from anp_fast.pruning import prune, _flat
from anp_fast.selection import _clean_tensors
data, ar, seed, method = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
attack, rate = ar.split("@")
s = quality.Settings(work="/work/matrix")
cell = quality.Cell(data, attack, float(rate), seed)
model, _, ev = quality._setup(cell, s)
model.eval()  # _setup returns it in train mode: a forward would move its BatchNorm statistics
masks = load_masks(os.path.join(s.work, cell.key, method, "masks.txt"))
captured = {}
orig = selection._back_off
def spy(accepted, owner, scales, held_acc, budget):
    captured["order"] = [j for j, _ in accepted]
    captured["owner"] = owner
    return orig(accepted, owner, scales, held_acc, budget)
selection._back_off = spy
t = time.time()
rule, info = selection.walk(model, masks, ev, budget_points=s.budget)
print("walk", info, f"{time.time()-t:.0f}s", flush=True)
flat, spans = _flat(masks)
order, owner = captured["order"], captured["owner"]
(x, y), held = _clean_tensors(ev, split=True)
rows = []
for k in list(range(0, len(order), 10)) + [len(order)]:
    neurons = {}
    for j in order[:k]:
        name, i = owner[j]
        neurons.setdefault(name, []).append(i)
    m = prune(model, masks, neurons=neurons) if k else model
    r = ev(m)
    loss = r["clean_loss"]  # the deciding set's, in eval mode
    mk = [round(float(flat[j]), 3) for j in order[max(0, k - 10):k]]
    rows.append({"k": k, "acc": r["acc"], "asr": r["asr"], "decide_loss": loss, "masks": mk,
                 "layers": sorted({owner[j][0] for j in order[max(0, k - 10):k]})})
    print(f"k={k:4d} acc {100*r['acc']:5.1f} asr {100*r['asr']:5.1f} loss {loss:.3f} masks {mk[:5]} {rows[-1]['layers'][:4]}", flush=True)
json.dump({"info": info, "rows": rows}, open(f"OUT/trace_{data}_{ar}_s{seed}_{method}.json", "w"))
