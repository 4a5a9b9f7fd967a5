"""Mask files in the published tab-separated format (read by other ANP tools):

    No \\t Layer Name \\t Neuron Idx \\t Mask Score \\n
    0 \\t layer1.0.bn1 \\t 0 \\t 0.9873 \\n
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Dict, Mapping

import torch
from torch import Tensor

from .errors import MaskFileError
from .fileio import atomic_write_text

HEADER = "No \t Layer Name \t Neuron Idx \t Mask Score \n"


def save_masks(masks: Mapping[str, Tensor], path) -> None:
    """Write ``{layer name: 1-D mask}`` in the published format (4 decimals), atomically."""
    lines = [HEADER]
    count = 0
    for name, values in masks.items():
        if any(ch.isspace() for ch in name) or not name:
            raise MaskFileError(f"layer name {name!r} cannot be written: names must be non-empty, no spaces")
        for idx, value in enumerate(torch.as_tensor(values).detach().flatten().tolist()):
            lines.append(f"{count} \t {name} \t {idx} \t {value:.4f} \n")
            count += 1
    atomic_write_text(os.fspath(path), "".join(lines))


def load_masks(path) -> Dict[str, Tensor]:
    """Read a mask file (published format; any whitespace separates fields; header optional) into
    ``{layer name: 1-D float32 mask}``, layers in file order."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise MaskFileError(f"mask file {path} is a directory")
    if not os.path.isfile(path):
        raise MaskFileError(f"mask file {path} does not exist")
    try:
        rows = _read_rows(path)
    except UnicodeDecodeError:
        raise MaskFileError(f"mask file {path} is not text (a checkpoint given as the mask file?)") from None
    if not rows:
        raise MaskFileError(f"mask file {path} holds no mask")
    masks = OrderedDict()
    for name, layer in rows.items():
        n = len(layer)
        if sorted(layer) != list(range(n)):
            missing = sorted(set(range(max(layer) + 1)) - set(layer))[:5]
            raise MaskFileError(f"{path}: layer {name} lacks neuron indices {missing}")
        masks[name] = torch.tensor([layer[i] for i in range(n)], dtype=torch.float32)
    return masks


def _read_rows(path: str) -> "OrderedDict[str, dict]":
    rows: "OrderedDict[str, dict]" = OrderedDict()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if lineno == 1 and fields[0] == "No":
                continue
            if len(fields) != 4:
                raise MaskFileError(f"{path}:{lineno}: expected 4 fields (No, Layer Name, Neuron Idx, "
                                    f"Mask Score), found {len(fields)}")
            _, name, idx, score = fields
            try:
                idx, score = int(idx), float(score)
            except ValueError:
                raise MaskFileError(f"{path}:{lineno}: neuron index must be an integer and score a number, "
                                    f"found {idx!r} and {score!r}") from None
            if not math.isfinite(score):
                raise MaskFileError(f"{path}:{lineno}: the score of neuron {idx} of {name} is {score}, not a "
                                    "finite number")
            layer = rows.setdefault(name, {})
            if idx in layer:
                raise MaskFileError(f"{path}:{lineno}: neuron {idx} of {name} appears twice")
            layer[idx] = score
    return rows
