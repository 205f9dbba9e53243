"""Deterministic partition of the training set into S shards of R slices each.

Samples are shuffled once with a generator derived from the run's seed, dealt round-robin into
shards (so shard sizes differ by at most one), and each shard is cut in order into R contiguous
slices whose sizes also differ by at most one. A sample's (shard, slice, position) never changes
afterwards: deletions only mark samples, so every other sample keeps its place.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from named parts, e.g. derive_seed(seed, "train", shard, slice).

    Each source of randomness gets its own seed from what it is for, never from leftover RNG
    state, so a retrain from slice r draws exactly what training from scratch would draw there.
    """
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class Placement:
    shard: int  # 0-based
    slice: int  # 0-based
    position: int  # order within the slice, which fixes the order ids are hashed in


def partition(n: int, shards: int, slices: int, seed: int) -> list[Placement]:
    """Placement of each of n samples (by row)."""
    import numpy as np

    rng = np.random.default_rng(derive_seed(seed, "partition"))
    order = rng.permutation(n)
    placements: list[Placement | None] = [None] * n
    for shard in range(shards):
        members = order[shard::shards]
        for slc, chunk in enumerate(np.array_split(members, slices)):
            for pos, row in enumerate(chunk):
                placements[int(row)] = Placement(shard, slc, pos)
    return placements  # type: ignore[return-value]


@dataclass
class ShardJob:
    """Train slices `start`..R-1 of `shard`. `slice_rows[i]` are the dataset rows of the
    retained samples of slice i in training order, `slice_ids[i]` their ids."""

    shard: int
    start: int
    slice_rows: list[list[int]]
    slice_ids: list[list[str]]
