"""Datasets: stable string ids, uint8 images (N, C, H, W), integer labels and optional owners.

Built-ins and where they come from:
  digits         scikit-learn's bundled 8x8 digits (offline); a fixed stratified 80/20 split
                 (`DIGITS_SPLIT_SEED`). Pixel values 0..16 are scaled to 0..255.
  mnist          official idx files in torchvision's layout: <data-dir>/MNIST/raw/*.gz
  fashion-mnist  the same for <data-dir>/FashionMNIST/raw/*.gz
  cifar10        torchvision's <data-dir>/cifar-10-batches-py pickles (`download=True` fetches them)
  <file>.csv     a manifest `id,path,label[,owner]` of image files, paths relative to the manifest

Ids of built-ins are `train-` plus the five-digit, zero-padded row of the training split
(`train-00042`); test samples are `test-NNNNN`. For digits the training split's rows keep
scikit-learn's order.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import SisaError, UsageError

DIGITS_SPLIT_SEED = 0
BUILTINS = ("digits", "mnist", "fashion-mnist", "cifar10")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@dataclass
class Split:
    ids: list[str]
    images: torch.Tensor  # uint8, (N, C, H, W)
    labels: torch.Tensor  # int64, (N,)
    owners: list[str | None]

    def __len__(self) -> int:
        return len(self.ids)

    def sample_hashes(self) -> list[str]:
        """sha256 of each sample's label and pixels: the index checks retained data is unchanged."""
        imgs = self.images.reshape(len(self), -1).numpy()
        labels = self.labels.numpy()
        return [hashlib.sha256(int(y).to_bytes(4, "little") + row.tobytes()).hexdigest()
                for y, row in zip(labels, imgs)]


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split | None
    class_names: tuple[str, ...]

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train.images.shape[2:])


def _numbered(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


def _split(prefix: str, images: np.ndarray, labels: np.ndarray) -> Split:
    return Split(_numbered(prefix, len(labels)), torch.from_numpy(np.ascontiguousarray(images)),
                 torch.from_numpy(labels.astype(np.int64)), [None] * len(labels))


def load_digits() -> Dataset:
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    rows = np.arange(len(d.target))
    train_rows, test_rows = train_test_split(rows, test_size=0.2, stratify=d.target,
                                             random_state=DIGITS_SPLIT_SEED)
    train_rows, test_rows = np.sort(train_rows), np.sort(test_rows)
    return Dataset("digits", _split("train", images[train_rows], d.target[train_rows]),
                   _split("test", images[test_rows], d.target[test_rows]),
                   tuple(str(i) for i in range(10)))


def _read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (the MNIST format): magic with dtype code and rank, big-endian dims."""
    if not path.exists():
        raise SisaError(f"missing dataset file {path}")
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as e:
        raise SisaError(f"{path} is not a readable gzip file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise SisaError(f"{path} is not an idx file of unsigned bytes")
    rank = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank)]
    body = np.frombuffer(bytearray(data), dtype=np.uint8, offset=4 + 4 * rank)  # writable for torch
    if body.size != int(np.prod(dims)):
        raise SisaError(f"{path} is truncated: header says {dims}, found {body.size} bytes")
    return body.reshape(dims)


def load_idx_dataset(name: str, data_dir: Path) -> Dataset:
    folder = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name]
    raw = Path(data_dir) / folder / "raw"
    if not raw.is_dir():
        raise SisaError(f"{name} not found: expected the official .gz files in {raw} (set --data-dir)")
    parts = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        images = _read_idx(raw / f"{stem}-images-idx3-ubyte.gz")[:, None]
        labels = _read_idx(raw / f"{stem}-labels-idx1-ubyte.gz")
        if len(images) != len(labels):
            raise SisaError(f"{raw}: {len(images)} {split} images but {len(labels)} labels")
        parts[split] = _split(split, images, labels)
    classes = FASHION_CLASSES if name == "fashion-mnist" else tuple(str(i) for i in range(10))
    return Dataset(name, parts["train"], parts["test"], classes)


def load_cifar10(data_dir: Path, download: bool = False) -> Dataset:
    root = Path(data_dir) / "cifar-10-batches-py"
    if download and not root.is_dir():
        from torchvision.datasets import CIFAR10

        try:
            CIFAR10(str(data_dir), train=True, download=True)
        except Exception as e:  # network errors come in many types; the message is what matters
            raise SisaError(f"could not download CIFAR-10 into {data_dir}: {e}") from None
    if not root.is_dir():
        raise SisaError(f"cifar10 not found: expected {root} (pass --download, or set --data-dir)")

    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        path = root / name
        if not path.exists():
            raise SisaError(f"missing dataset file {path}")
        try:
            with open(path, "rb") as f:
                # Safe here: the files are the dataset's own pickles of plain arrays and lists.
                d = pickle.load(f, encoding="bytes")
            data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            return data, np.asarray(d[b"labels"], dtype=np.int64)
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
            raise SisaError(f"{path} is not a CIFAR-10 batch ({e})") from None

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = batch("test_batch")
    names = tuple(str(i) for i in range(10))
    if (root / "batches.meta").exists():
        with open(root / "batches.meta", "rb") as f:
            meta = pickle.load(f, encoding="bytes")
        names = tuple(n.decode() for n in meta[b"label_names"])
    return Dataset("cifar10", _split("train", np.concatenate([x for x, _ in train]),
                                     np.concatenate([y for _, y in train])),
                   _split("test", test_x, test_y), names)


def read_image(path: Path, channels: int | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """One image file as uint8 (C, H, W); converted to `channels` and resized to `size` if given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = {1: "L", 3: "RGB"}.get(channels or 0) or ("L" if im.mode in ("L", "1", "I", "I;16") else "RGB")
            im = im.convert(mode)
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise SisaError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise SisaError(f"cannot read image {path}: {e}") from None
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())  # PIL's buffer is read-only


