"""The ``anp-fast`` command line."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from . import __version__
from .config import RUN, ANPConfig
from .errors import Interrupted
from .errors import ANPError, ProcessGroupError


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (unless it has none, or the help already says it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS)
                and "default" not in text):
            text += " (default: %(default)s)"
        return text


def _add_config_flags(p: argparse.ArgumentParser, skip=("iters", "seed")) -> None:
    """A flag for every ANPConfig field (but ``skip``), generated from the dataclass: type, default, choices and
    help (from its docstring); a new field appears here with no second list."""
    import dataclasses

    from .config import FAST_PATH_FIELDS, FIELD_CHOICES, field_help

    helps = field_help(ANPConfig)
    g = p.add_argument_group("ANP options (defaults are the published ones)")
    f = p.add_argument_group("fast paths (default: automatic)")
    for field in dataclasses.fields(ANPConfig):
        if field.name in skip:
            continue
        group = f if field.name in FAST_PATH_FIELDS else g
        flag = "--" + field.name.replace("_", "-")
        text = helps.get(field.name, "").replace("%", "%%")
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
        if kind == "bool" and field.default is False:
            group.add_argument(flag, action="store_true", help=text)
        elif "bool" in kind:  # True by default, or None (automatic)
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=text)
        else:
            cast = {"float": float, "int": int}.get(kind, str)
            group.add_argument(flag, type=cast, default=field.default, choices=FIELD_CHOICES.get(field.name),
                               help=text)
    f.add_argument("--keep-freed-memory", action="store_true",
                   help="keep freed CPU memory in the process instead of handing it back to the OS: fewer page "
                        "faults, faster on CPU (measured 4-9%% per iteration), resident size does not shrink")


def config_argv(config: ANPConfig, skip=("iters", "seed")) -> List[str]:
    """The flags that :func:`_add_config_flags` parses back into ``config`` (only the fields that differ from
    the defaults): what a command records so that it can be run again."""
    import dataclasses

    argv = []
    for field in dataclasses.fields(ANPConfig):
        value = getattr(config, field.name)
        if field.name in skip or value == field.default:
            continue
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _config_from(args, skip=("iters", "seed")) -> ANPConfig:
    return ANPConfig(**{name: getattr(args, name) for name in ANPConfig.field_names()
                        if name not in skip and hasattr(args, name)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anp-fast", description="Adversarial Neuron Pruning, fast.",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"anp-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", formatter_class=_HelpFormatter,
                          help="backdoor a ResNet on scikit-learn's digits, then purify it with ANP",
                          description="Train a small ResNet on scikit-learn's digits with a backdoor, run ANP on "
                                      "a clean split the attack never touched, prune, report ACC/ASR.")
    demo.add_argument("--out", default="anp_demo_out", help="output folder (default: %(default)s)")
    demo.add_argument("--iters", type=int, default=2000, help="ANP iterations (default: %(default)s, published)")
    demo.add_argument("--prune", default=RUN.prune,
                      help="auto (default: the clean walk, see README: first the pre-activation suspects, then "
                           "from the lowest mask up, prune each neuron that costs ANP's clean set little, within --budget; "
                           "then checked on the held-out split) | auto:masks (the walk on the masks alone) | "
                           "auto:most (the most neurons in mask order within --budget) | threshold:T | number:K | "
                           "fraction:F")
    demo.add_argument("--threshold", type=float, default=None,
                      help="prune masks <= this (the published fixed rule; same as --prune threshold:T)")
    demo.add_argument("--budget", type=float, default=RUN.budget,
                      help="auto: largest drop of clean accuracy, in points (default: %(default)s)")
    demo.add_argument("--trigger", default="badnets",
                      help="badnets | patch | blend | sig | wanet, with options NAME:KEY=VALUE (default: badnets)")
    demo.add_argument("--target", type=int, default=0, help="backdoor target class (0-9)")
    demo.add_argument("--poison-rate", type=float, default=0.1, help="fraction of training images poisoned")
    demo.add_argument("--epochs", type=int, default=15, help="training epochs of the backdoored model")
    demo.add_argument("--seed", type=int, default=0, help="seed of the split, the training and ANP")
    demo.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_flags(demo)
    purify = sub.add_parser("purify", formatter_class=_HelpFormatter,
                            help="run ANP on an untrusted checkpoint, prune, write the purified model",
                            description="Load a checkpoint (safely: tensors only), run ANP on a little clean data, "
                                        "prune, and write the purified checkpoint (.safetensors and .pt), the "
                                        "masks, a JSON report, the pruning sweep (CSV) and plots into --out.")
    _add_model_data_flags(purify, checkpoint=True)
    purify.add_argument("--clean-fraction", type=float, default=None,
                        help=f"fraction of the training split used as clean data (default {RUN.clean_fraction})")
    purify.add_argument("--clean-count", type=int, default=None, help="number of clean images instead")
    purify.add_argument("--holdout-fraction", type=float, default=RUN.holdout_fraction,
                        help="part of the clean data held out to check the pruning choice (default: %(default)s)")
    purify.add_argument("--prune", default=RUN.prune,
                        help="threshold:T | number:K | fraction:F | auto (default: %(default)s: the clean walk "
                             "with pre-activation evidence on the clean set, checked on the held-out split, see README) | "
                             "auto:masks | auto:most | auto:first")
    purify.add_argument("--budget", type=float, default=RUN.budget,
                        help="auto pruning: largest drop of clean accuracy, in points (default: 2)")
    purify.add_argument("--trigger", default=None,
                        help="badnets | patch | blend | sig | wanet | published-badnets | published-4corner | "
                             "backdoorbench-badnets | backdoorbench-blended (NAME:KEY=VALUE,... as in attack) | "
                             "trigger_info.th | an image "
                             "file: also report the attack success rate (never used to choose)")
    purify.add_argument("--target", type=int, default=None, help="the backdoor's target class (with --trigger)")
    purify.add_argument("--save-every", type=int, default=0, help="save the run state every N iterations")
    purify.add_argument("--nproc", type=int, default=1,
                        help="processes to run ANP over (torch.distributed; default 1). Starts them through torch's "
                             "launcher as `torchrun --nproc-per-node N -m anp_fast purify ...` would; each gets "
                             "cores/N threads unless OMP_NUM_THREADS is set")
    purify.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                        help="with several processes: how long a collective waits for a process that hangs before "
                             "the run stops with an error (default 600; one that dies is seen at once)")
    purify.add_argument("--resume", metavar="DIR", default=None,
                        help="continue the run whose state is in DIR (its other arguments are read from there)")
    purify.add_argument("--sample-with-replacement", action="store_true",
                        help="allow a clean set smaller than one batch (batches are drawn with replacement)")
    purify.add_argument("--workers", type=int, default=0, help="data loading worker processes")
    purify.add_argument("--image-cache", metavar="DIR", default=None,
                        help="imagefolder data: decode the clean and held-out images once into DIR and memory-map "
                             "them in later runs (default: $ANP_FAST_CACHE or ~/.cache/anp_fast)")
    purify.add_argument("--no-image-cache", action="store_true",
                        help="imagefolder data: decode the clean images at every draw instead")
    purify.add_argument("--method", default="anp",
                        help="how the masks are learned: anp (default) | rnp (Reconstructive Neuron Pruning: "
                             "unlearn a copy, learn masks on it, prune the original) | a registered method")
    purify.add_argument("--stop-patience", type=int, default=0, metavar="K",
                        help="opt-in early stop: end the loop once the set of neurons the pruning rule would "
                             "prune is not empty and has not changed over K checks (default: 0, off: the "
                             "published fixed iteration count)")
    purify.add_argument("--stop-every", type=int, default=100, metavar="N",
                        help="with --stop-patience: check every N iterations (default: %(default)s)")
    purify.add_argument("--stop-overlap", type=float, default=1.0, metavar="F",
                        help="with --stop-patience: a set 'has not changed' when it overlaps the previous check's "
                             "by at least F (Jaccard; default: %(default)s, the same set)")
    purify.add_argument("--stop-threshold", type=float, default=None, metavar="T",
                        help="with --stop-patience: compare the sets of masks at or below T (0 < T < 1) instead "
                             "of the pruning rule's (no evaluation per check; default: the pruning rule's set)")
    purify.add_argument("--preset", default=None, choices=("published", "backdoorbench"),
                        help="defaults of another front end (values and their sources: anp_fast.presets); flags "
                             "given here still win")
    _add_config_flags(purify, skip=())
    _add_rnp_flags(purify)
    parser.purify = purify
    prune_p = sub.add_parser("prune", formatter_class=_HelpFormatter,
                             help="prune a checkpoint with a mask file; write it and the pruning sweep",
                             description="Masks (published format) + checkpoint -> pruned checkpoint, sweep CSV, "
                                         "plot and report.")
    _add_model_data_flags(prune_p, checkpoint=True)
    prune_p.add_argument("--masks", required=True, help="mask file (published ' \\t ' format)")
    prune_p.add_argument("--prune", default="threshold:0.2",
                         help="threshold:T | number:K | fraction:F | auto[:walk|masks|most|first]")
    prune_p.add_argument("--budget", type=float, default=RUN.budget, help="auto: clean accuracy drop allowed (points)")
    prune_p.add_argument("--trigger", default=None,
                         help="badnets | patch | blend | sig | wanet | published-badnets | published-4corner | "
                              "backdoorbench-badnets | backdoorbench-blended (with options) | trigger_info.th | "
                              "an image file (report ASR)")
    prune_p.add_argument("--target", type=int, default=None,
                         help="the backdoor's target class (with --trigger: report the ASR)")
    prune_p.add_argument("--seed", type=int, default=0, help="seed of the held-out clean split (as in purify)")
    prune_p.add_argument("--clean-fraction", type=float, default=None, help=f"as given to purify (default {RUN.clean_fraction})")
    prune_p.add_argument("--clean-count", type=int, default=None, help="as given to purify")
    prune_p.add_argument("--holdout-fraction", type=float, default=RUN.holdout_fraction, help="as given to purify")
    prune_p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N")
    attack = sub.add_parser("attack", formatter_class=_HelpFormatter,
                            help="train a backdoored model (for research and tests)",
                            description="Train --arch on --data with a fraction of the training split poisoned "
                                        "by a trigger; write the checkpoint (.safetensors, .pt) and attack.json.")
    _add_model_data_flags(attack, checkpoint=False)
    attack.add_argument("--trigger", default="badnets",
                        help="badnets | patch | blend | sig (clean label) | wanet (with its noise mode) | "
                             "published-badnets | published-4corner | backdoorbench-badnets | backdoorbench-blended | "
                             "an image file; options as NAME:KEY=VALUE,... e.g. blend:alpha=0.1 (default: "
                             "%(default)s)")
    attack.add_argument("--target", type=int, default=0, help="the class triggered images go to (default: 0)")
    attack.add_argument("--poison-rate", type=float, default=0.1,
                        help="poisoned images / all training images (0: a benign model; default: %(default)s)")
    attack.add_argument("--reserve-clean", type=int, default=None, metavar="N",
                        help="leave out of training the N images that `purify --clean-count N` with the same "
                             "--seed takes as clean data, so the defender's images are unseen by the model")
    attack.add_argument("--epochs", type=int, default=30, help="training epochs (default: %(default)s)")
    attack.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    attack.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, one-cycle (default: %(default)s)")
    attack.add_argument("--seed", type=int, default=0, help="seed of the poisoning, the initial weights and training")
    attack.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N")
    export = sub.add_parser("export-digits", formatter_class=_HelpFormatter,
                            help="write scikit-learn's digits as CIFAR-10 python-format files",
                            description="Write the digits (upscaled to 3x32x32) in the published CIFAR-10 python "
                                        "format under DIR, to try the CIFAR pipeline without a download.")
    export.add_argument("dir")
    export.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    # its flags live with the benchmark package (which imports torch): `anp-fast bench ...` is handed to it
    sub.add_parser("doctor", help="versions, built backends, and a check of each compiled kernel against the "
                                  "eager op on this machine (exit 1 if ANP_FAST_BACKEND names an unusable one)")
    sub.add_parser("bench", help="time ANP iterations: the eager published loop against the engine "
                                 "(anp-fast bench --help: its options)", add_help=False)
    return parser


def _bench_main(argv: List[str]) -> int:
    """``anp-fast bench ...`` is the benchmark package's own entry point (``anp-fast-bench``, ``python -m
    anp_fast_bench``), run in a child process: the CLI never imports the benchmark package."""
    import subprocess

    try:
        return subprocess.call([sys.executable, "-m", "anp_fast_bench", *argv])
    except KeyboardInterrupt:
        print("anp-fast: interrupted", file=sys.stderr)
        return 130


def _add_rnp_flags(p: argparse.ArgumentParser) -> None:
    """``--rnp-FIELD`` for every RNPConfig field (used with --method rnp), defaults the published ones."""
    import dataclasses

    from .config import RNPConfig, field_help

    helps = field_help(RNPConfig)
    g = p.add_argument_group("RNP options (--method rnp; defaults are the published code's)")
    for f in dataclasses.fields(RNPConfig):
        flag = "--rnp-" + f.name.replace("_", "-")
        default = f.default
        text = helps.get(f.name, "").replace("%", "%%")
        if isinstance(default, tuple):
            g.add_argument(flag, type=int, nargs="+", default=list(default), metavar="EPOCH",
                           help=f"{text} (default: {' '.join(map(str, default))})")
        elif default is None:
            g.add_argument(flag, type=float, default=None, help=f"{text} (default: none)")
        else:
            g.add_argument(flag, type=type(default), default=default, help=f"{text} (default: %(default)s)")


def _rnp_options(args):
    import dataclasses

    from .config import RNPConfig

    values = {f.name: getattr(args, "rnp_" + f.name) for f in dataclasses.fields(RNPConfig)}
    values["unlearn_schedule"] = tuple(values["unlearn_schedule"])
    return RNPConfig(**values)


def _add_model_data_flags(p: argparse.ArgumentParser, checkpoint: bool) -> None:
    p.add_argument("--arch", required=False, help="architecture: a registry name (resnet18, resnet34, resnet50, "
                   "preact_resnet18, vgg16_bn, vgg19_bn, mobilenetv2, wrn16), a torchvision model name, or "
                   "package.module:callable")
    p.add_argument("--arch-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the architecture (repeatable), e.g. width=16")
    if checkpoint:
        p.add_argument("--checkpoint", help="the model's weights: .safetensors, or a .pt/.pth state_dict "
                                            "(loaded with weights_only: nothing in it is executed)")
    p.add_argument("--data", help="digits | digits3 | cifar10:DIR | cifar100:DIR | imagefolder:DIR[:SIZE]")
    p.add_argument("--normalize", default=None, metavar="CONVENTION|MEAN/STD",
                   help="the input normalisation the model was trained with: dataset (the data set's own), "
                        "published (the ANP code's CIFAR-10 std 0.2023,0.1994,0.2010), backdoorbench, torchvision "
                        "(ImageNet), none, or MEAN/STD per channel (e.g. 0.5/0.5); default: what the checkpoint "
                        "records (checkpoints anp_fast writes), else dataset")
    if checkpoint:
        p.add_argument("--force", action="store_true",
                       help="go on when the checkpoint fails the plausibility check (clean accuracy near chance, "
                            "or one class taking most predictions: usually the wrong --normalize or --arch)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace our result files already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _arch_args(pairs) -> dict:
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.isidentifier():
            raise ANPError(f"--arch-arg {pair!r}: expected KEY=VALUE")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def _require(args, *names) -> None:
    missing = [n for n in names if getattr(args, n.replace("-", "_")) is None]
    if missing:
        raise ANPError(f"{args.command} needs " + ", ".join(f"--{n}" for n in missing))


def _purify(args) -> int:
    import json

    from .commands import COMMAND_FILE, run_purify

    if args.resume is not None:
        saved = os.path.join(args.resume, COMMAND_FILE)
        if not os.path.isfile(saved):
            raise ANPError(f"--resume {args.resume}: no anp-fast purify run there ({COMMAND_FILE} is missing)")
        with open(saved) as f:
            recorded = json.load(f)
        resume_dir = os.path.abspath(args.resume)
        cwd = recorded.get("cwd")
        if cwd and os.path.isdir(cwd):  # the recorded paths are relative to where the run was started
            os.chdir(cwd)
        _, args = parse(recorded["argv"])
        args.out, args.resume = resume_dir, resume_dir
        argv = recorded["argv"]
    else:
        _require(args, "arch", "checkpoint", "data", "out")
        argv = sys.argv[1:] if _CURRENT_ARGV is None else _CURRENT_ARGV
    if args.clean_fraction is not None and args.clean_count is not None:
        raise ANPError("give --clean-fraction or --clean-count, not both")
    if args.clean_fraction is not None and not 0 < args.clean_fraction <= 1:
        raise ANPError(f"--clean-fraction {args.clean_fraction}: must be in (0, 1]")
    config = _config_from(args).replace(iters=args.iters, seed=args.seed)
    options = _rnp_options(args) if args.method == "rnp" else None
    clean_fraction = args.clean_fraction
    if args.preset and clean_fraction is None and args.clean_count is None:
        from .presets import preset

        clean_fraction = preset(args.preset, args.method).get("clean_fraction")
    run_purify(arch=args.arch, checkpoint=args.checkpoint, data=args.data, out=args.out, config=config,
               method=args.method, method_options=options, stop_patience=args.stop_patience,
               stop_every=args.stop_every, stop_overlap=args.stop_overlap, stop_threshold=args.stop_threshold,
               arch_args=_arch_args(args.arch_arg), clean_fraction=clean_fraction,
               clean_count=args.clean_count, holdout_fraction=args.holdout_fraction, prune_rule=args.prune,
               budget=args.budget, trigger=args.trigger, target=args.target, save_every=args.save_every,
               resume=args.resume is not None, overwrite=args.overwrite,
               allow_small_clean=args.sample_with_replacement, workers=args.workers,
               image_cache=False if args.no_image_cache else args.image_cache,
               progress=not args.no_progress, command={"argv": argv, "cwd": os.getcwd()},
               normalize=args.normalize,
               force=args.force)
    return 0


def _prune(args) -> int:
    from .commands import run_prune

    _require(args, "arch", "checkpoint", "data", "out")
    run_prune(arch=args.arch, checkpoint=args.checkpoint, masks_file=args.masks, data=args.data, out=args.out,
              prune_rule=args.prune, arch_args=_arch_args(args.arch_arg), budget=args.budget,
              trigger=args.trigger, target=args.target, seed=args.seed, device=args.device,
              clean_fraction=args.clean_fraction, clean_count=args.clean_count,
              holdout_fraction=args.holdout_fraction, overwrite=args.overwrite, normalize=args.normalize,
              force=args.force, progress=not args.no_progress)
    return 0


def _attack(args) -> int:
    from .commands import run_attack

    _require(args, "arch", "data", "out")
    run_attack(arch=args.arch, data=args.data, out=args.out, trigger=args.trigger, target=args.target,
               poison_rate=args.poison_rate, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
               arch_args=_arch_args(args.arch_arg), seed=args.seed, device=args.device, overwrite=args.overwrite,
               reserve_clean=args.reserve_clean, progress=not args.no_progress, normalize=args.normalize)
    return 0


def _export_digits(args) -> int:
    from .datasets import digits_as_cifar
    from .inputs import make_out

    make_out(args.dir)
    digits_as_cifar(args.dir, seed=args.seed)
    print(f"wrote digits in CIFAR-10 python format under {args.dir}: use --data cifar10:{args.dir}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    if not 0 <= args.target < 10:
        raise ANPError(f"--target {args.target}: digits has classes 0-9")
    if args.epochs < 1:
        raise ANPError(f"--epochs {args.epochs}: must be >= 1")
    if args.threshold is not None:
        if args.prune != "auto":
            raise ANPError("give --prune or --threshold, not both")
        args.prune = f"threshold:{args.threshold}"
    run_demo(out=args.out, iters=args.iters, prune_rule=args.prune, budget=args.budget, trigger=args.trigger,
             target=args.target,
             poison_rate=args.poison_rate, epochs=args.epochs, seed=args.seed,
             config=_config_from(args), progress=not args.no_progress,
             overwrite=args.overwrite)
    return 0


_CURRENT_ARGV: Optional[List[str]] = None
STOPPED_BY_ANOTHER = 3  # the exit code of a process that stopped because another process of its run failed


def parse(argv: Optional[List[str]]):
    """Parse ``argv``; a ``purify --preset`` sets the defaults of the flags it covers, then parses again, so
    flags given explicitly still win."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "purify" and args.preset:
        from .presets import preset

        try:
            values = preset(args.preset, args.method)
        except ANPError as exc:
            parser.error(str(exc))
        prefix = "rnp_" if args.method == "rnp" else ""
        defaults = {prefix + k: v for k, v in values.items() if k != "clean_fraction"}
        parser = build_parser()
        parser.purify.set_defaults(**defaults)
        args = parser.parse_args(argv)
    return parser, args


