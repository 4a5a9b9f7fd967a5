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
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def table(rows: List[List[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_masks_and_sweep(path: str, masks: Mapping[str, torch.Tensor], sweep_rows: Sequence[Mapping],
                         chosen: Optional[float] = None, title: str = "ANP") -> None:
    """Two panels: the histogram of all mask values, and ACC/ASR against the pruning threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"), binary=True)
    finally:
        plt.close(fig)
