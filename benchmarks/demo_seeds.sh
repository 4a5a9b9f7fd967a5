#!/usr/bin/env bash
# Demo robustness (issue 10): `anp-fast demo` (bf16) for training seeds 0-4 x {1, 2} threads; each run's
# summary.json holds ACC/ASR before/after with the default oracle-free rule (--prune auto: the clean walk).
# Usage: benchmarks/demo_seeds.sh OUT_DIR   (about 10 x 5 minutes on 2 cores; one run at a time)
set -euo pipefail
out=${1:?usage: demo_seeds.sh OUT_DIR}
mkdir -p "$out"
for t in 1 2; do
  for s in 0 1 2 3 4; do
    OMP_NUM_THREADS=$t MKL_NUM_THREADS=$t anp-fast demo --seed "$s" --precision bf16 --no-progress --overwrite \
      --out "$out/s${s}_t${t}" > "$out/s${s}_t${t}.log" 2>&1
  done
done
python - "$out" <<'PY'
import json, sys, glob, os
rows = []
for f in sorted(glob.glob(os.path.join(sys.argv[1], "s*_t*/summary.json"))):
    s = json.load(open(f)); b, a = s["before"], s["after"]
    drop = 100 * (b["acc"] - a["acc"])
    rows.append((s["config"]["seed"], s["threads"], s["pruned_neurons"], 100 * b["acc"], 100 * a["acc"], drop,
                 100 * b["asr"], 100 * a["asr"], drop <= 2 and a["asr"] <= 0.05))
print("seed threads pruned acc_before acc_after drop asr_before asr_after pass")
for r in rows:
    print("%d %d %d %.1f %.1f %.2f %.1f %.1f %s" % r)
print("worst drop %.2f, worst ASR %.1f, passed %d/%d" % (max(r[5] for r in rows), max(r[7] for r in rows),
                                                         sum(r[8] for r in rows), len(rows)))
PY
