"""Mask order from the final masks vs the mean of the last K snapshots, on matrix ANP cells (in /work/matrix).

    python probe.py order K CELL...   the mask-order curve (analysis only: uses triggered data): per cell, the
                                      best ASR within 2 test points and the first cut with ASR <= 5%
    python probe.py walk K CELL...    the default walk on the mean, against the final masks' result (eval.json)

CELL: data/attack@rate/sSEED, e.g. digits-cifar/wanet@0.1/s1."""
import json, os, sys, time
import torch
torch.set_num_threads(1)
from anp_fast_bench import quality
from anp_fast import load_masks, selection
from anp_fast.pruning import prune, sweep

s = quality.Settings(work="/work/matrix")


def load(key, K):
    """The cell's model and evaluator, its final ANP masks, the mean of its last K snapshots, its folder."""
    data, rest = key.split("/", 1); attack, rest = rest.split("@"); rate, seed = rest.split("/s")
    cell = quality.Cell(data, attack, float(rate), int(seed))
    model, _, ev = quality._setup(cell, s)
    folder = os.path.join(s.work, cell.key, "anp")
    masks = load_masks(os.path.join(folder, "masks.txt"))
    snaps = torch.load(os.path.join(folder, "snapshots.pt"), weights_only=True)
    sizes = [int(masks[n].numel()) for n in snaps["layers"]]
    avg = dict(zip(snaps["layers"], torch.split(snaps["masks"][-K:].float().mean(0), sizes)))
    return model, ev, masks, avg, folder


def order(key, K):
    model, ev, masks, avg, _ = load(key, K)
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
    return out


def walk(key, K):
    model, ev, _, avg, folder = load(key, K)
    old = json.load(open(os.path.join(folder, "eval.json")))
    picked = selection.choose(model, avg, ev, budget_points=2.0, mode="walk")
    after = ev(prune(model, avg, **picked["rule"]))
    b = old["before"]
    return {"cell": key, "K": K, "before": [round(100*b["acc"],1), round(100*b["asr"],1)],
            "final": [round(100*(b["acc"]-old["after"]["acc"]),1), round(100*old["after"]["asr"],1), old["pruned"]],
            "mean": [round(100*(b["acc"]-after["acc"]),1), round(100*after["asr"],1), picked["evidence"]["kept"]]}


if __name__ == "__main__":
    mode, K = {"order": order, "walk": walk}[sys.argv[1]], int(sys.argv[2])
    for key in sys.argv[3:]:
        t = time.time()
        print(json.dumps(mode(key, K)), f"{time.time() - t:.0f}s", flush=True)
