from __future__ import annotations

import collections

import pytest

from sisa.config import RunConfig, slice_epochs
from sisa.errors import UsageError
from sisa.partition import derive_seed, partition


@pytest.mark.parametrize("slices,epochs", [(1, 1), (1, 20), (4, 1), (4, 16), (10, 3), (50, 20), (7, 5)])
def test_slice_epochs_follow_sisa_rule_and_never_starve(slices, epochs):
    per_slice = slice_epochs(slices, epochs)
    assert len(per_slice) == slices
    assert min(per_slice) >= 1, "a slice with zero epochs is never trained (the reference implementation's bug)"
    assert max(per_slice) - min(per_slice) <= 1
    assert per_slice == sorted(per_slice), "the remainder goes to the last slices"
    assert sum(per_slice) == max(slices, round(2 * slices / (slices + 1) * epochs))


def test_partition_is_deterministic_balanced_and_complete():
    n, shards, slices = 1001, 7, 3
    a = partition(n, shards, slices, seed=1)
    assert a == partition(n, shards, slices, seed=1)
    assert a != partition(n, shards, slices, seed=2)
    per_shard = collections.Counter(p.shard for p in a)
    assert sorted(per_shard) == list(range(shards))
    assert max(per_shard.values()) - min(per_shard.values()) <= 1
    for shard in range(shards):
        per_slice = collections.Counter(p.slice for p in a if p.shard == shard)
        assert max(per_slice.values()) - min(per_slice.values()) <= 1
        positions = collections.defaultdict(list)
        for p in a:
            if p.shard == shard:
                positions[p.slice].append(p.position)
        assert all(sorted(v) == list(range(len(v))) for v in positions.values())


def test_derived_seeds_differ_by_purpose():
    assert derive_seed(0, "train", 1, 2) == derive_seed(0, "train", 1, 2)
    assert len({derive_seed(0, "train", 1, 2), derive_seed(0, "train", 2, 1), derive_seed(0, "init", 1),
                derive_seed(1, "train", 1, 2)}) == 4


def test_config_hash_covers_training_fields_only():
    a = RunConfig(dataset="digits", shards=5)
    assert a.config_hash == RunConfig(dataset="other.csv", shards=5).config_hash
    assert a.config_hash != RunConfig(dataset="digits", shards=5, lr=0.1).config_hash
    assert RunConfig.from_json(a.to_json()) == a


@pytest.mark.parametrize("field,value", [("shards", 0), ("slices", 0), ("epochs", 0), ("batch_size", 0), ("lr", 0.0)])
def test_config_rejects_nonsense(field, value):
    with pytest.raises(UsageError):
        RunConfig(**{field: value}).validate()
