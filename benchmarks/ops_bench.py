"""Fused perturbed batch norm against the eager composite, op by op, at the batch-norm shapes of a CIFAR
ResNet-18 (batch 128, channels_last by default), interleaved in one process, medians and ratios.

The eager composite is what the unfused engine runs: ``F.batch_norm`` with the composed weights
(scale * coef_w, shift * coef_b), then ``+ residual``, then ReLU, forward and backward through autograd to
the input, the residual and the coefficients. ``resnet18 mix`` weighs every shape/epilogue by how many batch
norms of a CIFAR ResNet-18 have it. On a GPU the achieved bandwidth of the fused forward (read x [, residual],
write y) and backward (read x, dy [, y], write dx [, d residual]) is set against a device-to-device copy.

    python -m anp_fast_bench.ops_bench [--backend cpp] [--device cpu] [--dtypes fp32,bf16] [--out DIR]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from anp_fast import ops
from anp_fast.ops import eager

# (channels, spatial, epilogue, count in a CIFAR ResNet-18): epilogue "relu" = bn1 of a block (and the stem),
# "res+relu" = bn2 with the block's residual, "none" = the shortcut's batch norm.
RESNET18_BN = [
    (64, 32, "relu", 3), (64, 32, "res+relu", 2),
    (128, 16, "relu", 2), (128, 16, "res+relu", 2), (128, 16, "none", 1),
    (256, 8, "relu", 2), (256, 8, "res+relu", 2), (256, 8, "none", 1),
    (512, 4, "relu", 2), (512, 4, "res+relu", 2), (512, 4, "none", 1),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _case(c, hw, epilogue, dtype, device, batch, channels_last):
    g = torch.Generator().manual_seed(c + hw)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    shape = (batch, c, hw, hw)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    res = torch.randn(shape, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=fmt) \
        if epilogue == "res+relu" else None
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    scale, shift = torch.randn(c, generator=g).to(device), torch.randn(c, generator=g).to(device)
    cw = (torch.rand(1, c, generator=g) + 0.5).to(device)
    cb = (torch.rand(1, c, generator=g) + 0.5).to(device)
    return x, res, dy, scale, shift, cw, cb


def _step(fn, case, relu):
    x, res, dy, scale, shift, cw, cb = case
    xl = x.detach().requires_grad_()
    cwl = cw.detach().requires_grad_()
    cbl = cb.detach().requires_grad_()
    inputs = [xl, cwl, cbl]
    rl = None
    if res is not None:
        rl = res.detach().requires_grad_()
        inputs.append(rl)
    y = fn(xl, scale, shift, cwl, cbl, None, None, True, 0.0, 1e-5, residual=rl, relu=relu)
    torch.autograd.grad(y, inputs, dy)


def _forward_only(fn, case, relu):
    x, res, dy, scale, shift, cw, cb = case
    with torch.no_grad():
        fn(x, scale, shift, cw, cb, None, None, True, 0.0, 1e-5, residual=res, relu=relu)


def _time(fn, device, reps):
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps


def measure(backend, device, dtype_names, batch=128, channels_last=True, rounds=7, reps=3):
    fused = ops.implementation("perturbed_batch_norm", backend)
    rows = []
    for dname in dtype_names:
        dtype = DTYPES[dname]
        for c, hw, epilogue, count in RESNET18_BN:
            case = _case(c, hw, epilogue, dtype, device, batch, channels_last)
            relu = epilogue != "none"
            fns = {"eager": lambda: _step(eager.perturbed_batch_norm, case, relu),
                   "fused": lambda: _step(fused, case, relu),
                   "fused_fwd": lambda: _forward_only(fused, case, relu),
                   "copy": lambda: case[0].clone()}
            for f in fns.values():  # warm-up
                f()
            times = {k: [] for k in fns}
            for _ in range(rounds):  # interleaved
                for k, f in fns.items():
                    times[k].append(_time(f, device, reps))
            med = {k: statistics.median(v) for k, v in times.items()}
            row = dict(dtype=dname, channels=c, spatial=hw, epilogue=epilogue, count=count,
                       eager_ms=med["eager"] * 1e3, fused_ms=med["fused"] * 1e3,
                       speedup=med["eager"] / med["fused"], fused_fwd_ms=med["fused_fwd"] * 1e3,
                       copy_ms=med["copy"] * 1e3)
            if device.type == "cuda":
                elem = case[0].element_size() * case[0].numel()
                fwd_bytes = elem * (2 + (epilogue == "res+relu"))
                bwd_bytes = elem * (3 + (epilogue != "none") + (epilogue == "res+relu"))
                copy_bw = 2 * elem / med["copy"]
                row["fwd_bw_vs_copy"] = fwd_bytes / med["fused_fwd"] / copy_bw
                bwd_time = max(med["fused"] - med["fused_fwd"], 1e-9)
                row["bwd_bw_vs_copy"] = bwd_bytes / bwd_time / copy_bw
            rows.append(row)
            print(f"{dname} C={c:4d} {hw:2d}x{hw:<2d} {epilogue:8s} eager {row['eager_ms']:8.2f} ms  "
                  f"fused {row['fused_ms']:8.2f} ms  x{row['speedup']:.2f}", flush=True)
        mix_e = sum(r["eager_ms"] * r["count"] for r in rows if r["dtype"] == dname)
        mix_f = sum(r["fused_ms"] * r["count"] for r in rows if r["dtype"] == dname)
        rows.append(dict(dtype=dname, channels="all", spatial="", epilogue="resnet18 mix", count=20,
                         eager_ms=mix_e, fused_ms=mix_f, speedup=mix_e / mix_f))
        print(f"{dname} resnet18 mix: eager {mix_e:.1f} ms, fused {mix_f:.1f} ms, x{mix_e / mix_f:.2f}", flush=True)
    return rows


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m anp_fast_bench.ops_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default=None, help="fused backend (default: the preferred one on the device)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, of {', '.join(DTYPES)}")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=None, help="folder for JSON/CSV/markdown results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    backend = args.backend or next(b for b in ops.backends("perturbed_batch_norm", device.type) if b != "eager")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not dtypes:
        p.error(f"--dtypes {args.dtypes!r}: valid: {', '.join(DTYPES)}")
    rows = measure(backend, device, dtypes, args.batch, not args.nchw, args.rounds)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    from anp_fast.ops import loaders
    variant = loaders.cpu_variant if backend == "cpp" else None  # which C++ CPU build ran (runtime dispatch)
    meta = dict(backend=backend, cpu_variant=variant, device=name, torch=torch.__version__,
                threads=torch.get_num_threads(),
                batch=args.batch, layout="nchw" if args.nchw else "channels_last", commit=_commit(),
                when=time.strftime("%Y-%m-%d %H:%M:%S"))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = f"{backend}-{variant}" if variant else backend
        stem = out / f"ops_batch_norm_{tag}_{device.type}_{time.strftime('%Y%m%d-%H%M%S')}"
        stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        with open(stem.with_suffix(".csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            w.writeheader()
            w.writerows(rows)
        lines = [f"fused perturbed batch norm ({tag}) vs eager composite, forward+backward, {meta['device']}, "
                 f"torch {meta['torch']}, {meta['threads']} threads, batch {args.batch}, {meta['layout']}, "
                 f"commit {meta['commit']}", "", "| dtype | C | HxW | epilogue | count | eager ms | fused ms | speedup |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['dtype']} | {r['channels']} | {r['spatial']}x{r['spatial']} | {r['epilogue']} | "
                         f"{r['count']} | {r['eager_ms']:.2f} | {r['fused_ms']:.2f} | {r['speedup']:.2f}x |")
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print(f"wrote {stem}.json/.csv/.md")
    return rows


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
