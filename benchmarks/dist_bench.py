"""``anp-fast bench --nproc N``: one ANP step over N processes (torch.distributed) against one process.

Three layouts of the same machine, each a fresh launch, in rotated order per round (medians over rounds of the
per-round median step):

- ``1xT``: one process with all T threads (T: this process's cores, or --threads);
- ``NxT/N``: N processes with T/N threads each, started through torch's launcher (what ``purify --nproc N``
  does), the global batch split between them and every perturbed BatchNorm on the global batch's statistics;
- ``NxT/N local``: the same with ``local_statistics`` (each process's slice normalised with its own statistics).

Every layout runs the same seeded model, batch and noise seed for --warmup + --iters steps. Reported per layout:
the step time, the time spent inside the collectives (``torch.distributed.all_reduce`` / ``all_gather``, timed
in the processes: it includes waiting for the slowest process) and its share of the step, the collectives'
count and bytes per step, and the largest mask difference from the one-process layout after all the steps
(correctness: the loop takes the sign of summed gradients, so a difference grows once a sign flips).

    anp-fast bench --nproc 2 --model cifar_resnet18 --batch 128 --mode cl+fused --rounds 3 --iters 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch


# ------------------------------------------------------------------------------------------ in each process
class _Timed:
    """Wraps torch.distributed's all_reduce and all_gather (the only collectives of a step) with a clock."""

    def __init__(self):
        import torch.distributed as dist

        self.seconds, self.calls, self.bytes = 0.0, 0, 0
        for name in ("all_reduce", "all_gather"):
            setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
                self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return timed

    def reset(self):
        self.seconds, self.calls, self.bytes = 0.0, 0, 0


