"""How close N processes (torch.distributed, gloo, CPU) come to one over whole ANP runs (issue 13).

One process and N processes run the same ANP loop (same checkpoint, clean data, seed, global batch) and record
every noise-ascent gradient (after the sum over processes) and the masks. Reports the max mask difference after
each of --at iterations, the pruned sets (threshold 0.2) at the end, and the FIRST iteration where a sign of the
noise gradient differs, with the size of the gradient components that flipped (relative to the largest one):
the loop takes the sign of that gradient, so a component below the rounding of the sums takes either sign and
moves that neuron's noise by 2 eps / steps, after which the runs follow different trajectories.

    python -m anp_fast_bench.dist_agreement --checkpoint DEMO_OUT/backdoored.safetensors --iters 200
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch


def _setup(args):
    from anp_fast import ANPConfig
    from anp_fast.datasets import clean_split
    from anp_fast.evaluation import tensors_of
    from anp_fast.inputs import load_model_and_data
    from torch.utils.data import Subset

    loaded = load_model_and_data(args.arch, args.checkpoint, args.data, {"width": args.width})
    clean_idx, _ = clean_split(len(loaded.splits.train), count=args.clean_count, holdout_fraction=0.5, seed=0)
    x, y = tensors_of(Subset(loaded.norm_train, clean_idx.tolist()))
    config = ANPConfig(iters=args.iters, seed=0, fused_kernels=not args.eager)
    model = loaded.model
    if args.fp64:
        model, x = model.double(), x.double()
    return model, (x, y), config


def _run(args, out_path: str) -> None:
    """One run (in this process, inside a process group or not): noise-gradient signs per iteration and masks
    at the --at iterations."""
    from anp_fast import ANPEngine, optimize_masks
    from anp_fast import engine as engine_module

    model, data, config = _setup(args)
    engine = ANPEngine(model, config)
    signs, grads, snapshots = [], [], {}
    real_grad = torch.autograd.grad

    if engine.collective is not None:  # the gradient after the sum over the processes
        real_reduce = engine.collective.all_reduce_

        def reduce(tensors):
            real_reduce(tensors)
            if len(tensors) == 2:
                grads.append(torch.cat([t.detach().clone() for t in tensors]))
        object.__setattr__(engine.collective, "all_reduce_", reduce)
    else:
        def grad(outputs, inputs, *rest, **kwargs):
            out = real_grad(outputs, inputs, *rest, **kwargs)
            if isinstance(inputs, tuple) and len(inputs) == 2 and inputs[0] is engine.state.noise_w:
                grads.append(torch.cat([t.detach().clone() for t in out]))
            return out
        engine_module.torch.autograd.grad = grad

    def monitor(done, eng):
        g = grads[-1]
        signs.append((torch.sign(g).to(torch.int8), g.abs().float()))
        if done in args.at:
            snapshots[done] = eng.state.mask.clone()
        return False

    try:
        optimize_masks(model, data, config, progress=False, monitor=monitor, monitor_every=1, engine=engine)
    finally:
        engine_module.torch.autograd.grad = real_grad
    if engine.collective is None or engine.collective.rank == 0:
        torch.save({"signs": [s for s, _ in signs], "mags": [m for _, m in signs], "masks": snapshots,
                    "layers": [(s.name, s.offset, s.size) for s in engine.state.slots]}, out_path)


def _worker(rank, world, init, args, out_path):
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        _run(args, out_path)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m anp_fast_bench.dist_agreement", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--data", default="digits")
    p.add_argument("--clean-count", type=int, default=360)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--at", default="5,200", help="iterations whose masks are compared")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per process (both runs)")
    p.add_argument("--eager", action="store_true", help="the eager ops in the one-process run too")
    p.add_argument("--fp64", action="store_true", help="model and data in fp64 (masks stay fp32)")
    p.add_argument("--out", default=None, help="JSON file for the figures")
    args = p.parse_args(argv)
    args.at = sorted({int(a) for a in args.at.split(",")})
    import torch.multiprocessing as mp

    tmp = tempfile.mkdtemp()
    torch.set_num_threads(args.threads)
    _run(args, os.path.join(tmp, "one.pt"))
    mp.spawn(_worker, args=(args.nproc, os.path.join(tmp, "init"), args, os.path.join(tmp, "many.pt")),
             nprocs=args.nproc, join=True)
    one = torch.load(os.path.join(tmp, "one.pt"), weights_only=True)
    many = torch.load(os.path.join(tmp, "many.pt"), weights_only=True)
    figures = {"iters": args.iters, "nproc": args.nproc, "fp64": args.fp64, "eager_single": args.eager,
               "max_mask_diff": {}}
    for it in args.at:
        figures["max_mask_diff"][it] = float((one["masks"][it] - many["masks"][it]).abs().max())
    first = next((i for i, (a, b) in enumerate(zip(one["signs"], many["signs"])) if not torch.equal(a, b)), None)
    if first is not None:
        flipped = (one["signs"][first] != many["signs"][first]).nonzero().flatten()
        scale = float(one["mags"][first].max())
        layer_of = lambda k: next(n for n, o, s in one["layers"] if o <= k % (len(one["signs"][0]) // 2) < o + s)
        half = len(one["signs"][0]) // 2
        figures["first_sign_difference"] = {
            "iteration": first + 1,
            "components": [{"neuron": layer_of(int(k)) + f"[{int(k) % half - next(o for n, o, s in one['layers'] if o <= int(k) % half < o + s)}]",
                            "noise": "d (weight)" if int(k) < half else "e (bias)",
                            "one": float(one["mags"][first][k]) * int(one["signs"][first][k]),
                            "many": float(many["mags"][first][k]) * int(many["signs"][first][k]),
                            "relative_to_largest": float(one["mags"][first][k]) / scale} for k in flipped[:10]],
            "count": int(flipped.numel())}
    last = args.at[-1]
    a, b = one["masks"][last] <= 0.2, many["masks"][last] <= 0.2
    differ = (a != b).nonzero().flatten().tolist()

    def name_of(k):
        return next(f"{n}[{k - o}]" for n, o, s in one["layers"] if o <= k < o + s)
    figures["pruned_threshold_0.2"] = {
        "one": int(a.sum()), "many": int(b.sum()), "differ": len(differ),
        "neurons": [{"neuron": name_of(k), "mask_one": float(one["masks"][last][k]),
                     "mask_many": float(many["masks"][last][k])} for k in differ]}
    diff = (one["masks"][last] - many["masks"][last]).abs()
    figures["mask_diff_quantiles_at_end"] = {q: float(diff.quantile(q)) for q in (0.5, 0.9, 0.99)}
    text = json.dumps(figures, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