def _doctor(args) -> int:
    from .doctor import main as doctor_main

    return doctor_main()


def main(argv: Optional[List[str]] = None) -> int:
    global _CURRENT_ARGV
    _CURRENT_ARGV = list(argv) if argv is not None else None
    given = sys.argv[1:] if argv is None else list(argv)
    if given[:1] == ["bench"]:
        return _bench_main(given[1:])
    parser, args = parse(argv)
    if args.command is None:
        parser.print_help()
        return 2
    commands = {"demo": _demo, "purify": _purify, "prune": _prune, "attack": _attack,
                "export-digits": _export_digits, "doctor": _doctor}
    if getattr(args, "keep_freed_memory", False):
        from .cpu_memory import keep_freed_memory

        if not keep_freed_memory():
            print("anp-fast: --keep-freed-memory is not available here (glibc malloc only); ignored", file=sys.stderr)
    from .distributed import init_from_env, launched

    if args.command == "purify" and getattr(args, "nproc", 1) != 1 and not launched():
        return _launch(args.nproc, given)
    try:  # only when started by a launcher as one of several processes
        started = init_from_env(getattr(args, "dist_timeout", None))
    except ANPError as exc:
        print(f"anp-fast: error: {exc}", file=sys.stderr)
        return 2
    who = f" (rank {os.environ.get('RANK', '?')})" if launched() and os.environ.get("RANK") != "0" else ""
    try:
        code = commands[args.command](args)
    except ProcessGroupError as exc:  # stopped because another process failed: the launcher names that one
        print(f"anp-fast: error{who}: {exc}", file=sys.stderr)
        code = STOPPED_BY_ANOTHER
    except ANPError as exc:
        print(f"anp-fast: error{who}: {exc}", file=sys.stderr)
        code = 2
    except Interrupted:
        print("anp-fast: interrupted", file=sys.stderr)
        code = 130
    except KeyboardInterrupt:  # Ctrl-C outside the ANP loop (loading, sweeps, training): every file is atomic
        print("anp-fast: interrupted (no output half-written)", file=sys.stderr)
        code = 130
    finally:
        if started:
            import torch.distributed

            torch.distributed.destroy_process_group()
    if started and argv is None:  # a launched process run as a program: every output is written and closed
        from .distributed import exit_now

        exit_now(code)
    return code


