"""Datasets: stable string ids, uint8 images (N, C, H, W), integer labels and optional owners.

Built-ins and where they come from:
  digits         scikit-learn's bundled 8x8 digits (offline); a fixed stratified 80/20 split
                 (`DIGITS_SPLIT_SEED`). Pixel values 0..16 are scaled to 0..255.
  mnist          official idx files in torchvision's layout: <data-dir>/MNIST/raw/*.gz
  fashion-mnist  the same for <data-dir>/FashionMNIST/raw/*.gz
  cifar10        torchvision's <data-dir>/cifar-10-batches-py pickles (`download=True` fetches them)
  <file>.csv     a manifest `id,path,label[,owner]` of image files, paths relative to the manifest
  <folder>/      torchvision ImageFolder's layout: <folder>/<class>/<...>/<image>, classes the sorted
                 subfolder names, ids the image paths relative to <folder> (posix); an optional
                 <folder>/owners.csv `id,owner`. Hidden files and folders (".name") are skipped.

Any of them can be resized (`size`, --image-size) at load time with Pillow's BILINEAR filter
(antialiased when shrinking), the filter `predict` uses. Image files are converted to the run's
channels: a manifest's first image decides; a folder is RGB if any of its images is in colour,
else grayscale (alpha is dropped, palettes expanded).

Ids of built-ins are `train-` plus the five-digit, zero-padded row of the training split
(`train-00042`); test samples are `test-NNNNN`. For digits the training split's rows keep
scikit-learn's order.
"""
from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import parse_image_size  # noqa: F401  (re-exported: --image-size)
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
        return [sample_hash(y, row) for y, row in zip(labels, imgs)]


def sample_hash(label: int, pixels: np.ndarray) -> str:
    """sha256 of a label (4 bytes, little-endian) and a uint8 image's bytes: a sample's content hash."""
    return hashlib.sha256(int(label).to_bytes(4, "little") + np.ascontiguousarray(pixels).tobytes()).hexdigest()


