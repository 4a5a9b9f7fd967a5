"""Time one ANP iteration: the eager published loop against the engine's modes, interleaved in one process.

Every mode runs the same batches. After a warm-up (which also compiles), each round times every mode once
(``iters`` iterations each) in a rotated order; the figure per mode is the median over rounds of the time per
iteration. F, one plain no-grad forward of the frozen model at the batch size, is timed in the same rounds
for each (layout, precision) the modes use, so each mode's step is also given as a multiple of 6 F
(ANP.md: 3 forward + 3 input-gradient backward passes per iteration is the floor). Peak memory per mode is
measured in a fresh subprocess per mode (CPU: peak RSS growth during the steps; CUDA: max allocated).
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .published_loop import PublishedANP

TOKENS = {
    "nchw": ("channels_last", False), "cl": ("channels_last", True),
    "sep": ("merge_passes", False), "merged": ("merge_passes", True),
    "eager": ("compile", False), "compile": ("compile", True),
    "fp32": ("precision", "fp32"), "bf16": ("precision", "bf16"), "mixed": ("precision", "mixed"),
    "unfused": ("fused_kernels", False), "fused": ("fused_kernels", True),
    "graphs": ("cuda_graphs", True),
}
BASE = dict(channels_last=False, merge_passes=False, compile=False, precision="fp32", fused_kernels=False,
            cuda_graphs=False)
DEFAULT_MODES = ["published", "nchw", "cl", "nchw+merged", "cl+compile", "cl+bf16", "cl+mixed", "cl+bf16+compile"]


def parse_mode(mode: str):
    """None for "published" (the eager published loop), else the engine config of a mode written as
    '+'-joined tokens over NCHW / separate passes / eager / fp32 / eager ops: nchw|cl, sep|merged,
    eager|compile, fp32|bf16|mixed, unfused|fused (the fused kernels; e.g. "cl+bf16+fused"), and graphs
    (CUDA graph replay of the iteration)."""
    if mode == "published":
        return None
    config = dict(BASE)
    for token in mode.split("+"):
        if token not in TOKENS:
            raise ValueError(f"unknown token {token!r} in mode {mode!r}; tokens: {', '.join(TOKENS)}")
        key, value = TOKENS[token]
        config[key] = value
    return config


def describe(mode: str) -> str:
    c = parse_mode(mode)
    if c is None:
        return "eager published loop: weights require grad, per-module flags, separate passes"
    return (f"engine: {'channels_last' if c['channels_last'] else 'NCHW'}, "
            f"{'merged' if c['merge_passes'] else 'separate'} passes, "
            f"{'compiled' if c['compile'] else 'eager'}, {c['precision']}"
            f"{', fused kernels' if c['fused_kernels'] else ''}{', CUDA graphs' if c['cuda_graphs'] else ''}")


def build_model(name: str, num_classes: int = 10):
    """(model, input shape without batch) for the benchmark models."""
    from anp_fast.models import preact_resnet18, resnet18

    if name == "cifar_resnet18":
        return resnet18(num_classes), (3, 32, 32)
    if name == "cifar_preact_resnet18":
        return preact_resnet18(num_classes), (3, 32, 32)
    if name == "digits_resnet18":
        return resnet18(num_classes, in_channels=1, width=16), (1, 16, 16)
    if name.startswith("tv_"):
        import torchvision

        return torchvision.models.get_model(name[3:], num_classes=num_classes), (3, 224, 224)
    raise ValueError(f"unknown benchmark model {name!r}: cifar_resnet18, cifar_preact_resnet18, "
                     "digits_resnet18, tv_<torchvision name>")


def workload(model_name: str, batch: int, device, seed: int = 0):
    """(model, x, y) on ``device``: the benchmark model with seeded weights and one seeded random batch."""
    torch.manual_seed(seed)
    model, shape = build_model(model_name)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *shape, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return model.to(device), x.to(device), y.to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(mode: str, model: nn.Module, device, seed: int = 0) -> Callable:
    from anp_fast import ANPConfig, ANPEngine

    overrides = parse_mode(mode)
    if overrides is None:
        ref = PublishedANP(copy.deepcopy(model).to(device))
        return ref.step
    engine = ANPEngine(model, ANPConfig(seed=seed, device=str(device), **overrides))
    return engine.step


def f_key(mode: str):
    overrides = parse_mode(mode) or {}
    return (bool(overrides.get("channels_last", False)), overrides.get("precision", "fp32") == "bf16")


def make_forward(model: nn.Module, device, channels_last: bool, bf16: bool) -> Callable:
    """One plain no-grad forward of the frozen model (batch statistics, as in the loop)."""
    net = copy.deepcopy(model).to(device).train().requires_grad_(False)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = None
    if channels_last:
        net = net.to(memory_format=torch.channels_last)

    def forward(x, y):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return net(x)
    return forward


def run(model_name="cifar_resnet18", batch=128, modes=None, rounds=5, iters=1, warmup=2, device="cpu",
        seed=0, log=print) -> Dict:
    modes = list(modes or DEFAULT_MODES)
    device = torch.device(device)
    model, x, y = workload(model_name, batch, device, seed)
    runners = {m: make_step(m, model, device, seed) for m in modes}
    for key in sorted({f_key(m) for m in modes}):
        runners["F" + ("_cl" if key[0] else "_nchw") + ("_bf16" if key[1] else "_fp32")] = make_forward(
            model, device, *key)
    names = list(runners)
    for name in names:
        t0 = time.perf_counter()
        for _ in range(warmup):
            runners[name](x, y)
        _sync(device)
        log(f"warm-up {name}: {(time.perf_counter() - t0) / warmup:.3f} s/iteration")
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                runners[name](x, y)
            _sync(device)
            times[name].append((time.perf_counter() - t0) / iters)
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f}" for n in names))
    med = {n: statistics.median(v) for n, v in times.items()}
    base = med.get("published")
    rows = []
    for m in modes:
        cl, bf16 = f_key(m)
        fname = "F" + ("_cl" if cl else "_nchw") + ("_bf16" if bf16 else "_fp32")
        rows.append({"mode": m, "description": describe(m), "s_per_iter": med[m],
                     "speedup_vs_published": (base / med[m]) if base else None,
                     "F_s": med[fname], "step_over_6F": med[m] / (6 * med[fname])})
    return {"model": model_name, "batch": batch, "input": list(x.shape[1:]), "rounds": rounds, "iters": iters,
            "rows": rows, "forward_s": {n: med[n] for n in names if n.startswith("F")},
            "raw_s": times}


def profile(model_name="cifar_resnet18", batch=128, mode="cl", rounds=5, warmup=2, device="cpu", seed=0,
            trace: Optional[str] = None, top_ops: int = 0, log=print) -> Dict:
    """Break one engine iteration into its phases (noise step, mask forward, mask backward, update), timed
    with synchronisation; medians over ``rounds``. ``top_ops``: also profile one iteration with torch.profiler
    and report the ops with the most self time and the convolutions' share. ``trace``: also write a
    torch.profiler (Chrome) trace of one iteration there."""
    from anp_fast import ANPConfig, ANPEngine

    config = parse_mode(mode)
    if config is None:
        raise ValueError("profile an engine mode, not 'published'")
    device = torch.device(device)
    model, x0, y0 = workload(model_name, batch, device, seed)
    engine = ANPEngine(model, ANPConfig(seed=seed, device=str(device), **config))
    phases = {"noise step": [], "mask forward": [], "mask backward": [], "update": []}

    def iteration(record: bool):
        x, y = engine.prepare(x0, y0)
        marks = [time.perf_counter()]

        def mark():
            _sync(device)
            marks.append(time.perf_counter())
        engine.noise_step(x, y)
        mark()
        loss = engine.mask_loss(x, y)
        mark()
        grad = engine.mask_grad(loss)
        mark()
        engine.update(grad)
        mark()
        if record:
            for name, a, b in zip(phases, marks, marks[1:]):
                phases[name].append(b - a)

    for _ in range(warmup):
        iteration(False)
    for _ in range(rounds):
        iteration(True)
    med = {k: statistics.median(v) for k, v in phases.items()}
    total = sum(med.values())
    result = {"model": model_name, "batch": batch, "mode": mode, "phases_s": med, "total_s": total}
    if trace or top_ops:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        on_gpu = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with torch_profile(activities=activities, record_shapes=bool(trace)) as prof:
            iteration(False)
        if trace:
            prof.export_chrome_trace(trace)
            log(f"wrote the trace of one iteration to {trace}")
        if top_ops:
            result["ops"] = _op_table(prof, on_gpu, top_ops)
    return result


def _op_table(prof, on_gpu: bool, top: int) -> Dict:
    """Self time per op of a profiled iteration (device time on a GPU), the ``top`` largest, and the share of
    every op whose name says convolution: on the CPU the floor that no norm kernel can move."""
    attr = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    events = [(e.key, getattr(e, attr, 0) / 1e6, e.count) for e in prof.key_averages()]
    events = [e for e in events if e[1] > 0]
    total = sum(t for _, t, _ in events)
    conv = sum(t for k, t, _ in events if "conv" in k.lower())
    ranked = sorted(events, key=lambda e: -e[1])[:top]
    return {"total_s": total, "conv_s": conv, "conv_share": conv / total if total else 0.0,
            "top": [{"op": k, "s": t, "calls": n} for k, t, n in ranked]}


def format_profile(result: Dict) -> str:
    lines = [f"{result['model']}, batch {result['batch']}, mode {result['mode']}: "
             f"{result['total_s']:.3f} s/iteration", "| phase | s | share |", "|---|---|---|"]
    for name, t in result["phases_s"].items():
        lines.append(f"| {name} | {t:.4f} | {100 * t / result['total_s']:.1f}% |")
    ops = result.get("ops")
    if ops:
        lines += ["", f"profiled iteration: {ops['total_s']:.3f} s of op self time, convolutions {ops['conv_s']:.3f} s "
                      f"({100 * ops['conv_share']:.1f}%)", "| op | self s | calls |", "|---|---|---|"]
        lines += [f"| {o['op'][:70]} | {o['s']:.4f} | {o['calls']} |" for o in ops["top"]]
    return "\n".join(lines)


def peak_memory(model_name: str, batch: int, mode: str, device: str, steps: int = 2) -> float:
    """Peak memory (MiB) of ``steps`` iterations of ``mode`` measured in a fresh subprocess."""
    code = (f"from anp_fast_bench.bench import _memory_probe; "
            f"_memory_probe({model_name!r}, {batch}, {mode!r}, {device!r}, {steps})")
    # Fixed mmap threshold: every large tensor gets its own mapping, returned to the OS when freed, so the
    # peak RSS follows live tensors rather than heap pages glibc keeps after a dynamic threshold raise.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _memory_probe(model_name, batch, mode, device, steps):
    device = torch.device(device)
    model, x, y = workload(model_name, batch, device)
    step = make_step(mode, model, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(steps):
            step(x, y)
        torch.cuda.synchronize()
        print((torch.cuda.max_memory_allocated() - before) / 2**20)
        return
    # Not ru_maxrss: the kernel carries the parent's RSS at fork into it across exec. VmHWM is this
    # process's own peak; writing 5 to clear_refs resets it to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_mib("VmRSS")
    for _ in range(steps):
        step(x, y)
    print(_status_mib("VmHWM") - before)


def environment(device: str) -> Dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "threads": torch.get_num_threads(), "device": device}
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        env["commit"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name()
    else:
        env["device_name"] = platform.processor() or _cpu_name()
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def format_table(result: Dict) -> str:
    lines = [f"{result['model']}, batch {result['batch']}, {result['env']['device_name']}, torch "
             f"{result['env']['torch']}, {result['env']['threads']} threads, commit {result['env']['commit']}",
             "| mode | s/iter | vs published | step / 6F | peak MiB |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        sp = f"{r['speedup_vs_published']:.2f}x" if r["speedup_vs_published"] else "-"
        mem = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "-"
        lines.append(f"| {r['mode']} | {r['s_per_iter']:.3f} | {sp} | {r['step_over_6F']:.2f} | {mem} |")
    return "\n".join(lines)


def write(result: Dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(out_dir, f"{result['model']}_b{result['batch']}_{result['env']['device']}_{stamp}")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(result["rows"][0]))
        w.writeheader()
        w.writerows(result["rows"])
    with open(base + ".md", "w") as f:
        f.write(format_table(result) + "\n")
    return base


def main(argv: Optional[List[str]] = None) -> int:
    """The benchmark package's entry point: ``anp-fast-bench``, ``python -m anp_fast_bench`` and ``anp-fast
    bench`` (which runs this in a child process)."""
    from anp_fast.errors import ANPError

    given = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--nproc" or a.startswith("--nproc=") for a in given) or "--worker" in given:
        from .dist_bench import main as dist_main  # N processes against one (issue 13)

        return dist_main(given)
    p = argparse.ArgumentParser(prog="anp-fast bench", description=__doc__.split("\n")[0])
    add_arguments(p)
    try:
        return run_cli(p.parse_args(argv))
    except ANPError as exc:
        print(f"anp-fast bench: error: {exc}", file=sys.stderr)
        return 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="instead: one engine --mode over N processes (torch.distributed) against one process: "
                        "step time, time in the collectives, mask agreement (python -m anp_fast_bench.dist_bench "
                        "--help)")
    p.add_argument("--model", default="cifar_resnet18")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help="comma-separated: 'published' or '+'-joined tokens from " + ", ".join(TOKENS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=1, help="iterations per mode per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="keep freed CPU memory in the process for every mode (see anp_fast.cpu_memory)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON/CSV/markdown results")
    p.add_argument("--profile", metavar="MODE", default=None,
                   help="instead of timing modes, break one iteration of engine MODE into its phases")
    p.add_argument("--trace", default=None, help="with --profile: write a torch.profiler trace here")
    p.add_argument("--top-ops", type=int, default=0, metavar="N",
                   help="with --profile: the N ops with the most self time in one profiled iteration, and the "
                        "convolutions' share")


def run_cli(args) -> int:
    for name in ("batch", "rounds", "iters", "warmup"):
        if getattr(args, name) < 1:
            raise SystemExit(f"anp-fast bench: --{name} {getattr(args, name)}: must be >= 1")
    if (args.trace or args.top_ops) and not args.profile:
        raise SystemExit("anp-fast bench: --trace and --top-ops go with --profile MODE")
    try:
        build_model(args.model)
    except ValueError as exc:
        raise SystemExit(f"anp-fast bench: {exc}") from None
    if getattr(args, "keep_freed_memory", False):
        from anp_fast.cpu_memory import keep_freed_memory

        print(f"keep freed memory: {'on' if keep_freed_memory() else 'not available here'}")
    if args.profile:
        try:
            parse_mode(args.profile)
        except ValueError as exc:
            raise SystemExit(f"anp-fast bench: {exc}") from None
        result = profile(args.model, args.batch, args.profile, args.rounds, args.warmup, args.device,
                         trace=args.trace, top_ops=args.top_ops,
                         log=lambda s: print(s, file=sys.stderr, flush=True))
        print(format_profile(result))
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    try:
        [parse_mode(m) for m in modes]
    except ValueError as exc:
        raise SystemExit(f"anp-fast bench: {exc}") from None
    result = run(args.model, args.batch, modes, args.rounds, args.iters, args.warmup, args.device,
                 log=lambda s: print(s, file=sys.stderr, flush=True))
    result["env"] = environment(args.device)
    if not args.no_memory:
        for row in result["rows"]:
            row["peak_mib"] = peak_memory(args.model, args.batch, row["mode"], args.device)
    base = write(result, args.out)
    print(format_table(result))
    print(f"\nwrote {base}.json/.csv/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
