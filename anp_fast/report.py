"""Reports: before/after tables, JSON summaries, CSV sweeps and PNG plots."""
from __future__ import annotations

import csv
import json
from typing import List, Mapping, Optional, Sequence

import torch

from .fileio import atomic_write, atomic_write_text


def write_json(path: str, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_csv(path: str, rows: Sequence[Mapping]) -> None:
    import io

    buf = io.StringIO()
    if rows:  # every row's columns, in the order first seen; a row without one leaves it empty
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def table(rows: List[List[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: str) -> None:
    """Lay out, write atomically as PNG, close."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"), binary=True)
    finally:
        plt.close(fig)


def plot_masks_and_sweep(path: str, masks: Mapping[str, torch.Tensor], sweep_rows: Sequence[Mapping],
                         chosen: Optional[float] = None, title: str = "ANP") -> None:
    """Two panels: the histogram of all mask values, and ACC/ASR against the pruning threshold."""
    plt = _pyplot()

    values = torch.cat([m.detach().float().flatten().cpu() for m in masks.values()]).numpy()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.hist(values, bins=40, range=(0, 1), color="#4477aa")
    ax1.set_yscale("log")
    ax1.set_xlabel("mask value")
    ax1.set_ylabel("neurons (log scale)")
    ax1.set_title(f"{len(values)} neuron masks")
    if chosen is not None:
        ax1.axvline(chosen, color="k", ls="--", lw=1, label=f"threshold {chosen:g}")
        ax1.legend()
    xs = [r["threshold"] for r in sweep_rows]
    ax2.plot(xs, [100 * r["acc"] for r in sweep_rows], "o-", color="#228833", label="ACC (clean test)")
    if "asr" in sweep_rows[0]:
        ax2.plot(xs, [100 * r["asr"] for r in sweep_rows], "s-", color="#cc3311", label="ASR (triggered test)")
    if chosen is not None:
        ax2.axvline(chosen, color="k", ls="--", lw=1)
    ax2.set_xlabel("pruning threshold (prune masks <= t)")
    ax2.set_ylabel("%")
    ax2.set_ylim(-2, 102)
    ax2.grid(alpha=0.3)
    ax2.legend(loc="center right")
    ax2.set_title("accuracy and attack success vs threshold")
    fig.suptitle(title)
    _save_png(fig, path)


def _layer_group(name: str) -> str:
    """The stage a layer belongs to: its name up to the first index (layer1.0.bn1 -> layer1, features.3 ->
    features), so ResNet stages, VGG blocks and transformer blocks each get one panel."""
    parts = name.split(".")
    head = [parts[0]]
    for p in parts[1:]:
        if p.isdigit():
            break
        head.append(p)
    group = ".".join(head[:2])
    return group if group != name else parts[0]


def plot_mask_histograms(path: str, masks: Mapping[str, torch.Tensor], threshold: Optional[float] = None,
                         title: str = "ANP masks") -> None:
    """One histogram of mask values per layer group (model stage), log counts, the pruning threshold marked."""
    plt = _pyplot()

    groups: dict = {}
    for name, m in masks.items():
        groups.setdefault(_layer_group(name), []).append(m.detach().float().flatten().cpu())
    names = list(groups)
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        values = torch.cat(groups[name]).numpy()
        ax.hist(values, bins=20, range=(0, 1), color="#4477aa")
        ax.set_yscale("log")
        low = int((values <= threshold).sum()) if threshold is not None else None
        ax.set_title(f"{name} ({len(values)}" + (f", {low} <= {threshold:.3g})" if low is not None else ")"),
                     fontsize=9)
        if threshold is not None:
            ax.axvline(threshold, color="k", ls="--", lw=1)
        ax.set_xlabel("mask value (dashed: pruning cut)" if threshold is not None else "mask value", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title)
    _save_png(fig, path)


def plot_pruning_sweep(path: str, rows: Sequence[Mapping], chosen_pruned: Optional[int] = None,
                       chosen_label: str = "", extra: Optional[Mapping] = None, title: str = "pruning sweep") -> None:
    """ACC (test and held-out clean) and ASR (when measured) against the number of pruned neurons over the
    threshold sweep, the chosen amount marked (``extra``: the chosen model's own row, drawn as stars); the
    thresholds label the top axis."""
    plt = _pyplot()

    xs = [r["pruned"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    series = [("acc", "o-", "#228833", "ACC (test)"), ("holdout_acc", "^--", "#66ccee", "ACC (held-out clean)"),
              ("asr", "s-", "#cc3311", "ASR (triggered test)")]
    for key, style, color, label in series:
        if key in rows[0]:
            ax.plot(xs, [100 * r[key] for r in rows], style, color=color, label=label)
            if extra and key in extra:
                ax.plot([extra["pruned"]], [100 * extra[key]], "*", color=color, ms=13, mec="k")
    if chosen_pruned is not None:
        ax.axvline(chosen_pruned, color="k", ls="--", lw=1,
                   label=f"chosen: {chosen_label or chosen_pruned} ({chosen_pruned} pruned)")
    ax.set_xlabel("pruned neurons (lowest masks first)")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if "threshold" in rows[0]:
        top = ax.secondary_xaxis("top")
        ticks = rows[:: max(1, len(rows) // 6)]
        top.set_xticks([r["pruned"] for r in ticks], [f"{r['threshold']:g}" for r in ticks], fontsize=7)
        top.set_xlabel("mask threshold", fontsize=8)
    ax.set_title(title)
    _save_png(fig, path)