def load_manifest(path: Path, class_names: tuple[str, ...] | None = None, channels: int | None = None,
                  size: tuple[int, int] | None = None) -> tuple[Split, tuple[str, ...]]:
    """A CSV `id,path,label[,owner]` of image files. Labels are class names (or integers). With
    `channels` and `size` (a run's), images are converted and resized to them, as `predict` does."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"manifest not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError:
        raise SisaError(f"{path} is not UTF-8 text") from None
    if not rows or not {"id", "path", "label"} <= set(rows[0].keys()):
        raise SisaError(f"{path}: expected a header with columns id,path,label[,owner]")
    ids = [r["id"].strip() for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise SisaError(f"{path}: duplicate id {dup!r}")
    labels = [r["label"].strip() for r in rows]
    if class_names is None:
        uniq = set(labels)
        class_names = (tuple(str(i) for i in range(max(map(int, uniq)) + 1))
                       if all(s.isdigit() for s in uniq) else tuple(sorted(uniq)))
    index = {c: i for i, c in enumerate(class_names)}
    unknown = [s for s in labels if s not in index]
    if unknown:
        raise SisaError(f"{path}: unknown label {unknown[0]!r} (classes: {', '.join(class_names)})")
    first = read_image(path.parent / rows[0]["path"], channels, size)
    images = [first] + [read_image(path.parent / r["path"], first.shape[0], size) for r in rows[1:]]
    for r, im in zip(rows, images):
        if im.shape != first.shape:
            raise SisaError(f"{path}: image {r['path']} is {tuple(im.shape)}, expected {tuple(first.shape)}")
    owners = [(r.get("owner") or "").strip() or None for r in rows]
    return Split(ids, torch.stack(images), torch.tensor([index[s] for s in labels]), owners), class_names


def load_dataset(name: str, data_dir: Path | str = "data", download: bool = False,
                 test_manifest: Path | str | None = None) -> Dataset:
    """Load a built-in by name, or a CSV manifest by path."""
    if name == "digits":
        return load_digits()
    if name in ("mnist", "fashion-mnist"):
        return load_idx_dataset(name, Path(data_dir))
    if name == "cifar10":
        return load_cifar10(Path(data_dir), download)
    if name.endswith(".csv"):
        train, classes = load_manifest(Path(name))
        test = load_manifest(Path(test_manifest), classes)[0] if test_manifest else None
        return Dataset(name, train, test, classes)
    raise UsageError(f"unknown dataset {name!r}: use one of {', '.join(BUILTINS)} or a .csv manifest")


def with_additions(data: Dataset, manifests: list[str] | tuple[str, ...]) -> Dataset:
    """`data` with the samples `sisa add` took in appended to its training split, in the order
    they were added, converted and resized to its images' channels and size."""
    if not manifests:
        return data
    parts = [data.train] + [load_manifest(Path(m), data.class_names, data.channels, data.image_size)[0]
                            for m in manifests]
    train = Split([i for p in parts for i in p.ids], torch.cat([p.images for p in parts]),
                  torch.cat([p.labels for p in parts]), [o for p in parts for o in p.owners])
    return Dataset(data.name, train, data.test, data.class_names)
