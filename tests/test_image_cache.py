"""The decoded-image cache of ImageFolder clean sets (anp_fast.image_cache): decoded once, exact, never read
from the JPEGs again, keyed on the files, atomic."""
import os

import numpy as np
import pytest
import torch

from anp_fast import datasets
from anp_fast.datasets import images_decoded, load_dataset
from anp_fast.errors import DataError
from anp_fast.image_cache import cache_key, cached_images


def _write_folder(root, train_per_class, val_per_class, px):
    from anp_fast_bench.data_cache import write_digits_imagefolder

    return write_digits_imagefolder(root, train_per_class, val_per_class, px)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    count = _write_folder(root, 200, 2, 224)
    assert count["train"] >= 2000
    return root


def test_a_clean_set_of_2000_jpegs_is_decoded_once_and_never_again(jpeg_folder, tmp_path):
    from anp_fast.batches import DatasetSource
    from anp_fast.evaluation import Normalized

    train = load_dataset(f"imagefolder:{jpeg_folder}").train
    assert train.size == 224 and len(train) >= 2000
    used = list(range(len(train)))
    start = images_decoded()
    cached = cached_images(train, used, str(tmp_path / "cache"))
    assert images_decoded() - start == len(used)  # each JPEG decoded exactly once
    for i in (0, 777, len(train) - 1):  # the cached image is the decoded one, bit for bit
        x, y = cached[i]
        ref, ref_y = train[i]
        assert torch.equal(x, ref) and y == ref_y

    # a second run: new objects, same files; 20 batches of 32 drawn with replacement read no JPEG
    again = load_dataset(f"imagefolder:{jpeg_folder}").train
    start = images_decoded()
    second = cached_images(again, used, str(tmp_path / "cache"))
    source = DatasetSource(Normalized(second, (0.5,) * 3, (0.5,) * 3), 32, 20, 0)
    batches = [x for x, _ in source]
    assert len(batches) == 20 and batches[0].shape == (32, 3, 224, 224)
    assert images_decoded() == start
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_the_key_follows_the_files_and_the_selection(jpeg_folder):
    train = load_dataset(f"imagefolder:{jpeg_folder}:32").train
    key = cache_key(train, [0, 1, 2])
    assert cache_key(train, [0, 1, 3]) != key  # another selection
    assert cache_key(load_dataset(f"imagefolder:{jpeg_folder}:64").train, [0, 1, 2]) != key  # another crop
    path = train.samples[1][0]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    try:
        assert cache_key(train, [0, 1, 2]) != key  # a changed file
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache_key(train, [0, 1, 2]) == key


def test_an_interrupted_build_leaves_no_cache(jpeg_folder, tmp_path, monkeypatch):
    train = load_dataset(f"imagefolder:{jpeg_folder}:16").train
    real, calls = datasets.decode_image, [0]

    def failing(*args):
        calls[0] += 1
        if calls[0] == 100:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(datasets, "decode_image", failing)
    with pytest.raises(KeyboardInterrupt):
        cached_images(train, range(300), str(tmp_path))
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(datasets, "decode_image", real)
    assert cached_images(train, range(300), str(tmp_path))[5][1] == train[5][1]


def test_not_enough_disk_space_is_one_clear_error(jpeg_folder, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 1 << 20))
    train = load_dataset(f"imagefolder:{jpeg_folder}").train
    with pytest.raises(DataError, match="needs 2.9 MiB in .* which has 1.0 MiB free: .* --no-image-cache"):
        cached_images(train, range(20), str(tmp_path))


def test_purify_reads_the_clean_images_from_the_cache_with_the_same_masks(tmp_path, monkeypatch):
    """Two purify runs on an ImageFolder: the first decodes each clean and held-out image once, the second
    decodes none of them; both give the masks of a run without the cache."""
    from anp_fast import ANPConfig, load_masks
    from anp_fast.checkpoint import save_checkpoint
    from anp_fast.commands import run_purify
    from anp_fast.models import resnet18

    _write_folder(tmp_path / "data", 12, 3, 40)
    torch.manual_seed(0)
    save_checkpoint(resnet18(num_classes=10, in_channels=3, width=4), tmp_path / "model")
    decoded = []
    real = datasets.decode_image

    def counting(path, *args):
        decoded.append(path)
        return real(path, *args)

    monkeypatch.setattr(datasets, "decode_image", counting)

    def purify(out, cache):
        decoded.clear()
        run_purify(arch="resnet18", arch_args={"width": 4}, checkpoint=str(tmp_path / "model.safetensors"),
                   data=f"imagefolder:{tmp_path / 'data'}:32", out=str(tmp_path / out),
                   config=ANPConfig(iters=3, batch_size=16), clean_count=60, holdout_fraction=0.5,
                   prune_rule="threshold:0.2", image_cache=cache, force=True, progress=False, log=lambda *a: None)
        train = [p for p in decoded if f"{os.sep}train{os.sep}" in p]
        return train, load_masks(str(tmp_path / out / "masks.txt"))

    cache = str(tmp_path / "cache")
    first, masks = purify("one", cache)
    assert len(first) == len(set(first)) == 60  # the 30 clean and 30 held-out images, once each
    second, again = purify("two", cache)
    assert second == []
    plain, uncached = purify("plain", False)
    assert len(plain) > 60  # without the cache every draw decodes
    for name in masks:
        assert torch.equal(masks[name], again[name]) and torch.equal(masks[name], uncached[name])
