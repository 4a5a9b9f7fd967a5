"""What the kernels' first-use checks (anp_fast.ops.verify) cost in an ANP run.

    python -m anp_fast_bench.verify_cost [--iters 20] [--repeats 3] [--precision bf16]

Runs the digits demo's model (ResNet-18, width 16) for ``--iters`` ANP iterations in fresh processes with
ANP_FAST_VERIFY=1 and =0, interleaved, ``--repeats`` times each; prints the wall time of each run, the seconds
spent inside the checks (their own clock) and the signatures checked. A check runs once per signature per
process, so its cost is a constant to set against a 2000-iteration run's time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from anp_fast import ANPConfig, optimize_masks
from anp_fast.datasets import load_digits
from anp_fast.models import resnet18
from anp_fast.ops import verify
iters, precision = int(sys.argv[1]), sys.argv[2]
sp = load_digits(seed=0, holdout_fraction=0.1)
torch.manual_seed(0)
model = resnet18(num_classes=10, in_channels=1, width=16).eval()
t0 = time.perf_counter()
optimize_masks(model, (sp.clean.x, sp.clean.y), ANPConfig(iters=iters, seed=0, precision=precision), progress=False)
wall = time.perf_counter() - t0
rows = verify.report()
print(json.dumps({"wall_s": wall, "check_s": sum(r["seconds"] for r in rows), "checked": [r["signature"] for r in rows],
                  "ok": all(r["ok"] for r in rows)}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m anp_fast_bench.verify_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="bf16")
    args = p.parse_args(argv)
    runs = {"1": [], "0": []}
    for _ in range(args.repeats):
        for flag in ("1", "0"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.iters), args.precision], check=True,
                                 capture_output=True, text=True, env={**os.environ, "ANP_FAST_VERIFY": flag})
            runs[flag].append(json.loads(out.stdout.strip().splitlines()[-1]))
    on, off = runs["1"], runs["0"]
    result = {"iters": args.iters, "precision": args.precision, "threads": os.environ.get("OMP_NUM_THREADS"),
              "wall_on_s": [r["wall_s"] for r in on], "wall_off_s": [r["wall_s"] for r in off],
              "check_s": [r["check_s"] for r in on], "checked": on[0]["checked"], "all_ok": all(r["ok"] for r in on),
              "median_wall_on_s": statistics.median(r["wall_s"] for r in on),
              "median_wall_off_s": statistics.median(r["wall_s"] for r in off),
              "median_check_s": statistics.median(r["check_s"] for r in on)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
