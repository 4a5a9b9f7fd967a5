"""How much the ANP masks still move between the stop rule's checks (every 100 iterations), per matrix cell.

python benchmarks/results/stop_churn_20261207/churn.py /work/matrix OUT_DIR

Reads each ANP cell's ``snapshots.pt`` (flat masks every 100 iterations, written by the quality runner) and,
where present, ``stop.json`` or ``eval.json`` (the replay of ``purify --stop-patience 3``, which checks the
mask-order rule). For each check: the neurons at or below the published threshold 0.2 (the set
``--stop-threshold 0.2`` compares), their Jaccard overlap with the previous check's set, and the number the
mask-order rule chose. Writes churn.md and churn.png. No model is run: masks only.
"""
import glob
import json
import os
import sys

import torch

from anp_fast.selection import overlap_of


def main(work, out):
    os.makedirs(out, exist_ok=True)
    rows, curves = [], {}
    for path in sorted(glob.glob(os.path.join(work, "*", "*", "*", "anp", "snapshots.pt"))):
        cell = os.path.relpath(os.path.dirname(os.path.dirname(path)), work)
        snaps = torch.load(path, weights_only=True)
        its = list(snaps["iterations"])
        if len(its) < 2:
            continue
        sets = [frozenset((m <= 0.2).nonzero().flatten().tolist()) for m in snaps["masks"]]
        jac = [overlap_of(a, b) for a, b in zip(sets, sets[1:])]
        curves[cell] = (its[1:], jac)
        stop_path = os.path.join(os.path.dirname(path), "stop.json")
        eval_path = os.path.join(os.path.dirname(path), "eval.json")
        stop = json.load(open(stop_path)) if os.path.exists(stop_path) else (
            json.load(open(eval_path)).get("stop") if os.path.exists(eval_path) else None)
        most = [c["pruned"] for c in stop["checks"]] if stop else []
        last5 = jac[-5:]
        rows.append((cell, its[-1], len(sets[-1]), min(last5), max(last5), max(jac),
                     " ".join(str(n) for n in most[-5:]) if most else "-"))
    lines = ["| cell (ANP) | iterations | masks <= 0.2 at the end | Jaccard with the previous check, last 5 checks: "
             "min-max | highest Jaccard of the run | `--stop-patience 3`: the mask-order rule's count at the last 5 "
             "checks of its replay (up to its stop) |",
             "|---|---|---|---|---|---|"]
    for cell, n, size, lo, hi, top, most in rows:
        lines.append(f"| {cell} | {n} | {size} | {lo:.2f}-{hi:.2f} | {top:.2f} | {most} |")
    open(os.path.join(out, "churn.md"), "w").write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for cell, (x, y) in curves.items():
        ax.plot(x, y, lw=1, alpha=0.8, label=cell)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xlabel("ANP iteration")
    ax.set_ylabel("Jaccard(masks <= 0.2, previous check)")
    ax.set_title("ANP masks still move at 2000 iterations (matrix cells, checks every 100)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "churn.png"), dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