def worker(args) -> None:
    """Time --warmup + --iters steps in this process (one of several when launched); rank 0 writes the result."""
    from anp_fast import ANPConfig, ANPEngine
    from anp_fast.distributed import exit_now, init_from_env, rank

    from .bench import parse_mode, workload

    started = init_from_env()
    device = torch.device(args.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    timer = _Timed() if started else None
    model, x, y = workload(args.model, args.batch, device)
    config = ANPConfig(seed=0, device=str(device), local_statistics=args.local, **parse_mode(args.mode))
    engine = ANPEngine(model, config)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    steps, collective, calls, nbytes = [], [], 0, 0
    for i in range(args.warmup + args.iters):
        if timer is not None:
            timer.reset()
        sync()
        t0 = time.perf_counter()
        engine.step(x, y)
        sync()
        if i >= args.warmup:
            steps.append(time.perf_counter() - t0)
            if timer is not None:
                collective.append(timer.seconds)
                calls, nbytes = timer.calls, timer.bytes
    if rank() == 0:
        masks = engine.state.mask.detach().cpu()
        torch.save(masks, args.result + ".pt")
        with open(args.result, "w") as f:
            json.dump({"step_s": steps, "collective_s": collective, "calls": calls, "bytes": nbytes,
                       "threads": torch.get_num_threads()}, f)
    if started:
        torch.distributed.destroy_process_group()
        exit_now(0)


# ------------------------------------------------------------------------------------------ the launcher
def _launch(args, nproc: int, threads: int, local: bool, result: str) -> None:
    argv = ["-m", "anp_fast_bench.dist_bench", "--worker", "--model", args.model, "--batch", str(args.batch),
            "--mode", args.mode, "--iters", str(args.iters), "--warmup", str(args.warmup), "--device", args.device,
            "--result", result] + (["--local"] if local else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if nproc == 1:
        proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the one-process run failed:\n{proc.stderr[-2000:]}")
        return
    from anp_fast.distributed import standalone_launch

    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        standalone_launch(nproc, argv, monitor_interval=0.1)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old


def run(args, log=print) -> Dict:
    from anp_fast.distributed import cores as machine_cores

    cores = args.threads or machine_cores()
    n = args.nproc
    if cores < n and args.device == "cpu":
        log(f"note: {n} processes on {cores} core(s): each gets 1 thread, the cores are oversubscribed")
    per = max(1, cores // n)
    layouts = [(f"1x{cores}", 1, cores, False), (f"{n}x{per}", n, per, False),
               (f"{n}x{per} local", n, per, True)]
    seen: Dict[str, List[Dict]] = {name: [] for name, *_ in layouts}
    masks: Dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = layouts[r % len(layouts):] + layouts[:r % len(layouts)]
            for name, nproc, threads, local in order:
                path = os.path.join(tmp, f"{r}-{nproc}-{int(local)}.json")
                t0 = time.perf_counter()
                _launch(args, nproc, threads, local, path)
                with open(path) as f:
                    seen[name].append(json.load(f))
                masks[name] = torch.load(path + ".pt", weights_only=True)
                log(f"round {r + 1}/{args.rounds} {name}: step {1e3 * statistics.median(seen[name][-1]['step_s']):.0f} "
                    f"ms ({time.perf_counter() - t0:.0f} s with the launch)")
    ref = masks[layouts[0][0]]
    rows = []
    base = None
    for name, nproc, threads, local in layouts:
        step = statistics.median(statistics.median(s["step_s"]) for s in seen[name])
        coll = statistics.median(statistics.median(s["collective_s"]) for s in seen[name]) if nproc > 1 else 0.0
        base = step if base is None else base
        last = seen[name][-1]
        rows.append({"layout": name, "processes": nproc, "threads": threads, "local_statistics": local,
                     "step_ms": 1e3 * step, "vs_one_process": step / base, "collective_ms": 1e3 * coll,
                     "collective_share": coll / step, "collectives_per_step": last["calls"],
                     "collective_kib_per_step": last["bytes"] / 1024,
                     "max_mask_diff": float((masks[name] - ref).abs().max()),
                     "step_ms_rounds": [1e3 * statistics.median(s["step_s"]) for s in seen[name]]})
    return {"model": args.model, "batch": args.batch, "mode": args.mode, "device": args.device,
            "rounds": args.rounds, "iters": args.iters, "warmup": args.warmup, "nproc": n, "cores": cores,
            "rows": rows}


def format_table(result: Dict) -> str:
    lines = [f"{result['model']}, batch {result['batch']}, mode {result['mode']}, {result['device']}, "
             f"{result['cores']} cores; medians of {result['rounds']} rounds x {result['iters']} steps "
             f"(after {result['warmup']} warm-up steps)", "",
             "| layout | step ms | vs 1 process | in collectives ms (share) | collectives/step | KiB/step | "
             "max mask diff vs 1 process |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['layout']} | {r['step_ms']:.1f} | {r['vs_one_process']:.2f}x | "
                     f"{r['collective_ms']:.1f} ({100 * r['collective_share']:.0f}%) | {r['collectives_per_step']} | "
                     f"{r['collective_kib_per_step']:.1f} | {r['max_mask_diff']:.2e} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, required=True, help="processes of the distributed layouts")
    p.add_argument("--model", default="cifar_resnet18")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--mode", default="cl+fused", help="one engine mode (as bench --modes; not 'published')")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=5, help="timed steps per layout per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="threads in all (default: this process's cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown results")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="anp-fast bench --nproc N", description=__doc__.split("\n")[0])
    if argv is not None and "--worker" in argv or argv is None and "--worker" in sys.argv:
        p.add_argument("--worker", action="store_true")
        p.add_argument("--local", action="store_true")
        p.add_argument("--result", required=True)
        for name, kind in (("--model", str), ("--batch", int), ("--mode", str), ("--iters", int),
                           ("--warmup", int), ("--device", str)):
            p.add_argument(name, type=kind, required=True)
        worker(p.parse_args(argv))
        return 0
    add_arguments(p)
    args = p.parse_args(argv)
    from .bench import build_model, parse_mode

    for name in ("nproc", "batch", "rounds", "iters", "warmup"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: must be >= 1")
    if args.nproc < 2:
        p.error("--nproc N: N >= 2 (the one-process layout is always measured)")
    if args.batch < args.nproc:
        p.error(f"--batch {args.batch} cannot be split over {args.nproc} processes")
    try:
        build_model(args.model)
        if parse_mode(args.mode) is None:
            p.error("--mode: an engine mode (the published loop runs in one process only)")
    except ValueError as exc:
        p.error(str(exc))
    if args.device.startswith("cuda") and torch.cuda.device_count() < args.nproc:
        p.error(f"--nproc {args.nproc} on CUDA needs {args.nproc} GPUs; {torch.cuda.device_count()} here")
    result = run(args, log=lambda s: print(s, file=sys.stderr, flush=True))
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(args.out, f"dist_{args.model}_b{args.batch}_n{args.nproc}_{args.device}_{stamp}")
    from .bench import environment

    result["env"] = environment(args.device)
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    table = format_table(result)
    with open(base + ".md", "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"\nwrote {base}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
