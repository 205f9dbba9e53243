from __future__ import annotations

import collections

import pytest

from sisa.config import RunConfig, epoch_batches, slice_epochs, step_sample_epochs
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


@pytest.mark.parametrize("field,value", [("shards", 0), ("slices", 0), ("epochs", 0), ("batch_size", 0), ("lr", 0.0),
                                         ("batching", "drop_last")])
def test_config_rejects_nonsense(field, value):
    with pytest.raises(UsageError):
        RunConfig(**{field: value}).validate()


def test_epoch_batches_split_near_equal_or_full_of_one_shape():
    import torch

    shapes = {"split": set(), "full": set()}
    for n in range(2, 700):
        split, full = epoch_batches(n, 64, "split"), epoch_batches(n, 64, "full")
        # split: every sample once, in the batches torch.tensor_split cuts (what training always used)
        assert sum(split) == n and split == [len(c) for c in torch.tensor_split(torch.arange(n), -(-n // 64))]
        assert max(split) <= 64 and max(split) - min(split) <= 1 and min(split) >= 2
        # full: batches of exactly 64, fewer than 64 samples sitting out; below 64, one batch of all
        assert full == ([64] * (n // 64) if n >= 64 else [n])
        shapes["split"] |= set(split)
        shapes["full"] |= set(full) if n >= 64 else set()
    assert shapes["full"] == {64} and len(shapes["split"]) > 30
    cfg = RunConfig(batch_size=64, batching="full")
    assert step_sample_epochs(cfg, 200, 3) == 3 * 192 and step_sample_epochs(cfg, 1, 3) == 0
    assert step_sample_epochs(RunConfig(batch_size=64), 200, 3) == 600


def test_batching_is_part_of_the_recipe_and_older_runs_keep_their_hash():
    import json

    split, full = RunConfig(dataset="digits"), RunConfig(dataset="digits", batching="full")
    assert "batching" not in split.training_fields() and full.config_hash != split.config_hash
    recorded = json.loads(split.to_json())
    del recorded["batching"]  # a run recorded before the field existed
    assert RunConfig.from_json(json.dumps(recorded)) == split