def _launch(nproc: int, argv: List[str]) -> int:
    """Run this command line in ``nproc`` processes through torch's elastic launcher (what torchrun
    --standalone does), without --nproc; rank 0 reports."""
    if nproc < 1:
        raise SystemExit(f"anp-fast: error: --nproc {nproc}: must be >= 1")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from .distributed import cores, standalone_launch

    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    if "OMP_NUM_THREADS" not in os.environ:  # the launched processes share this one's cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores() // nproc))
    try:
        standalone_launch(nproc, ["-m", "anp_fast", *rest])
    except ChildFailedError as exc:
        # the first to fail on its own: processes that stopped because another one failed come last (their
        # failure times have a resolution of one second)
        failures = sorted(exc.failures.items(),
                          key=lambda item: (item[1].exitcode == STOPPED_BY_ANOTHER, item[1].timestamp))
        rank, first = failures[0] if failures else ("?", None)
        code = first.exitcode if first is not None else 1
        how = f"killed by signal {-code}" if isinstance(code, int) and code < 0 else f"exit code {code}"
        print(f"anp-fast: error: process {rank} of {nproc} failed first ({how}); the others were stopped; "
              f"a run with --save-every continues from its last saved state with --resume OUT", file=sys.stderr)
        return code if isinstance(code, int) and code > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
