"""The clean walk with suffix forwards (``walk(..., incremental=True)``, the default) against whole forwards,
on quality-matrix cells: seconds per walk, interleaved in one process, medians and their ratio, and whether
both chose the same neurons (they must).

    python -m anp_fast_bench.walk_speed --work /work/matrix --cells mnist5k/badnets@0.1/s0/anp --repeats 3 \
        --out benchmarks/results/walk_speed_YYYYMMDD/walk_speed.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import List, Optional


def time_cell(work: str, key: str, repeats: int, threads: int) -> dict:
    import torch

    from anp_fast import load_masks, selection
    from . import quality

    torch.set_num_threads(threads)
    data, attack_rate, seed, method = key.split("/")
    attack, rate = attack_rate.split("@")
    s = quality.Settings(work=work, threads=threads)
    cell = quality.Cell(data, attack, float(rate), int(seed[1:]))
    model, _, evaluator = quality._setup(cell, s)
    masks = load_masks(os.path.join(work, cell.key, method, "masks.txt"))
    times = {True: [], False: []}
    rules = {}
    for r in range(repeats):
        for incremental in ((True, False) if r % 2 == 0 else (False, True)):  # interleaved, alternating first
            t0 = time.perf_counter()
            rules[incremental] = selection.walk(model, masks, evaluator, budget_points=s.budget,
                                                incremental=incremental)
            times[incremental].append(time.perf_counter() - t0)
    fast, slow = statistics.median(times[True]), statistics.median(times[False])
    return {"cell": key, "threads": threads, "repeats": repeats, "incremental_s": times[True],
            "whole_s": times[False], "median_incremental_s": fast, "median_whole_s": slow,
            "speedup": slow / fast, "same_rule": rules[True] == rules[False], "report": rules[True][1]}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="the quality runner's work folder (cells with their models)")
    p.add_argument("--cells", required=True, help="comma-separated DATA/ATTACK@RATE/sSEED/METHOD")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="append one JSON line per cell here")
    a = p.parse_args(argv)
    for key in [c for c in a.cells.split(",") if c]:
        row = time_cell(a.work, key, a.repeats, a.threads)
        print(f"{key}: incremental {row['median_incremental_s']:.1f}s, whole {row['median_whole_s']:.1f}s, "
              f"x{row['speedup']:.2f}, same rule: {row['same_rule']}", flush=True)
        if a.out:
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