def hash_rows(images: np.ndarray, labels, rows, block: int = 1024) -> dict[int, str]:
    """{row: sample_hash} for some rows of (N, C, H, W) images (a memory-mapped cache, in any
    layout): gathered a block at a time into one C-ordered copy, so a memory map's pages are
    read in row order and each hash reads its bytes in place. Blocks go to a thread per core:
    numpy's copy and sha256 both release the GIL."""
    from concurrent.futures import ThreadPoolExecutor

    rows = sorted(rows)

    def run(part: list[int]) -> list[tuple[int, str]]:
        pixels = np.ascontiguousarray(images[part])
        out = []
        for r, px in zip(part, pixels):
            h = hashlib.sha256(int(labels[r]).to_bytes(4, "little"))
            h.update(px)
            out.append((r, h.hexdigest()))
        return out

    parts = [rows[s:s + block] for s in range(0, len(rows), block)]
    if len(parts) <= 1:
        return dict(run(parts[0])) if parts else {}
    with ThreadPoolExecutor(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) as pool:
        return {r: h for done in pool.map(run, parts) for r, h in done}


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
    """scikit-learn's bundled digits, read from the file it ships without importing it (the import
    alone took 0.9 s of every command on a digits run on the 2-core CPU; the read takes 0.08 s).
    The split is the one `train_test_split(rows, test_size=0.2, stratify=labels,
    random_state=DIGITS_SPLIT_SEED)` draws, stored (tests/test_data.py draws it again to check)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise SisaError("the digits data set ships with scikit-learn, which is not installed: pip install scikit-learn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    try:
        data = np.loadtxt(path, delimiter=",")  # 64 pixel values 0..16, then the label, per row
    except OSError as e:
        raise SisaError(f"cannot read scikit-learn's digits file {path}: {e}") from None
    # (1797, 1, 8, 8), built as it always was: the new axis and the row gather give the strides
    # (64, 1, 8, 1), and on the CPU a convolution's bits depend on its input's memory layout
    images = np.rint(data[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)[:, None]
    target = data[:, -1].astype(np.int64)
    test = np.unpackbits(np.frombuffer(base64.b64decode(DIGITS_TEST_ROWS), np.uint8))[: len(target)].astype(bool)
    train_rows, test_rows = np.flatnonzero(~test), np.flatnonzero(test)
    return Dataset("digits", _split("train", images[train_rows], target[train_rows]),
                   _split("test", images[test_rows], target[test_rows]), tuple(str(i) for i in range(10)))


# The rows of the digits test split, one bit per row (np.packbits, base64): the stratified 80/20
# split scikit-learn's train_test_split draws with random_state DIGITS_SPLIT_SEED.
DIGITS_TEST_ROWS = (
    "AAAEiDUkEEAABkEAk0IFABoACAEAJAAoBiwSABAAlAoAkBkSBCD4oAKBEKAACAqIIEQVJElCQKAKAAAAQATYAACBgCAASAXEABBA"
    "CKAQAAVASAAwEAACDsQJAAIkhACDqAE8IKaYCgAAAAsIQAgEoBhIAgJAQcEAgARARoQ3aoECFgBEgABAQqCkGApQAIQLhWHGCBCA"
    "CABMgMAgBAaOAAEIggCBADgIA8AIGQAAEA4BAIQQoCEAMygpBMBEwIBoDgECgwCCAIgipkAsJAQhCKhggJCBoAwCggJCEgE4pBUA")


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


GRAY_MODES = ("L", "1", "I", "I;16")  # read as one channel when the run's channels are not yet known
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's
RESAMPLE = "BILINEAR"  # Pillow's filter for every resize: training data, `add`, `predict`, `serve`


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _decode(path: Path, mode: str | None, size: tuple[int, int] | None, where: str = "",
            data: bytes | None = None) -> np.ndarray:
    """One image file as uint8 (C, H, W) in `mode` (None: L for grayscale modes, else RGB),
    resized to `size` (H, W). Every failure is one SisaError line naming the file and `where`.
    `data`: the file's bytes, already read (the image cache hashes the very bytes it decodes)."""
    from PIL import Image

    where = f" ({where})" if where else ""
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as im:
            im = im.convert(mode or ("L" if im.mode in GRAY_MODES else "RGB"))
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), getattr(Image, RESAMPLE))
            arr = np.array(im, dtype=np.uint8)  # a copy: PIL's buffer is read-only
    except FileNotFoundError:
        raise SisaError(f"image not found: {path}{where}") from None
    except IsADirectoryError:
        raise SisaError(f"{path} is a directory, not an image file{where}") from None
    except Exception as e:  # Pillow's plugins raise OSError, SyntaxError, ValueError, EOFError, zlib and struct errors
        raise SisaError(f"cannot read image {path}{where}: {_one_line(e)}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_image(path: Path, channels: int | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """One image file as uint8 (C, H, W); converted to `channels` and resized to `size` if given."""
    return torch.from_numpy(np.ascontiguousarray(_decode(path, {1: "L", 3: "RGB"}.get(channels or 0), size)))


def _size_error(source: Path, name: str, shape, first: str, first_shape) -> SisaError:
    return SisaError(f"{source}: image {name} is {shape[-2]}x{shape[-1]}, {first} is {first_shape[-2]}x{first_shape[-1]} "
                     "(HxW): pass --image-size N or HxW to resize every image to one size")


def load_manifest(path: Path, class_names: tuple[str, ...] | None = None, channels: int | None = None,
                  size: tuple[int, int] | None = None) -> tuple[Split, tuple[str, ...]]:
    """A CSV `id,path,label[,owner]` of image files. Labels are class names (or integers). With
    `channels` and `size` (a run's), images are converted and resized to them, as `predict` does.
    Decodes in this process, one file after another (a run's cache decodes in parallel:
    sisa.imagecache)."""
    path = Path(path)
    ids, names, labels, owners, class_names = read_manifest(path, class_names)
    images: list[np.ndarray] = []
    for line, name in enumerate(names, start=2):  # the header is line 1
        arr = _decode(path.parent / name, {1: "L", 3: "RGB"}.get(channels or 0), size, f"{path.name} line {line}")
        if not images:
            channels = arr.shape[0]  # the first image decides
        elif arr.shape != images[0].shape:
            raise _size_error(path, name, arr.shape, f"the first ({names[0]})", images[0].shape)
        images.append(arr)
    return Split(ids, torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64), owners), class_names


def read_manifest(path: Path, class_names: tuple[str, ...] | None = None
                  ) -> tuple[list[str], list[str], list[int], list[str | None], tuple[str, ...]]:
    """(ids, image paths as written (relative to the manifest), labels, owners, classes) of a
    manifest, checked; nothing decoded."""
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
    owners = [(r.get("owner") or "").strip() or None for r in rows]
    return ids, [r["path"] for r in rows], [index[s] for s in labels], owners, class_names


def is_folder(name: str | Path) -> bool:
    """Whether a --dataset names a folder data set (not a built-in, not a manifest)."""
    name = str(name)
    return name not in BUILTINS and not name.endswith(".csv") and (name.endswith(("/", os.sep)) or Path(name).is_dir())


def _hidden(name: str) -> bool:
    return name.startswith(".")


def list_folder(root: Path, class_names: tuple[str, ...] | None = None) -> tuple[list[str], list[int], tuple[str, ...]]:
    """(ids, labels, classes) of an ImageFolder tree: classes are the sorted subfolder names (or
    `class_names`, which every subfolder must be one of); ids are image paths relative to `root`,
    posix, class by class in sorted order, each class's files in sorted path order."""
    if not root.is_dir():
        raise UsageError(f"dataset folder not found: {root}")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not _hidden(e.name))
    if not folders:
        raise SisaError(f"{root} has no class subfolders: expected {root}/<class>/<image> "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    if class_names is None:
        class_names = tuple(folders)
    else:
        strange = [f for f in folders if f not in class_names]
        if strange:
            raise SisaError(f"{root}: class folder {strange[0]!r} is not a class of the training data "
                            f"({', '.join(class_names)})")
    ids, labels = [], []
    for label, name in enumerate(class_names):
        if name not in folders:
            continue  # a test folder may lack a class
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = [d for d in dirnames if not _hidden(d)]
            rel = Path(dirpath).relative_to(root)
            found += [(rel / f).as_posix() for f in filenames
                      if not _hidden(f) and f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found and len(class_names) == len(folders):
            raise SisaError(f"{root}: class folder {name!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        ids += sorted(found)
        labels += [label] * len(found)
    if not ids:
        raise SisaError(f"{root} has no images ({', '.join(IMAGE_EXTENSIONS)}) in its class subfolders")
    return ids, labels, class_names


def _folder_owners(root: Path, ids: list[str]) -> list[str | None]:
    """Owners from <root>/owners.csv (`id,owner`), if there is one; ids it lacks have none."""
    path = root / "owners.csv"
    if not path.is_file():
        return [None] * len(ids)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except UnicodeDecodeError:
        raise SisaError(f"{path} is not UTF-8 text") from None
    if not rows or not {"id", "owner"} <= set(header):
        raise SisaError(f"{path}: expected a header with columns id,owner and a row per owned image")
    known, owner_of = set(ids), {}
    for line, r in enumerate(rows, start=2):
        sid, owner = (r["id"] or "").strip(), (r["owner"] or "").strip()
        if sid not in known:
            raise SisaError(f"{path} line {line}: {sid!r} is not an image of {root} (ids are paths like "
                            f"{ids[0]!r})")
        if sid in owner_of:
            raise SisaError(f"{path} line {line}: {sid!r} is listed twice")
        owner_of[sid] = owner or None
    return [owner_of.get(i) for i in ids]


def load_folder(root: Path, class_names: tuple[str, ...] | None = None, size: tuple[int, int] | None = None,
                channels: int | None = None) -> tuple[Split, tuple[str, ...]]:
    """An ImageFolder tree (see `list_folder`) as a Split. Images are RGB if any is in colour (or
    `channels`, a training split's, for a test folder), resized to `size` if given; without it
    they must all have one size. A training folder (no `class_names` given) reads owners.csv."""
    training = class_names is None
    root = Path(root)
    ids, labels, class_names = list_folder(root, class_names)
    images: list[np.ndarray] = []
    for row, sid in enumerate(ids):
        arr = _decode(root / sid, {1: "L", 3: "RGB"}.get(channels or 0), size, f"row {row} of {root}")
        if images and arr.shape[1:] != images[0].shape[1:]:
            raise _size_error(root, sid, arr.shape, ids[0], images[0].shape)
        images.append(arr)
    if channels is None and any(a.shape[0] == 3 for a in images):
        # PIL's L -> RGB copies the gray value into R, G and B: repeating it after the resize is the same
        images = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in images]
    return (Split(ids, torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64),
                  _folder_owners(root, ids) if training else [None] * len(ids)), class_names)


def resize_split(split: Split, size: tuple[int, int]) -> Split:
    """A built-in's images resized to `size` (H, W) with the filter image files get."""
    from PIL import Image

    if tuple(split.images.shape[2:]) == tuple(size):
        return split
    out = []
    for img in split.images.numpy():
        im = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
        arr = np.asarray(im.resize((size[1], size[0]), getattr(Image, RESAMPLE)), dtype=np.uint8)
        out.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    return Split(split.ids, torch.from_numpy(np.stack(out)), split.labels, split.owners)


def load_dataset(name: str, data_dir: Path | str = "data", download: bool = False,
                 test_manifest: Path | str | None = None, size: tuple[int, int] | None = None) -> Dataset:
    """Load a built-in by name, a CSV manifest or a class-folder tree by path; `test_manifest`
    (a manifest or a folder) is the test split of a manifest or folder data set. `size` (H, W):
    resize every image to it."""
    size = tuple(size) if size else None
    if name in BUILTINS:
        data = (load_digits() if name == "digits" else load_cifar10(Path(data_dir), download) if name == "cifar10"
                else load_idx_dataset(name, Path(data_dir)))
        if size is not None:
            data = Dataset(data.name, resize_split(data.train, size),
                           data.test and resize_split(data.test, size), data.class_names)
        return data
    if name.endswith(".csv"):
        train, classes = load_manifest(Path(name), size=size)
    elif is_folder(name):
        train, classes = load_folder(Path(name), size=size)
    elif not Path(name).exists():
        raise UsageError(f"unknown dataset {name!r}: use one of {', '.join(BUILTINS)}, a .csv manifest "
                         "or a folder of class subfolders")
    else:
        raise UsageError(f"{name} is neither a .csv manifest nor a folder of class subfolders")
    test = None
    if test_manifest:
        test_path = Path(test_manifest)
        channels, size = train.images.shape[1], tuple(train.images.shape[2:])  # the test split follows training's
        if test_path.is_dir():
            test = load_folder(test_path, classes, size, channels)[0]
        elif test_path.suffix == ".csv" or test_path.is_file():
            test = load_manifest(test_path, classes, channels, size)[0]
        else:
            raise UsageError(f"test split not found: {test_path}")
    return Dataset(name, train, test, classes)


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
