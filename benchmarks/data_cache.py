"""Data time per ANP iteration from an ImageFolder clean set with and without the decoded-image cache
(:mod:`anp_fast.image_cache`), beside the step time of the model, in one process.

A synthetic ImageFolder of real images (scikit-learn's digits scaled up to --px JPEGs) stands for an
ImageNet subset. The clean set (every training image) is decoded once into the cache (timed: a one-off), then
--iters batches of --batch are drawn with replacement, as the loop draws them (DatasetSource, the same seeded
indices), alternately from the JPEGs and from the cache; the engine's step on one such batch is timed too.

    python -m anp_fast_bench.data_cache --images 2000 --batch 32 --iters 5 --model tv_resnet50
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import List, Optional

import numpy as np
import torch


def write_digits_imagefolder(root, train_per_class: int, val_per_class: int, px: int) -> dict:
    """An ImageFolder of real images: scikit-learn's 8x8 digits scaled up to px x px JPEGs (RGB, a different
    contrast per channel; the transposed digit once a class's digits run out), train/<class>/ and
    val/<class>/. Returns the image count per split."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = str(root)
    digits = load_digits()
    images, labels = digits.images / 16.0, digits.target
    count = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(10):
            folder = os.path.join(root, split, str(c))
            os.makedirs(folder, exist_ok=True)
            pool = np.flatnonzero(labels == c)
            for k in range(per_class):
                img = images[pool[(k + (0 if split == "train" else 150)) % len(pool)]]
                if k >= len(pool):
                    img = img.T
                rgb = np.stack([img, img ** 2, 1 - img], axis=-1)
                pil = Image.fromarray((255 * rgb).astype(np.uint8)).resize((px, px), Image.BILINEAR)
                pil.save(os.path.join(folder, f"{k:04d}.jpg"), quality=90)
                count[split] = count.get(split, 0) + 1
    return count


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(images: int, batch: int, iters: int, model_name: str, px: int, workdir: str, log=print) -> dict:
    from anp_fast import ANPConfig, ANPEngine
    from anp_fast.batches import DatasetSource
    from anp_fast.datasets import images_decoded, load_dataset
    from anp_fast.evaluation import Normalized
    from anp_fast.image_cache import cached_images

    from .bench import build_model

    per_class = -(-images // 10)
    t0 = time.perf_counter()
    write_digits_imagefolder(os.path.join(workdir, "folder"), per_class, 1, px)
    log(f"wrote {10 * per_class} JPEGs at {px} px in {time.perf_counter() - t0:.0f} s")
    splits = load_dataset(f"imagefolder:{os.path.join(workdir, 'folder')}")
    train = splits.train
    used = list(range(len(train)))
    rss0 = _rss_mib()
    t0 = time.perf_counter()
    cached = cached_images(train, used, os.path.join(workdir, "cache"))
    build_s = time.perf_counter() - t0
    cache_bytes = os.path.getsize(cached.path)
    log(f"decoded {len(used)} images into the cache ({cache_bytes / 2**20:.0f} MiB) in {build_s:.1f} s")
    mean, std = splits.mean, splits.std
    sources = {"jpeg": DatasetSource(Normalized(train, mean, std), batch, iters, 0),
               "cache": DatasetSource(Normalized(cached, mean, std), batch, iters, 0)}
    iterators = {k: iter(s) for k, s in sources.items()}
    times = {k: [] for k in sources}
    decodes = {k: 0 for k in sources}
    last = None
    for i in range(iters):
        for k in (("jpeg", "cache") if i % 2 == 0 else ("cache", "jpeg")):
            n0 = images_decoded()
            t0 = time.perf_counter()
            x, y = next(iterators[k])
            times[k].append(time.perf_counter() - t0)
            decodes[k] += images_decoded() - n0
            last = (x, y)
    model, _ = build_model(model_name)
    engine = ANPEngine(model, ANPConfig(seed=0, fused_kernels=True))
    x, y = last
    steps = []
    for i in range(3):
        t0 = time.perf_counter()
        engine.step(x, y)
        steps.append(time.perf_counter() - t0)
    step = statistics.median(steps[1:])
    rows = {k: {"data_ms": 1e3 * statistics.median(v), "images_decoded": decodes[k],
                "data_share_of_iteration": statistics.median(v) / (statistics.median(v) + step)}
            for k, v in times.items()}
    return {"images": len(used), "px": px, "batch": batch, "iters": iters, "model": model_name,
            "cache_build_s": build_s, "cache_mib": cache_bytes / 2**20, "step_ms": 1e3 * step, "rows": rows,
            "peak_rss_mib": _rss_mib(), "rss_before_cache_mib": rss0, "threads": torch.get_num_threads()}


def format_table(r: dict) -> str:
    lines = [f"{r['images']} JPEGs at {r['px']} px (224 crop), batch {r['batch']}, {r['iters']} draws each, "
             f"{r['threads']} thread(s); {r['model']} step {r['step_ms']:.0f} ms; cache {r['cache_mib']:.0f} MiB, "
             f"built once in {r['cache_build_s']:.1f} s; peak RSS {r['peak_rss_mib']:.0f} MiB", "",
             "| clean set from | data ms / iteration | JPEGs decoded | data share of an iteration |", "|---|---|---|---|"]
    for k, row in r["rows"].items():
        lines.append(f"| {k} | {row['data_ms']:.1f} | {row['images_decoded']} | "
                     f"{100 * row['data_share_of_iteration']:.1f}% |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anp_fast_bench.data_cache", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--px", type=int, default=224, help="side of the JPEGs written")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--model", default="tv_resnet50")
    p.add_argument("--out", default=None, help="folder for data_cache.json/.md")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.images, args.batch, args.iters, args.model, args.px, tmp,
                     log=lambda s: print(s, file=sys.stderr, flush=True))
    table = format_table(result)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "data_cache.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "data_cache.md"), "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
