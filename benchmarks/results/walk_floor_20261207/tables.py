"""Tables of this folder: floor0.jsonl (matrix cell-methods, the floor-0 walk against the cell's evaluation
with floor 0.2) and demo/replays.jsonl (ten demo draws, both rules)."""
import json, os, statistics

here = os.path.dirname(os.path.abspath(__file__))


def verdict(attack, drop, asr):
    if attack == "benign":
        return "met" if drop <= 1 + 1e-9 else "MISS"
    return "met" if drop <= 2 + 1e-9 and asr <= 5 else "MISS"


print("| cell | method | floor 0.2 (old default): drop / ASR (pruned) | floor 0 (new default) |")
print("|---|---|---|---|")
for line in open(os.path.join(here, "floor0.jsonl")):
    r = json.loads(line)
    b, a, d = r["before"], r["after"], r["default_after"]
    attack = r["cell"].split("/")[1].split("@")[0]
    cols = []
    for after, n in ((d, r["default_pruned"]), (a, r["pruned"])):
        drop, asr = 100 * (b["acc"] - after["acc"]), 100 * after["asr"]
        cols.append(f"{drop:.1f} / {asr:.1f} ({n}) {verdict(attack, drop, asr)}")
    print(f"| {r['cell']} | {r['method']} | {cols[0]} | {cols[1]} |")
print()
rows = [json.loads(l) for l in open(os.path.join(here, "demo", "replays.jsonl"))]
print("| demo draw | floor 0.2: drop / ASR (pruned) | floor 0 |")
print("|---|---|---|")
by = {}
for r in rows:
    by.setdefault(r["draw"], {})[r["rule"]] = r
stats = {}
for draw, rs in by.items():
    cols = []
    for rule in ("floor 0.2 (old default)", "floor0"):
        r = rs[rule]
        drop, asr = 100 * (r["before"]["acc"] - r["after"]["acc"]), 100 * r["after"]["asr"]
        stats.setdefault(rule, []).append((drop, asr))
        cols.append(f"{drop:.2f} / {asr:.1f} ({r['pruned']})")
    print(f"| {draw} | {cols[0]} | {cols[1]} |")
for rule, v in stats.items():
    passed = sum(d <= 2 + 1e-9 and a <= 5 for d, a in v)
    print(f"{rule}: {passed}/{len(v)} pass, median drop {statistics.median(d for d, _ in v):.2f}, worst drop "
          f"{max(d for d, _ in v):.2f}, worst ASR {max(a for _, a in v):.1f}")
