import json, sys, glob, os, statistics
prefix = sys.argv[1]  # "" for the default replay, "floor0_" for the variant
drops, asrs, ok = [], [], 0
for s in range(5):
    for t in (1, 2):
        base = json.load(open(f"/work/notes/demo_half/s{s}_t{t}/summary.json"))["before"]
        f = f"/work/notes/replay/{prefix}s{s}_t{t}/prune_report.json"
        if not os.path.exists(f):
            continue
        r = json.load(open(f)); a = r["after"]
        drop = 100 * (base["acc"] - a["acc"]); asr = 100 * a["asr"]
        good = drop <= 2 + 1e-9 and asr <= 5
        ok += good; drops.append(drop); asrs.append(asr)
        print(f"s{s}_t{t} pruned {r['pruned_neurons']} drop {drop:.2f} ASR {asr:.1f} {'pass' if good else 'FAIL'}")
if drops:
    print(f"{ok}/{len(drops)} pass; median drop {statistics.median(drops):.2f}, worst drop {max(drops):.2f}, worst ASR {max(asrs):.1f}")
