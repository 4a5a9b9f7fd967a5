"""The demo's model trained on clean digits (no poisoning), ANP masks (bf16, 2000 iterations), then the clean
walk: what purifying a clean model costs.

    python benign.py SEEDS WORK '[{OPTIONS}, ...]' OUT.jsonl      (SEEDS e.g. 0,1,2,3,4; models cached in WORK)"""
import json
import os
import sys

import torch
from torch.utils.data import TensorDataset

from anp_fast import ANPConfig, load_masks, optimize_masks, save_masks
from anp_fast.datasets import load_digits
from anp_fast.models import resnet18
from anp_fast.pipeline import Evaluator
from anp_fast.pruning import prune
from anp_fast.selection import walk
from anp_fast.train import train_classifier

seeds, work, variants, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
for seed in [int(s) for s in seeds.split(",")]:
    run = os.path.join(work, f"benign_s{seed}_t{torch.get_num_threads()}")
    os.makedirs(run, exist_ok=True)
    sp = load_digits(seed=seed, holdout_fraction=0.1)  # the demo's splits
    torch.manual_seed(seed)
    model = resnet18(num_classes=10, in_channels=1, width=16)
    if os.path.exists(f"{run}/model.pt"):
        model.load_state_dict(torch.load(f"{run}/model.pt", weights_only=True))
    else:
        train_classifier(model, sp.train.x, sp.train.y, epochs=15, seed=seed, progress=False)
        torch.save(model.state_dict(), f"{run}/model.pt")
    model.eval()
    if not os.path.exists(f"{run}/masks.txt"):
        res = optimize_masks(model, (sp.clean.x, sp.clean.y), ANPConfig(iters=2000, seed=seed, precision="bf16"),
                             progress=False)
        save_masks(res.masks, f"{run}/masks.txt")
    masks = load_masks(f"{run}/masks.txt")
    ev = Evaluator(torch.device("cpu"), TensorDataset(sp.test.x, sp.test.y),
                   TensorDataset(sp.holdout.x, sp.holdout.y), None, None, clean=TensorDataset(sp.clean.x, sp.clean.y))
    before = ev(model)
    for v in variants:
        rule, report = walk(model, masks, ev, **v)
        after = ev(prune(model, masks, **rule))
        row = dict(run=os.path.basename(run), variant=v, pruned=sum(len(i) for i in rule["neurons"].values()),
                   **report, acc=round(100 * before["acc"], 2), drop=round(100 * (before["acc"] - after["acc"]), 2))
        print(json.dumps(row), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
