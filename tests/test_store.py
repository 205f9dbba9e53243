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
