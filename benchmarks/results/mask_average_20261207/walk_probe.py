"""The default walk on the mean of the last K snapshots vs the final masks' result (eval.json), ANP cells."""
import json, os, sys, time
import torch
torch.set_num_threads(1)
from anp_fast_bench import quality
from anp_fast import load_masks, selection
from anp_fast.pruning import prune
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
    avg = dict(zip(snaps["layers"], torch.split(snaps["masks"][-K:].float().mean(0), sizes)))
    old = json.load(open(os.path.join(folder, "eval.json")))
    picked = selection.choose(model, avg, ev, budget_points=2.0, mode="walk")
    after = ev(prune(model, avg, **picked["rule"]))
    b = old["before"]
    print(json.dumps({"cell": key, "K": K, "before": [round(100*b["acc"],1), round(100*b["asr"],1)],
                      "final": [round(100*(b["acc"]-old["after"]["acc"]),1), round(100*old["after"]["asr"],1), old["pruned"]],
                      "mean": [round(100*(b["acc"]-after["acc"]),1), round(100*after["asr"],1), picked["evidence"]["kept"]]}),
          f"{time.time()-t:.0f}s", flush=True)
