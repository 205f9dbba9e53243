"""Decode once: a run made from image files (a CSV manifest or a class-folder tree) keeps its
images as a uint8 array cache in the run directory (store.images), decoded in parallel when the
run is created; every later command and worker opens the cache instead of decoding again.

Decoding: a process pool over every core the process may use, fed chunks of rows. Each worker
reads a file's bytes once (hashing them for the source record, then decoding them, with the very
function a one-file-at-a-time load uses: `sisa.data._decode`) and writes its rows straight into
the memory-mapped temp file, so no pixels cross a pipe. The pixels are bit for bit those of
`load_manifest`/`load_folder`; a bad file stops creation with the same one line (the first bad
row wins, as in a sequential load), and nothing is left behind.

What is checked when (a cache must never silently serve stale pixels, and must stay cheap):
  creation    each source file's size, mtime and sha256 are recorded with the bytes decoded.
  any read    the rows a command reads (a shard job's samples, the test split) have their source
              files stat'ed: a size or mtime unlike the record makes that file be re-hashed, and
              a different sha256 or a missing file stops the command with one line. A stat costs
              microseconds; hashing every file on every command would cost what the cache saves.
              The rows a shard job trains on are also hashed (label and pixels) against the
              index's content hashes, as before the cache, so a cache file edited by hand fails.
  sisa audit  re-hashes every retained sample's source file and cached row, and checks that the
              rows of deleted samples are zeros.
A file changed without its size or mtime changing escapes the per-command stat, not the audit.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from store.checkpoints import file_sha256
from store.images import (ImageCache, SourceRecord, allocate, caches, commit, mark_zeroed, open_rows, sources,
                          split_rows, view, zero_rows)
from store.index import Index

from .data import (BUILTINS, Dataset, Split, _decode, _folder_owners, _size_error, hash_rows, is_folder,
                   list_folder, read_manifest, sample_hash)
from .errors import IntegrityError, SisaError, UsageError

MODES = {1: "L", 3: "RGB"}


def is_file_dataset(name: str) -> bool:
    """Whether a --dataset names image files (a manifest or a folder), which a run caches."""
    return name not in BUILTINS and (str(name).endswith(".csv") or is_folder(name))


def decode_workers() -> int:
    """Every core this process may run on (SISA_DECODE_WORKERS overrides)."""
    env = os.environ.get("SISA_DECODE_WORKERS")
    if env:
        return max(1, int(env))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# --- decoding into a cache file ---------------------------------------------------------------
@dataclass
class _Chunk:
    """Rows start..start+len(files)-1, as plain values a worker process can take."""

    out: str  # the temp .npy to write into
    layout: str
    start: int
    files: list[str]
    labels: list[int]
    names: list[str]  # each row's name for messages: a manifest's path as written, a folder's id
    where: tuple[str, str]  # ("manifest", file name) or ("folder", root): the row's place in messages
    source: str
    mode: str | None  # None: each image's own (L for grayscale modes, else RGB)
    size: tuple[int, int] | None
    hw: tuple[int, int]  # every image must come out this size (the first's, or `size`)
    first: str  # how messages name the first image


@dataclass
class _Done:
    start: int
    files: list[tuple[int, int, str]] = field(default_factory=list)  # (size, mtime_ns, sha256) per row
    hashes: list[str] = field(default_factory=list)  # sample hash of the row as written
    gray_hashes: list[str | None] = field(default_factory=list)  # of a gray row as one channel (mode None)
    colour: bool = False
    gray: bool = False  # some gray image was written as RGB
    error: tuple[int, str] | None = None  # (row, message) of the chunk's first bad row
    pid: int = 0  # the process that decoded it, and the CPU seconds it spent (benchmarks/image_cache.py)
    cpu: float = 0.0


def _where(where: tuple[str, str], row: int) -> str:
    kind, text = where
    return f"{text} line {row + 2}" if kind == "manifest" else f"row {row} of {text}"  # a manifest's header is line 1


def _read(path: str, where: str) -> tuple[bytes, os.stat_result]:
    try:
        with open(path, "rb") as f:
            return f.read(), os.fstat(f.fileno())  # the stat of the very bytes read
    except FileNotFoundError:
        raise SisaError(f"image not found: {path} ({where})") from None
    except IsADirectoryError:
        raise SisaError(f"{path} is a directory, not an image file ({where})") from None
    except OSError as e:
        raise SisaError(f"cannot read image {path} ({where}): {' '.join(str(e).split())}") from None


def _decode_chunk(chunk: _Chunk) -> _Done:
    """Decode a chunk's files into its rows of the memory-mapped output (in a worker process)."""
    cpu = time.process_time()
    raw = np.load(chunk.out, mmap_mode="r+")  # the file's own order: a colour row is one block copy
    out = raw.transpose(0, 3, 1, 2) if chunk.layout == "nhwc" else raw
    done = _Done(chunk.start, pid=os.getpid())
    try:
        for k, (path, label, name) in enumerate(zip(chunk.files, chunk.labels, chunk.names)):
            row = chunk.start + k
            where = _where(chunk.where, row)
            try:
                data, st = _read(path, where)
                arr = _decode(path, chunk.mode, chunk.size, where, data)  # type: ignore[arg-type]  (a str will do)
                if arr.shape[1:] != chunk.hw:
                    raise _size_error(Path(chunk.source), name, arr.shape, chunk.first, (0, *chunk.hw))
            except SisaError as e:
                done.error = (row, str(e))
                return done
            gray = None
            if arr.shape[0] == 1 and out.shape[1] == 3:
                # A folder is RGB if any image is in colour; PIL's L -> RGB copies the gray value into
                # R, G and B, so repeating it is the same. Its one-channel hash serves an all-gray folder.
                gray = sample_hash(label, arr)
                arr = np.repeat(arr, 3, axis=0)
                done.gray = True
            elif arr.shape[0] == 3:
                done.colour = True
            raw[row] = arr.transpose(1, 2, 0) if chunk.layout == "nhwc" else arr
            done.files.append((st.st_size, st.st_mtime_ns, hashlib.sha256(data).hexdigest()))
            h = hashlib.sha256(int(label).to_bytes(4, "little"))  # sample_hash, without its two extra copies
            h.update(np.ascontiguousarray(arr))
            done.hashes.append(h.hexdigest())
            done.gray_hashes.append(gray)
        return done
    finally:
        del out, raw
        done.cpu = time.process_time() - cpu


