"""Presets that reproduce other front ends' settings, to compare like with like (``--preset NAME``).

Each value names its source. A preset sets defaults only: a flag given on the command line (or a field given
in Python) wins. The choice of the pruning amount is never copied from a front end that picks it with the
test set's ASR (BackdoorBench): every preset keeps the held-out clean rule (``--prune auto``) unless told
otherwise.
"""
from __future__ import annotations

from typing import Dict

from .errors import ConfigError

ANP_PUBLISHED = "csdongxian/ANP_backdoor optimize_mask_cifar.py argparse"
BB_ANP = "SCLBD/BackdoorBench config/defense/anp/config.yaml (same in cifar10/cifar100/gtsrb/tiny.yaml)"
RNP_PUBLISHED = "bboylyg/RNP main.py argparse"
BB_RNP = "SCLBD/BackdoorBench config/defense/rnp/config.yaml"

# preset -> method -> {setting: (value, source)}. Settings: ANPConfig fields, RNPConfig fields (prefixed rnp_),
# and the pipeline's clean_fraction.
PRESETS: Dict[str, Dict[str, Dict[str, tuple]]] = {
    "published": {
        "anp": {
            "eps": (0.4, f"{ANP_PUBLISHED}: --anp-eps 0.4"),
            "steps": (1, f"{ANP_PUBLISHED}: --anp-steps 1"),
            "alpha": (0.2, f"{ANP_PUBLISHED}: --anp-alpha 0.2"),
            "lr": (0.2, f"{ANP_PUBLISHED}: --lr 0.2"),
            "momentum": (0.9, f"{ANP_PUBLISHED}: SGD(mask_params, lr, momentum=0.9)"),
            "batch_size": (128, f"{ANP_PUBLISHED}: --batch-size 128"),
            "iters": (2000, f"{ANP_PUBLISHED}: --nb-iter 2000"),
            "clean_fraction": (0.01, f"{ANP_PUBLISHED}: --val-frac 0.01"),
        },
        "rnp": {
            "batch_size": (128, f"{RNP_PUBLISHED}: --batch_size 128"),
            "clean_fraction": (0.01, f"{RNP_PUBLISHED}: --ratio 0.01"),
        },
    },
    "backdoorbench": {
        "anp": {
            "eps": (0.4, f"{BB_ANP}: anp_eps 0.4"),
            "steps": (1, f"{BB_ANP}: anp_steps 1"),
            "alpha": (0.2, f"{BB_ANP}: anp_alpha 0.2"),
            "lr": (0.01, f"{BB_ANP}: lr 0.01 (BackdoorBench v1 and the published code: 0.2)"),
            "momentum": (0.9, "SCLBD/BackdoorBench defense/anp.py: SGD(mask_params, lr=args.lr, momentum=0.9)"),
            "batch_size": (256, f"{BB_ANP}: batch_size 256"),
            "iters": (2000, f"{BB_ANP}: nb_iter 2000 (4 x print_every 500 batches drawn with replacement)"),
            "clean_fraction": (0.05, f"{BB_ANP}: ratio 0.05"),
        },
        "rnp": {
            "batch_size": (256, f"{BB_RNP}: batch_size 256"),
            "clean_fraction": (0.01, f"{BB_RNP}: ratio 0.01"),
        },
    },
}


def preset(name: str, method: str) -> Dict[str, object]:
    """``{setting: value}`` of preset ``name`` for ``method``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    values = PRESETS[name].get(method)
    if values is None:
        raise ConfigError(f"preset {name!r} has no settings for method {method!r} (it has: "
                          f"{', '.join(PRESETS[name])})")
    return {k: v for k, (v, _) in values.items()}


def sources(name: str, method: str) -> Dict[str, str]:
    """Where each value of a preset comes from (for reports)."""
    preset(name, method)
    return {k: src for k, (_, src) in PRESETS[name][method].items()}
