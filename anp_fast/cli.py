"""The ``anp-fast`` command line."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import __version__
from .config import LAYER_POLICIES, PRECISIONS, TRAIN_MODES, ANPConfig
from .engine import Interrupted
from .errors import ANPError


def _add_config_flags(p: argparse.ArgumentParser, skip=("iters", "seed")) -> None:
    d = ANPConfig()
    g = p.add_argument_group("ANP options (defaults are the published ones)")
    g.add_argument("--eps", type=float, default=d.eps, help="neuron perturbation bound")
    g.add_argument("--steps", type=int, default=d.steps, help="adversarial steps per iteration")
    g.add_argument("--alpha", type=float, default=d.alpha, help="weight of the clean loss")
    g.add_argument("--lr", type=float, default=d.lr, help="mask learning rate")
    g.add_argument("--momentum", type=float, default=d.momentum, help="mask SGD momentum")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="clean batch size")
    g.add_argument("--project-noise", action="store_true", help="clamp the noise to [-eps, eps] (paper)")
    g.add_argument("--layers", choices=LAYER_POLICIES, default=d.layers, help="what to perturb")
    g.add_argument("--train-mode", choices=TRAIN_MODES, default=d.train_mode,
                   help="'all': whole model in train mode (published); 'norms': only the norm layers")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: where the model is)")
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="fp32 (exact), bf16 (all passes), mixed (noise step bf16, mask step fp32)")
    f = p.add_argument_group("fast paths (default: automatic)")
    f.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for conv models)")
    f.add_argument("--merge-passes", action=argparse.BooleanOptionalAction, default=None,
                   help="clean and perturbed passes as one pass over the batch twice (default: on CUDA)")
    f.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model passes (default: on CUDA)")
    f.add_argument("--fused-kernels", action=argparse.BooleanOptionalAction, default=None,
                   help="fused compiled norm kernels (default: where built; --no-fused-kernels: eager ops, "
                        "bit-identical to the published loop)")


def _config_from(args) -> ANPConfig:
    return ANPConfig(eps=args.eps, steps=args.steps, alpha=args.alpha, lr=args.lr, momentum=args.momentum,
                     batch_size=args.batch_size, project_noise=args.project_noise, layers=args.layers,
                     train_mode=args.train_mode, device=args.device, precision=args.precision,
                     channels_last=args.channels_last, merge_passes=args.merge_passes, compile=args.compile,
                     fused_kernels=args.fused_kernels)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anp-fast", description="Adversarial Neuron Pruning, fast.")
    parser.add_argument("--version", action="version", version=f"anp-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="backdoor a ResNet on scikit-learn's digits, then purify it with ANP",
                          description="Train a small ResNet on scikit-learn's digits with a backdoor, run ANP on "
                                      "a clean split the attack never touched, prune, report ACC/ASR.")
    demo.add_argument("--out", default="anp_demo_out", help="output folder (default: %(default)s)")
    demo.add_argument("--iters", type=int, default=2000, help="ANP iterations (default: %(default)s, published)")
    demo.add_argument("--threshold", type=float, default=0.2, help="prune masks <= this (default: %(default)s)")
    demo.add_argument("--trigger", choices=("badnets", "blend"), default="badnets")
    demo.add_argument("--target", type=int, default=0, help="backdoor target class (0-9)")
    demo.add_argument("--poison-rate", type=float, default=0.1)
    demo.add_argument("--epochs", type=int, default=15, help="training epochs of the backdoored model")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_flags(demo)
    bench = sub.add_parser("bench", help="time ANP iterations: the eager published loop against the engine",
                           description="Time one ANP iteration of the eager published loop and of engine modes, "
                                       "interleaved in one process; report medians, ratios, step / 6F and peak "
                                       "memory; write JSON/CSV/markdown results.")
    from anp_fast_bench.bench import add_arguments

    add_arguments(bench)
    return parser


def _demo(args) -> int:
    from .demo import run_demo

    if not 0 <= args.target < 10:
        raise ANPError(f"--target {args.target}: digits has classes 0-9")
    if args.epochs < 1:
        raise ANPError(f"--epochs {args.epochs}: must be >= 1")
    run_demo(out=args.out, iters=args.iters, threshold=args.threshold, trigger=args.trigger, target=args.target,
             poison_rate=args.poison_rate, epochs=args.epochs, seed=args.seed,
             config=_config_from(args), progress=not args.no_progress,
             overwrite=args.overwrite)
    return 0


def _bench(args) -> int:
    from anp_fast_bench.bench import run_cli

    return run_cli(args)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return {"demo": _demo, "bench": _bench}[args.command](args)
    except ANPError as exc:
        print(f"anp-fast: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted:
        print("anp-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
