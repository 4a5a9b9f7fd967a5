"""A whole ANP run timed end to end: ``optimize_masks`` for ``--iters`` iterations (published defaults) on a
clean set of seeded random images, the way a user calls it, compile and warm-up included.

    python -m anp_fast_bench.timed_run --model tv_resnet50 --batch 128 --iters 2000 --device cuda \\
        --precision bf16 --compile --cuda-graphs --out benchmarks/results

Writes ``<model>_b<batch>_<device>_run<iters>_<time>.json`` (total and per-iteration seconds, the config,
device name, torch version, commit) and prints a one-line summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

import torch

from .bench import environment, workload


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anp_fast_bench.timed_run", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cifar_resnet18")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--clean", type=int, default=500, help="images in the clean set (default: 1%% of CIFAR-10)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "mixed"))
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--out", default=None, help="folder for the JSON result")
    args = p.parse_args(argv)

    from anp_fast import ANPConfig, optimize_masks

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("timed_run: --device cuda but no CUDA GPU is available here")
    model, x, y = workload(args.model, args.clean, torch.device(args.device))  # the clean set: seeded random images
    shape = tuple(x.shape[1:])
    config = ANPConfig(iters=args.iters, batch_size=args.batch, device=args.device, precision=args.precision,
                       compile=args.compile, cuda_graphs=args.cuda_graphs)
    t0 = time.perf_counter()
    result = optimize_masks(model, (x, y), config, progress=sys.stderr.isatty())
    total = time.perf_counter() - t0
    record = {"model": args.model, "batch": args.batch, "input": list(shape), "iters": args.iters,
              "total_s": total, "per_iter_s": total / args.iters, "loop_s": result.timings["total_s"],
              "config": config.to_dict(), "env": environment(args.device),
              "final_loss": result.loss_history[-1] if result.loss_history else None}
    print(f"{args.model} batch {args.batch}, {args.iters} iterations on {record['env']['device_name']}: "
          f"{total:.1f} s in all ({total / args.iters * 1000:.1f} ms/iteration, compile and warm-up included)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        device_type = args.device.split(":")[0]
        path = os.path.join(args.out, f"{args.model}_b{args.batch}_{device_type}_run{args.iters}_{stamp}.json")
        with open(path, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
