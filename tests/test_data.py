from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from sisa.data import load_dataset, load_digits, load_manifest
from sisa.errors import SisaError, UsageError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def test_digits_split_is_fixed_stratified_and_named():
    d = load_digits()
    assert (len(d.train), len(d.test)) == (1437, 360)
    assert d.train.ids[:2] == ["train-00000", "train-00001"] and d.test.ids[0] == "test-00000"
    assert d.train.images.dtype.is_floating_point is False and d.train.images.shape[1:] == (1, 8, 8)
    assert int(d.train.images.max()) == 255
    counts = np.bincount(d.train.labels.numpy(), minlength=10) / len(d.train)
    test_counts = np.bincount(d.test.labels.numpy(), minlength=10) / len(d.test)
    assert np.abs(counts - test_counts).max() < 0.01
    assert load_digits().train.sample_hashes() == d.train.sample_hashes()


def test_digits_are_what_scikit_learn_loads_and_splits():
    """load_digits reads scikit-learn's file itself and stores the split: both must stay what
    scikit-learn gives, or every digits run's recorded content hashes would stop matching."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    from sisa.data import DIGITS_SPLIT_SEED

    sk = sk_digits()
    rows = np.arange(len(sk.target))
    train_rows, test_rows = train_test_split(rows, test_size=0.2, stratify=sk.target, random_state=DIGITS_SPLIT_SEED)
    images = np.rint(sk.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    d = load_digits()
    for split, chosen in ((d.train, np.sort(train_rows)), (d.test, np.sort(test_rows))):
        before = torch.from_numpy(np.ascontiguousarray(images[chosen]))  # what the loader built before
        assert torch.equal(split.images, before) and split.images.stride() == before.stride(), \
            "same values and memory layout (a CPU convolution's bits depend on the layout)"
        assert np.array_equal(split.labels.numpy(), sk.target[chosen])


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_idx_loader_on_written_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 10, 12)
    for stem in ("train", "t10k"):
        write_idx(raw / f"{stem}-images-idx3-ubyte.gz", x)
        write_idx(raw / f"{stem}-labels-idx1-ubyte.gz", y)
    d = load_dataset("fashion-mnist", tmp_path)
    assert d.train.images.shape == (12, 1, 28, 28)
    assert np.array_equal(d.train.images[:, 0].numpy(), x) and np.array_equal(d.train.labels.numpy(), y)
    assert d.class_names[0] == "T-shirt/top" and d.train.ids[11] == "train-00011"
    # truncated payload
    raw.joinpath("train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 99, 1])))
    with pytest.raises(SisaError, match="truncated"):
        load_dataset("fashion-mnist", tmp_path)


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(SisaError, match="MNIST/raw"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(SisaError, match="--download"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(UsageError, match="unknown dataset"):
        load_dataset("imagenet", tmp_path)


@pytest.mark.skipif(not (SHARED / "MNIST").is_dir(), reason="shared MNIST copy not present")
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_official_files(name):
    d = load_dataset(name, SHARED)
    assert (len(d.train), len(d.test)) == (60000, 10000)
    assert d.train.images.shape[1:] == (1, 28, 28) and d.train.ids[42] == "train-00042"
    assert sorted(set(d.train.labels.tolist())) == list(range(10))


def write_cifar(root: Path, n: int = 6) -> np.ndarray:
    """Batches in the exact CIFAR-10 python format: pickled dicts with bytes keys."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    all_x = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        all_x.append(x)
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
                         b"data": x, b"filenames": [b"x.png"] * n}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in ("airplane automobile bird cat deer dog frog "
                                                            "horse ship truck").split()],
                     b"num_cases_per_batch": n, b"num_vis": 3072}, f)
    return np.concatenate(all_x[:5])


def test_cifar10_loader_on_written_batches(tmp_path):
    x = write_cifar(tmp_path)
    d = load_dataset("cifar10", tmp_path)
    assert d.train.images.shape == (30, 3, 32, 32) and len(d.test) == 6
    assert np.array_equal(d.train.images.reshape(30, -1).numpy(), x), "channel-major rows, as CIFAR stores them"
    assert d.class_names[9] == "truck" and d.train.ids[29] == "train-00029"


def test_manifest_loader(tmp_path, digits_manifest):
    split, classes = load_manifest(digits_manifest[0])
    assert len(split) == 240 and classes == tuple(str(i) for i in range(10))
    assert split.owners[0] == "user00" and split.images.shape == (240, 1, 8, 8)
    bad = tmp_path / "bad.csv"
    bad.write_text("name,file\na,b\n")
    with pytest.raises(SisaError, match="id,path,label"):
        load_manifest(bad)
    missing = tmp_path / "missing.csv"
    missing.write_text("id,path,label\na,nowhere.png,1\n")
    with pytest.raises(SisaError, match="image not found"):
        load_manifest(missing)