@dataclass
class DecodedSplit:
    images: np.ndarray  # the committed cache file, memory-mapped (copy-on-write), as (N, C, H, W)
    layout: str
    hashes: list[str]  # sample hash per row
    sources: list[SourceRecord]
    content_sha256: str
    seconds: float
    workers: int
    worker_cpu: dict[int, float] = field(default_factory=dict)  # CPU seconds of each decoding process


def decode_into(folder: Path, split: str, source: Path, kind: str, files: Sequence[str], ids: Sequence[str],
                labels: Sequence[int], names: Sequence[str], channels: int | None, size: tuple[int, int] | None,
                workers: int | None = None, chunk_rows: int | None = None) -> DecodedSplit:
    """Decode `files` (absolute paths) into <folder>/images-<split>.npy (atomically) and return it
    with what the index records. `kind`: "manifest" (the first image decides the channels) or "folder" (RGB if
    any image is in colour); `channels` and `size`, when given, are a training split's."""
    start_time = time.perf_counter()
    workers = workers or decode_workers()
    where = ("manifest", source.name) if kind == "manifest" else ("folder", str(source))
    # The first image, here: it decides the size (without --image-size) and a manifest's channels.
    first = _decode(files[0], MODES.get(channels or 0), size, _where(where, 0))
    mode = MODES.get(channels or 0) or (MODES[first.shape[0]] if kind == "manifest" else None)
    alloc = channels or (first.shape[0] if kind == "manifest" else 3)
    first_name = f"the first ({names[0]})" if kind == "manifest" else names[0]
    n = len(files)
    # Colour images stay in the order Pillow decodes them (see store.images.ImageCache.layout); a
    # folder is stored so until a gray image among colour ones makes it NCHW, as np.stack made it.
    layout = "nhwc" if alloc == 3 else "nchw"
    tmp = allocate(folder, split, (n, alloc, *first.shape[1:]), layout)
    per = chunk_rows or max(16, min(512, -(-n // (workers * 8))))
    chunks = [_Chunk(str(tmp), layout, s, list(files[s:s + per]), list(labels[s:s + per]), list(names[s:s + per]),
                     where, str(source), mode, size, tuple(first.shape[1:]), first_name) for s in range(0, n, per)]
    try:
        if workers == 1 or len(chunks) == 1:
            results = [_decode_chunk(c) for c in chunks]
        else:
            # fork: the workers need no import (torch takes seconds to import); they run only numpy
            # and Pillow (imported here already, by the first image), never torch's threads.
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
            with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=ctx) as pool:
                results = list(pool.map(_decode_chunk, chunks))
        errors = [r.error for r in results if r.error]
        if errors:
            raise SisaError(min(errors)[1])  # the first bad row, as a sequential load reports it
        gray_folder = kind == "folder" and channels is None and not any(r.colour for r in results)
        if gray_folder:  # every image was gray: the folder is one channel, as load_folder makes it
            tmp, layout = _relayout(folder, split, tmp, layout, 1), "nchw"
        elif layout == "nhwc" and any(r.gray for r in results):  # gray and colour mixed
            tmp, layout = _relayout(folder, split, tmp, layout, 3), "nchw"
        hashes = [h for r in results for h in (r.gray_hashes if gray_folder else r.hashes)]
        stats = [s for r in results for s in r.files]
        final = commit(tmp, split)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    records = [SourceRecord(i, int(y), f, sz, mt, sha) for i, y, f, (sz, mt, sha) in zip(ids, labels, files, stats)]
    worker_cpu: dict[int, float] = {}
    for r in results:
        worker_cpu[r.pid] = worker_cpu.get(r.pid, 0.0) + r.cpu
    return DecodedSplit(view(final, layout), layout, hashes, records,
                        hashlib.sha256("".join(hashes).encode()).hexdigest(), time.perf_counter() - start_time, workers,
                        worker_cpu)


def _relayout(folder: Path, split: str, tmp: Path, layout: str, channels: int, rows: int = 4096) -> Path:
    """The temp file rewritten as NCHW with its first `channels` channels (one more pass)."""
    src = view(tmp, layout, "r")
    out = allocate(folder, f"{split}-nchw", (src.shape[0], channels, *src.shape[2:]))
    dst = np.load(out, mmap_mode="r+")
    for s in range(0, len(src), rows):
        dst[s:s + rows] = src[s:s + rows, :channels]
    dst.flush()
    del src, dst
    os.replace(out, tmp)
    return tmp


def decode_dataset(name: str, folder: Path, test: Path | str | None = None, size: tuple[int, int] | None = None,
                   workers: int | None = None, chunk_rows: int | None = None
                   ) -> tuple[Dataset, dict[str, DecodedSplit], dict[str, str]]:
    """A manifest or folder data set (and its test split) decoded into cache files in `folder`:
    (the data set over the cache files, {split: what the index records}, {split: source}).
    `workers`: decoding processes (default: every core); `chunk_rows`: rows per task."""
    size = tuple(size) if size else None
    decoded, sources_of, owners = {}, {}, None
    if name.endswith(".csv"):
        path = Path(name)
        ids, names, labels, owners, classes = read_manifest(path)
        files = _absolute(path.parent, names)
        decoded["train"] = decode_into(folder, "train", path, "manifest", files, ids, labels, names, None, size, workers,
                                       chunk_rows)
    else:
        root = Path(name)
        ids, labels, classes = list_folder(root)
        owners = _folder_owners(root, ids)  # checked before the long part
        files = _absolute(root, ids)
        decoded["train"] = decode_into(folder, "train", root, "folder", files, ids, labels, ids, None, size, workers,
                                       chunk_rows)
    sources_of["train"] = str(Path(name).resolve())
    images = decoded["train"].images
    train = Split(list(ids), torch.from_numpy(images), torch.tensor(labels, dtype=torch.int64), owners)
    test_split = None
    if test:
        test_path = Path(test)
        channels, hw = images.shape[1], tuple(images.shape[2:])  # the test split follows training's
        if test_path.is_dir():
            t_ids, t_labels, _ = list_folder(test_path, classes)
            t_files, t_names, kind = _absolute(test_path, t_ids), t_ids, "folder"
        elif test_path.suffix == ".csv" or test_path.is_file():
            t_ids, t_names, t_labels, _, _ = read_manifest(test_path, classes)
            t_files, kind = _absolute(test_path.parent, t_names), "manifest"
        else:
            raise UsageError(f"test split not found: {test_path}")
        decoded["test"] = decode_into(folder, "test", test_path, kind, t_files, t_ids, t_labels, t_names,
                                      channels, hw, workers, chunk_rows)
        sources_of["test"] = str(test_path.resolve())
        test_split = Split(list(t_ids), torch.from_numpy(decoded["test"].images),
                           torch.tensor(t_labels, dtype=torch.int64), [None] * len(t_ids))
    return Dataset(name, train, test_split, classes), decoded, sources_of


def _absolute(base: Path, names: Sequence[str]) -> list[str]:
    """Each name joined to `base`, made absolute once (the index records absolute paths, which
    later commands may use from anywhere): not resolve() per file, whose lstat calls cost seconds
    at 100,000 files, and a symlink's own path is what the user named."""
    base = os.path.abspath(base)
    return [os.path.join(base, n) for n in names]


# --- opening, checking, zeroing -------------------------------------------------------------------
def open_dataset(run_dir: Path, index: Index, name: str, class_names: Sequence[str]) -> Dataset | None:
    """The data set a run cached at creation, memory-mapped, or None when it has no cache (a
    built-in, or a run made before the cache existed). The test split is checked whole against
    its content hash and its source files' stats; training rows are checked as jobs read them."""
    found = caches(index)
    if "train" not in found:
        return None
    train_cache = found["train"]
    with index.transaction() as s:
        cursor = s.connection().connection.cursor()
        try:
            rows = cursor.execute("SELECT id, label, owner FROM samples WHERE row < ? ORDER BY row",
                                  (train_cache.rows,)).fetchall()
        finally:
            cursor.close()
    train = Split([r[0] for r in rows], torch.from_numpy(_open(run_dir, train_cache)),
                  torch.tensor([r[1] for r in rows], dtype=torch.int64), [r[2] for r in rows])
    test = None
    if "test" in found:
        cache = found["test"]
        ids, labels = split_rows(index, "test")
        test = Split(ids, torch.from_numpy(_open(run_dir, cache)), torch.tensor(labels, dtype=torch.int64),
                     [None] * len(ids))
        if hashlib.sha256("".join(test.sample_hashes()).encode()).hexdigest() != cache.content_sha256:
            raise IntegrityError(f"the run's image cache {Path(run_dir) / cache.file} does not match the content "
                                 "hash recorded when it was made (altered?): recreate the run")
        check_sources(index, "test")
    return Dataset(name, train, test, tuple(class_names))


def _open(run_dir: Path, cache: ImageCache) -> np.ndarray:
    path = Path(run_dir) / cache.file
    try:
        return open_rows(run_dir, cache)
    except FileNotFoundError:
        raise IntegrityError(f"the run's image cache {path} is missing: recreate the run from its data "
                             "(`sisa train --overwrite`)") from None
    except ValueError as e:
        raise IntegrityError(f"the run's image cache {path} is damaged ({e}): recreate the run") from None


def check_sources(index: Index, split: str, rows: Iterable[int] | None = None, full: bool = False) -> None:
    """Stop with one line if the source file of a cached row (of `rows`, or all) is missing or
    changed since it was decoded: a stat per file, a hash only where the stat differs (`full`:
    every file hashed, as the audit does). Deleted samples' rows have no record and are skipped."""
    for _, sid, path, size, mtime, sha in sources(index, split, rows):
        if sha is None:
            continue
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise SisaError(f"image not found: {path} (id {sid!r}; its pixels were cached when the run was created, "
                            "but a source file must stay as it was): restore it, or `sisa forget` the id") from None
        if not full and st.st_size == size and st.st_mtime_ns == mtime:
            continue
        if file_sha256(Path(path)) != sha:
            raise SisaError(f"{path} (id {sid!r}) changed since the run cached its pixels: restore it, or "
                            "`sisa forget` the id (the run trains on what it was created with)")


def find_problems(run_dir: Path, index: Index) -> list[str]:
    """The audit's checks of the cache, each failure one line: deleted samples' rows are zeros,
    every other row matches its content hash, every retained source file hashes as recorded."""
    from store.images import deleted_rows

    problems = []
    for split, cache in caches(index).items():
        try:
            images = _open(run_dir, cache)
        except IntegrityError as e:
            problems.append(str(e))
            continue
        if split == "test":
            _, labels = split_rows(index, "test")
            hashes = hash_rows(images, labels, range(len(labels)))
            if hashlib.sha256("".join(hashes[r] for r in range(len(labels))).encode()).hexdigest() != cache.content_sha256:
                problems.append(f"the image cache {cache.file} does not match its content hash: recreate the run")
            active = None
        else:
            kept = [sid for r, sid in deleted_rows(index) if images[r].any()]
            if kept:
                problems.append(f"the image cache still holds the pixels of {len(kept)} deleted samples, e.g. "
                                f"{kept[0]!r} (`sisa audit --repair` zeroes them)")
            with index.transaction() as s:
                cursor = s.connection().connection.cursor()
                try:
                    active = cursor.execute("SELECT row, id, label, content_sha256 FROM samples WHERE status = 'active' "
                                            "AND row < ? ORDER BY row", (cache.rows,)).fetchall()
                finally:
                    cursor.close()
            labels = {r: y for r, _, y, _ in active}
            hashes = hash_rows(images, labels, labels)
            bad = [sid for r, sid, _, h in active if hashes[r] != h]
            if bad:
                problems.append(f"the image cache's rows of {len(bad)} retained samples differ from their content "
                                f"hashes, e.g. {bad[0]!r}: recreate the run")
        try:
            check_sources(index, split, None if active is None else [r for r, *_ in active], full=True)
        except SisaError as e:
            problems.append(str(e))
    return problems


def zero_deleted(run_dir: Path, index: Index) -> int:
    """Zero every deleted sample's cached row that is not all zeros (`audit --repair`)."""
    from store.images import deleted_rows

    cache = caches(index).get("train")
    if cache is None:
        return 0
    train = open_rows(run_dir, cache)
    dirty = [r for r, _ in deleted_rows(index) if train[r].any()]
    del train
    zero_rows(run_dir, cache, dirty)
    mark_zeroed(index, dirty)
    return len(dirty)
