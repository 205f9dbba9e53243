"""The image cache of a run made from image files: each image decoded once, at creation.

    <run>/images-train.npy   uint8 (N, C, H, W), the training split in the index's row order
    <run>/images-test.npy    the same for the test split, if the run has one

Plain .npy files, opened memory-mapped (numpy's `mmap_mode`), so a data set larger than RAM
works and a shard job reads only the pages of its own rows. The index records each file
(`ImageCache`: shape, content hash, where it was decoded from) and each row's source file
(`ImageRow`: path, size, mtime and sha256 of its bytes), so a command can tell, by a stat per
row it reads, whether a source file changed since its pixels were cached.

The cache is personal data like the images it came from: a deletion clears the row's source
record in the very transaction that journals it (`Index.journal_request`), and its pixels are
then overwritten with zeros in place (`zero_rows`) before any retraining, then marked `zeroed`.
Zeroing is idempotent, so a command killed half way simply zeroes again (`rows_to_zero`).

This module stores; `sisa.imagecache` decides what to decode, check and zero.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Mapped, mapped_column

from .index import DELETED, Base, Index, Sample, utcnow

SPLITS = ("train", "test")


class ImageCache(Base):
    """One cached split: which file, its shape, and what it was decoded from."""

    __tablename__ = "image_caches"
    split: Mapped[str] = mapped_column(primary_key=True)  # train | test
    file: Mapped[str]  # relative to the run directory
    rows: Mapped[int]
    channels: Mapped[int]
    height: Mapped[int]
    width: Mapped[int]
    # sha256 over the rows' content hashes (label and pixels, sisa.data.sample_hash) in row order:
    # the formula of the run's dataset_hash, so any row can be checked alone, without the others
    content_sha256: Mapped[str]
    source: Mapped[str]  # the manifest or folder, absolute
    created_at: Mapped[datetime]
    decode_seconds: Mapped[float]
    workers: Mapped[int]  # decoding processes
    # The bytes' order on disk: "nhwc" for colour images, as Pillow decodes them, else "nchw". It
    # is the memory order a one-by-one load gave the stacked images, and CPU convolutions round
    # differently on the two orders: keeping it keeps training bit for bit what it was before the cache.
    layout: Mapped[str] = mapped_column(default="nchw")


class ImageRow(Base):
    """One cached image: the source file its pixels were decoded from."""

    __tablename__ = "image_rows"
    split: Mapped[str] = mapped_column(primary_key=True)
    row: Mapped[int] = mapped_column(primary_key=True)
    id: Mapped[str] = mapped_column(index=True)
    label: Mapped[int]
    path: Mapped[str]  # absolute
    # The source file when it was decoded; cleared when the sample is deleted (nothing of it stays)
    size: Mapped[int | None]
    mtime_ns: Mapped[int | None]
    sha256: Mapped[str | None]
    zeroed: Mapped[bool] = mapped_column(default=False)  # pixels overwritten with zeros (a deleted sample's)


@dataclass
class SourceRecord:
    """What the decoder saw of one source file."""

    id: str
    label: int
    path: str
    size: int
    mtime_ns: int
    sha256: str


def cache_file(split: str) -> str:
    return f"images-{split}.npy"


def allocate(folder: Path, split: str, shape: Sequence[int], layout: str = "nchw") -> Path:
    """A new, zero-filled temp .npy for images of `shape` (N, C, H, W) stored in `layout`, in
    `folder`, for decoders to fill in place (through `view`)."""
    tmp = Path(folder) / f".{cache_file(split)}.tmp"
    tmp.unlink(missing_ok=True)
    n, c, h, w = shape
    np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, h, w, c) if layout == "nhwc" else (n, c, h, w)).flush()
    return tmp


def view(path: Path, layout: str, mode: str = "c") -> np.ndarray:
    """A cache file memory-mapped (numpy's mmap_mode `mode`) as (N, C, H, W), whatever its layout."""
    arr = np.load(path, mmap_mode=mode, allow_pickle=False)
    return arr.transpose(0, 3, 1, 2) if layout == "nhwc" else arr


def commit(tmp: Path, split: str) -> Path:
    """fsync a filled temp file and rename it into place (then fsync the folder): the cache file
    either exists whole or not at all."""
    final = tmp.with_name(cache_file(split))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def record(index: Index, split: str, shape: Sequence[int], layout: str, content_sha256: str, source: str,
           sources: Sequence[SourceRecord], seconds: float, workers: int, chunk: int = 20_000) -> None:
    """Record a committed cache file and its rows' sources, in one transaction."""
    n, c, h, w = shape
    with index.transaction() as s:
        s.add(ImageCache(split=split, file=cache_file(split), rows=n, channels=c, height=h, width=w,
                         content_sha256=content_sha256, source=source, created_at=utcnow(),
                         decode_seconds=seconds, workers=workers, layout=layout))
        for start in range(0, len(sources), chunk):
            s.execute(ImageRow.__table__.insert(), [
                dict(split=split, row=r, id=x.id, label=x.label, path=x.path, size=x.size, mtime_ns=x.mtime_ns,
                     sha256=x.sha256, zeroed=False)
                for r, x in enumerate(sources[start:start + chunk], start)])


def caches(index: Index) -> dict[str, ImageCache]:
    """The run's cached splits by name (empty for a built-in data set, or a run made before the cache)."""
    with index.transaction() as s:
        return {c.split: c for c in s.scalars(select(ImageCache))}


def open_rows(run_dir: Path, cache: ImageCache, writable: bool = False) -> np.ndarray:
    """The cache file, memory-mapped as (N, C, H, W): copy-on-write for readers (the array is writable, as torch
    wants, but nothing reaches the file), in place for `writable`. FileNotFoundError or
    ValueError when the file is missing or is not the shape the index recorded."""
    arr = view(Path(run_dir) / cache.file, cache.layout, "r+" if writable else "c")
    if arr.dtype != np.uint8 or arr.shape != (cache.rows, cache.channels, cache.height, cache.width):
        raise ValueError(f"{cache.file} is {arr.dtype} {arr.shape}, the index recorded uint8 "
                         f"{(cache.rows, cache.channels, cache.height, cache.width)}")
    return arr


def sources(index: Index, split: str, rows: Iterable[int] | None = None
            ) -> list[tuple[int, str, str, int | None, int | None, str | None]]:
    """(row, id, path, size, mtime_ns, sha256) of the given rows of a split (or all), in row order."""
    sql = "SELECT row, id, path, size, mtime_ns, sha256 FROM image_rows WHERE split = ?"
    with index.transaction() as s:
        cursor = s.connection().connection.cursor()  # plain rows: 100,000 ORM objects cost seconds
        try:
            if rows is None:
                return cursor.execute(sql + " ORDER BY row", (split,)).fetchall()
            rows, out = sorted(rows), []
            for start in range(0, len(rows), 30_000):  # below SQLite's bound-parameter limit
                part = rows[start:start + 30_000]
                out += cursor.execute(sql + f" AND row IN ({', '.join('?' * len(part))}) ORDER BY row",
                                      (split, *part)).fetchall()
            return out
        finally:
            cursor.close()


def split_rows(index: Index, split: str) -> tuple[list[str], list[int]]:
    """(ids, labels) of a cached split, in row order."""
    with index.transaction() as s:
        cursor = s.connection().connection.cursor()
        try:
            rows = cursor.execute("SELECT id, label FROM image_rows WHERE split = ? ORDER BY row", (split,)).fetchall()
        finally:
            cursor.close()
    return [r[0] for r in rows], [r[1] for r in rows]


def rows_to_zero(index: Index) -> list[int]:
    """Training rows of deleted samples whose pixels are not yet known to be zeros.

    Every request runs this as it is journaled (`sisa serve`: every /forget), so it starts from
    the deleted samples, found through the index on request_id (which every deletion sets, and
    which starts at 1), and looks their rows up by id. SQLite's own plan walked every row of the
    cache instead: 0.05 s per request at 50,000 rows. CROSS JOIN keeps the join order."""
    sql = ("SELECT image_rows.row FROM samples CROSS JOIN image_rows ON image_rows.id = samples.id "
           "WHERE samples.request_id > 0 AND samples.status = ? AND image_rows.split = 'train' "
           "AND image_rows.zeroed = 0 ORDER BY image_rows.row")
    with index.transaction() as s:  # the driver's cursor: SQLAlchemy has no CROSS JOIN for SQLite
        cursor = s.connection().connection.cursor()
        try:
            return [r for (r,) in cursor.execute(sql, (DELETED,))]
        finally:
            cursor.close()


def zero_rows(run_dir: Path, cache: ImageCache, rows: Iterable[int]) -> None:
    """Overwrite rows of a cache file with zeros, in place, and make it durable (msync, fsync)."""
    rows = sorted(rows)
    if not rows:
        return
    arr = open_rows(run_dir, cache, writable=True)
    try:
        for r in rows:
            arr[r] = 0
        arr.flush()
    finally:
        del arr
    with open(Path(run_dir) / cache.file, "rb+") as f:
        os.fsync(f.fileno())


def mark_zeroed(index: Index, rows: Iterable[int]) -> None:
    rows = list(rows)
    with index.transaction() as s:
        for start in range(0, len(rows), 30_000):  # below SQLite's bound-parameter limit
            s.execute(update(ImageRow).where(ImageRow.split == "train", ImageRow.row.in_(rows[start:start + 30_000]))
                      .values(zeroed=True))


def deleted_rows(index: Index) -> list[tuple[int, str]]:
    """(row, id) of every deleted sample's cached training row: what the audit reads back."""
    with index.transaction() as s:
        q = (select(ImageRow.row, ImageRow.id).join(Sample, Sample.id == ImageRow.id)
             .where(ImageRow.split == "train", Sample.status == DELETED).order_by(ImageRow.row))
        return [(r, i) for r, i in s.execute(q)]


def count_rows(index: Index, split: str) -> int:
    with index.transaction() as s:
        return s.execute(select(func.count()).select_from(ImageRow).where(ImageRow.split == split)).scalar_one()
