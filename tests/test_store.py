from __future__ import annotations

import os

import pytest
import torch

from sisa.errors import IntegrityError
from store.checkpoints import clean_temp, load_checkpoint, save_checkpoint
from store.index import Index, lineage_hash


def test_checkpoint_roundtrip_is_content_addressed(tmp_path):
    state = {"model": {"w": torch.arange(6.0)}, "optimizer": None}
    path, sha = save_checkpoint(state, tmp_path, "shard000-slice000")
    assert path.name == f"shard000-slice000-{sha[:16]}.pt"
    assert torch.equal(load_checkpoint(path, sha)["model"]["w"], state["model"]["w"])
    assert list(tmp_path.glob(".*.tmp")) == [], "no temp file is left behind"


def test_streamed_checkpoint_is_byte_for_byte_torch_save_in_memory(tmp_path):
    import hashlib
    import io

    state = {"model": {"w": torch.randn(300, 70), "b": torch.zeros(3)}, "optimizer": {"state": {0: {"m": torch.ones(5)}}},
             "meta": {"shard": 1, "lineage_sha256": "ab"}}
    buf = io.BytesIO()
    torch.save(state, buf)
    path, sha = save_checkpoint(state, tmp_path, "s")
    assert path.read_bytes() == buf.getvalue() and sha == hashlib.sha256(buf.getvalue()).hexdigest()


def test_corrupt_or_missing_checkpoint_is_refused(tmp_path):
    path, sha = save_checkpoint({"model": {"w": torch.ones(100)}}, tmp_path, "c")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="corrupt"):
        load_checkpoint(path, sha)
    path.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        load_checkpoint(path, sha)


def test_checkpoints_load_without_arbitrary_pickles(tmp_path):
    """weights_only=True: a checkpoint smuggling an object is rejected, even with a matching hash."""
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    path, sha = save_checkpoint({"model": Evil()}, tmp_path, "evil")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(path, sha)


def test_clean_temp_removes_leftovers(tmp_path):
    (tmp_path / ".x.pt.abc.tmp").write_bytes(b"half")
    (tmp_path / "keep.pt").write_bytes(b"k")
    assert clean_temp(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["keep.pt"]


def test_index_uses_wal_on_disk(tmp_path):
    index = Index(tmp_path / "index.sqlite")
    with index.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    index.close()


def test_lineage_hash_is_order_sensitive_and_unambiguous():
    assert lineage_hash(["a", "b"]) != lineage_hash(["b", "a"])
    assert lineage_hash(["ab"]) != lineage_hash(["a", "b"])
    assert lineage_hash([]) == lineage_hash(iter([]))


def test_lineage_hash_keeps_its_recorded_definition():
    """Checkpoints already written carry lineages hashed one id at a time; however it is
    computed, the bytes hashed must stay the ids, each followed by a newline."""
    import hashlib

    ids = ["train-00017", "a", "", "ü-42", "train-1"]
    one_by_one = hashlib.sha256()
    for i in ids:
        one_by_one.update(i.encode() + b"\n")
    assert lineage_hash(ids) == lineage_hash(iter(ids)) == one_by_one.hexdigest()
    assert lineage_hash([]) == hashlib.sha256().hexdigest()


def test_an_index_written_before_new_columns_gets_them_and_keeps_its_rows(tmp_path):
    import sqlite3
    from datetime import datetime

    from sqlalchemy import select

    from store.index import Addition

    path = tmp_path / "index.sqlite"
    old = sqlite3.connect(path)  # the additions table as the first `sisa add` wrote it
    old.execute("CREATE TABLE additions (id INTEGER PRIMARY KEY, created_at DATETIME NOT NULL, "
                "manifest VARCHAR NOT NULL, n_samples INTEGER NOT NULL)")
    old.execute("INSERT INTO additions VALUES (1, '2026-11-25 10:00:00', '/data/new.csv', 3)")
    old.commit()
    old.close()
    index = Index(path)
    try:
        with index.transaction() as s:
            s.add(Addition(created_at=datetime(2026, 11, 26), manifest="/data/more.csv", n_samples=2))
        with index.transaction() as s:
            rows = [(a.id, a.public_id, a.status, a.n_samples) for a in s.scalars(select(Addition).order_by(Addition.id))]
    finally:
        index.close()
    assert rows[0] == (1, None, "done", 3)  # taken in and trained by the `sisa add` that wrote it
    assert rows[1][1].startswith("a-") and rows[1][2:] == ("pending", 2)
    Index(path).close()  # opening again adds nothing twice


def test_an_index_written_with_an_older_index_definition_gets_it_rebuilt(tmp_path):
    """ix_samples_place once held (shard, slice, position) alone; now it covers what planning
    reads, and an older index is rebuilt on open, its rows kept, the plan one index scan."""
    import sqlite3

    path = tmp_path / "index.sqlite"
    Index(path).close()
    conn = sqlite3.connect(path)
    conn.execute("DROP INDEX ix_samples_place")
    conn.execute("CREATE INDEX ix_samples_place ON samples (shard, slice, position)")
    conn.executemany("INSERT INTO samples (id, row, label, shard, slice, position, status) VALUES (?, ?, 0, ?, ?, ?, 'active')",
                     [(f"s{r}", r, r % 2, r % 3, r) for r in range(12)])
    conn.commit()
    conn.close()
    index = Index(path)
    try:
        places = index.retained_places()
        with index.engine.connect() as c:
            columns = [r[2] for r in c.exec_driver_sql("PRAGMA index_info(ix_samples_place)")]
            plan = " ".join(r[3] for r in c.exec_driver_sql(
                "EXPLAIN QUERY PLAN SELECT shard, slice, id, row FROM samples WHERE status = 'active' "
                "ORDER BY shard, slice, position"))
    finally:
        index.close()
    assert columns == ["shard", "slice", "position", "status", "id", "row"]
    assert "COVERING INDEX ix_samples_place" in plan
    assert places == sorted(((r % 2, r % 3, f"s{r}", r) for r in range(12)), key=lambda p: (p[0], p[1], p[3]))
    Index(path).close()  # opening again rebuilds nothing
