"""The acceptance test of exact unlearning: after a forget, the affected shard's states are bitwise
those of training from scratch on its retained samples, and nothing else on disk changed."""
from __future__ import annotations

import pytest

import sisa
from sisa.training import ShardJob, initial_state, run_shard_job
from store.checkpoints import load_checkpoint
from store.index import ACTIVE, Index

from .conftest import file_hashes, state_equal


def samples_by_shard(run_dir):
    index = Index(run_dir / "index.sqlite")
    try:
        run = index.run()
        return {k: index.shard_samples(k) for k in range(run.shards)}
    finally:
        index.close()


def from_scratch(run_dir, shard: int) -> list[dict]:
    """Train `shard` from its initial weights on its retained samples, independently of the run's
    checkpoints: every slice's state, straight from the training function."""
    run = sisa.Run.open(run_dir)
    try:
        cfg, data = run.config, run.dataset()
        row_of = {sid: r for r, sid in enumerate(data.train.ids)}
        ids = [[] for _ in range(cfg.slices)]
        for s in run.index.shard_samples(shard):
            if s.status == ACTIVE:
                ids[s.slice].append(s.id)
        job = ShardJob(shard, 0, [[row_of[x] for x in sl] for sl in ids], ids)
        return [r.state for r in run_shard_job(cfg, job, initial_state(cfg, shard), data.train.images, data.train.labels)]
    finally:
        run.close()


def live_states(run_dir, shard: int) -> list[dict]:
    index = Index(run_dir / "index.sqlite")
    try:
        cks = index.checkpoints()
        n = index.run().slices
        states = [load_checkpoint(run_dir / cks[(shard, i)].path, cks[(shard, i)].sha256) for i in range(n)]
        return [{k: s[k] for k in ("model", "optimizer")} for s in states]  # beside them: the file's "meta"
    finally:
        index.close()


def pick(run_dir, where):
    """Ids chosen by `where(sample, shard_samples)` over all samples."""
    return [s.id for shard in samples_by_shard(run_dir).values() for s in shard if where(s, shard)]


def assert_exact_forget(run_dir, ids=(), owners=()):
    before = file_hashes(run_dir)
    samples = {s.id: s for shard in samples_by_shard(run_dir).values() for s in shard}
    target = set(ids) | {s.id for s in samples.values() if s.owner in set(owners)}
    first = {}
    for sid in target:
        s = samples[sid]
        first[s.shard] = min(first.get(s.shard, 99), s.slice)

    report = sisa.forget(run_dir, ids=ids or None, owners=owners or None)

    assert report.samples_removed == len(target)
    assert sorted(report.shards_retrained) == sorted(first)
    for shard, r in first.items():
        assert report.slices_retrained[shard] == list(range(r, 3))
    after = file_hashes(run_dir)
    for (shard, slc), sha in before.items():
        if shard not in first or slc < first[shard]:
            assert after[(shard, slc)] == sha, f"untouched checkpoint {shard}/{slc} changed"
        else:
            assert after[(shard, slc)] != sha, f"checkpoint {shard}/{slc} was not retrained"
    for shard in first:
        live, scratch = live_states(run_dir, shard), from_scratch(run_dir, shard)
        for slc, (a, b) in enumerate(zip(live, scratch)):
            assert state_equal(a, b), f"shard {shard} slice {slc} differs from training from scratch"
    return report


def test_forget_in_first_slice(trained_run):
    ids = pick(trained_run, lambda s, _: s.shard == 1 and s.slice == 0 and s.position == 3)
    assert_exact_forget(trained_run, ids=ids)


def test_forget_in_middle_slice(trained_run):
    ids = pick(trained_run, lambda s, _: s.shard == 0 and s.slice == 1 and s.position == 0)
    assert_exact_forget(trained_run, ids=ids)


def test_forget_in_last_slice(trained_run):
    ids = pick(trained_run, lambda s, _: s.shard == 2 and s.slice == 2 and s.position == 5)
    assert_exact_forget(trained_run, ids=ids)


def test_forget_very_last_sample_of_a_shard(trained_run):
    """The reference implementation hashed only the first R*floor(n/R) samples of a shard, so a
    shard's tail was never unlearned."""
    ids = pick(trained_run, lambda s, shard: s.id == shard[-1].id and s.shard == 1)
    assert len(ids) == 1
    report = assert_exact_forget(trained_run, ids=ids)
    assert report.slices_retrained == {1: [2]}


def test_forget_several_ids_across_shards(trained_run):
    ids = pick(trained_run, lambda s, _: (s.shard, s.slice, s.position) in {(0, 2, 1), (0, 1, 4), (2, 0, 0), (2, 2, 2)})
    assert len(ids) == 4
    report = assert_exact_forget(trained_run, ids=ids)
    assert report.slices_retrained == {0: [1, 2], 2: [0, 1, 2]}


def test_forget_by_owner(trained_run):
    report = assert_exact_forget(trained_run, owners=["user07"])
    assert report.samples_removed == 240 // 40


def test_forget_twice_then_once_more_is_idempotent(trained_run):
    ids = pick(trained_run, lambda s, _: s.shard == 0 and s.slice == 2 and s.position == 0)
    assert_exact_forget(trained_run, ids=ids)
    before = file_hashes(trained_run)
    report = sisa.forget(trained_run, ids=ids)
    assert (report.samples_removed, report.already_deleted, report.sample_epochs) == (0, 1, 0)
    assert file_hashes(trained_run) == before


def test_training_is_a_function_of_config_and_data(tmp_path, digits_manifest, trained_template):
    """Two independent trainings of the same config give byte-identical checkpoints, and a
    different seed gives different ones (so the equality above is not vacuous)."""
    from .conftest import small_config

    train_csv, _ = digits_manifest
    sisa.train(tmp_path / "again", small_config(train_csv)).close()
    assert file_hashes(tmp_path / "again") == file_hashes(trained_template)
    sisa.train(tmp_path / "other", small_config(train_csv, seed=8, slices=1, shards=1, epochs=1)).close()
    assert set(file_hashes(tmp_path / "other").values()).isdisjoint(file_hashes(trained_template).values())
