"""The feature cache of a frozen-trunk run: each retained sample's trunk output, computed once.

In the public-backbone mode (`--trainable fc|layer4`) the trunk never changes, so each sample's
features are computed once at creation and every later training or forget reads them here
instead of running ResNet-18 again. They are derived personal data: a deletion request removes
its samples' rows in the very transaction that journals it (`Index.journal_request`), and the
connection runs with `secure_delete`, so SQLite overwrites the freed bytes rather than leaving
them in free pages. Rows live in the index database, keyed by sample id; a row is float32 bytes
of the run's `feature_shape`.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from sqlalchemy import ForeignKey, LargeBinary, func, select
from sqlalchemy.orm import Mapped, mapped_column

from .index import DELETED, Base, Index, Sample


class Feature(Base):
    __tablename__ = "features"
    id: Mapped[str] = mapped_column(ForeignKey("samples.id"), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


def write_features(index: Index, ids: Sequence[str], features: np.ndarray, chunk: int = 4096) -> None:
    """Store float32 `features` (one row per id), in one transaction."""
    rows = np.ascontiguousarray(features, dtype=np.float32).reshape(len(ids), -1)
    with index.transaction() as s:
        for start in range(0, len(ids), chunk):
            s.execute(Feature.__table__.insert(), [{"id": i, "data": rows[j].tobytes()}
                                                    for j, i in enumerate(ids[start:start + chunk], start)])


def read_features(index: Index, ids: Iterable[str], shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(float32 features (len(ids), *shape), int64 labels) in the order of `ids`; a sample
    without a cached row is an error."""
    ids = list(ids)
    found: dict[str, tuple[bytes, int]] = {}
    with index.transaction() as s:
        for start in range(0, len(ids), 30_000):  # below SQLite's bound-parameter limit
            part = ids[start:start + 30_000]
            q = select(Feature.id, Feature.data, Sample.label).join(Sample, Sample.id == Feature.id).where(Feature.id.in_(part))
            found.update((i, (d, y)) for i, d, y in s.execute(q))
    missing = [i for i in ids if i not in found]
    if missing:
        raise LookupError(f"{len(missing)} samples have no cached features, e.g. {missing[0]!r}")
    width = int(np.prod(shape))
    out = np.empty((len(ids), width), dtype=np.float32)
    labels = np.empty(len(ids), dtype=np.int64)
    for j, i in enumerate(ids):
        data, labels[j] = found[i]
        out[j] = np.frombuffer(data, dtype=np.float32, count=width)
    return out.reshape(len(ids), *shape), labels


def deleted_with_features(index: Index, limit: int = 5) -> tuple[int, list[str]]:
    """(how many deleted samples still have cached features, the first few ids): the audit's check."""
    with index.transaction() as s:
        q = select(Feature.id).join(Sample, Sample.id == Feature.id).where(Sample.status == DELETED)
        n = s.execute(select(func.count()).select_from(q.subquery())).scalar_one()
        return n, list(s.scalars(q.limit(limit)))


def copy_features(index: Index, source: Path) -> int:
    """Copy the cached rows of this index's samples from another run's index (`source`), in one
    transaction; returns how many were copied. The caller checks that both runs share a trunk."""
    with index.engine.connect() as conn:  # ATTACH and DETACH must stand outside the transaction
        conn.exec_driver_sql("ATTACH DATABASE ? AS source", (str(source),))
        conn.commit()
        try:
            n = conn.exec_driver_sql("INSERT INTO features (id, data) SELECT f.id, f.data FROM source.features f "
                                     "JOIN samples s ON s.id = f.id").rowcount
            conn.commit()
        finally:
            conn.rollback()
            conn.exec_driver_sql("DETACH DATABASE source")
            conn.commit()
    return n


def count_features(index: Index) -> int:
    with index.transaction() as s:
        return s.execute(select(func.count()).select_from(Feature)).scalar_one()
