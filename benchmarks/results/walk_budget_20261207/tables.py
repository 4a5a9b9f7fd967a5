"""The two tables of this folder's README, from walk_budget.jsonl and demos/*.json."""
import glob
import json
import os
import statistics

here = os.path.dirname(os.path.abspath(__file__))
rows = {}
for line in open(os.path.join(here, "walk_budget.jsonl")):
    r = json.loads(line)
    rows.setdefault((r["cell"], r["method"]), {})[r["variant"]] = r


def fmt(r, key="after", n="pruned"):
    return f"{100 * (r['before']['acc'] - r[key]['acc']):.1f} / {100 * r[key]['asr']:.1f} ({r[n]})"


print("| cell | method | default: drop / ASR (pruned) | budget 1 | budget 2, decisions on half |")
print("|---|---|---|---|---|")
for (cell, method), v in sorted(rows.items()):
    first = next(iter(v.values()))
    print(f"| {cell} | {method} | {fmt(first, 'default_after', 'default_pruned')} | "
          + " | ".join(fmt(v[k]) if k in v else "-" for k in ("budget1", "half")) + " |")
print()
print("| run | ACC before | default (replayed): pruned / drop / ASR | decisions on half (the run): pruned / drop / ASR |")
print("|---|---|---|---|")
drops = {"default": [], "half": []}
for f in sorted(glob.glob(os.path.join(here, "demos", "s*_t*.json"))):
    d = json.load(open(f))
    h, b = d["decide_half"], d["decide_half"]["before"]
    r = d["default_replay"]
    drops["default"].append((100 * (b["acc"] - r["after"]["acc"]), 100 * r["after"]["asr"]))
    drops["half"].append((100 * (b["acc"] - h["after"]["acc"]), 100 * h["after"]["asr"]))
    print(f"| {d['run']} | {100 * b['acc']:.2f} | {r['pruned_neurons']} / {drops['default'][-1][0]:.2f} / "
          f"{drops['default'][-1][1]:.1f} | {h['pruned_neurons']} / {drops['half'][-1][0]:.2f} / {drops['half'][-1][1]:.1f} |")
for k, v in drops.items():
    print(f"{k}: passed {sum(d <= 2 + 1e-9 and a <= 5 for d, a in v)}/{len(v)}, median drop "
          f"{statistics.median(d for d, _ in v):.2f}, worst drop {max(d for d, _ in v):.2f}, worst ASR {max(a for _, a in v):.1f}")
