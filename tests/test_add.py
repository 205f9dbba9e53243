"""`sisa add`: new samples join exactly. Placement is deterministic, only the shards that received
samples retrain (their last slice), and everything stays what training from scratch would give."""
from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

import sisa
from cli import app
from sisa.audit import audit
from sisa.data import load_digits
from store.features import count_features
from store.index import Index

from .conftest import N_TRAIN, file_hashes, write_manifest

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def new_samples(tmp_path_factory):
    """Five unseen digits (rows the fixtures never use), with new ids."""
    folder = tmp_path_factory.mktemp("new")
    d = load_digits().train
    tail = type(d)(d.ids[N_TRAIN:N_TRAIN + 5], d.images[N_TRAIN:N_TRAIN + 5], d.labels[N_TRAIN:N_TRAIN + 5],
                   [None] * 5)
    return write_manifest(folder, tail, 5, "new", owners=False)


def placements(run_dir):
    index = Index(run_dir / "index.sqlite")
    try:
        return {s.id: (s.shard, s.slice, s.position) for k in range(3) for s in index.shard_samples(k)
                if s.id.startswith("new-")}
    finally:
        index.close()


def test_add_places_new_samples_and_retrains_only_their_last_slices(trained_run, new_samples):
    before = file_hashes(trained_run)
    r = invoke("add", "--dataset", new_samples, "--run-dir", trained_run, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    # 240 samples in 3 shards of 80: the fewest-live rule deals the five round-robin, ties to the lowest
    assert out["samples_added"] == 5 and out["placed"] == {"0": 2, "1": 2, "2": 1}
    # each shard's last slice held positions 0..25 (80 samples cut 27, 27, 26): new ones follow
    assert placements(trained_run) == {"new-0000": (0, 2, 26), "new-0001": (1, 2, 26), "new-0002": (2, 2, 26),
                                       "new-0003": (0, 2, 27), "new-0004": (1, 2, 27)}
    assert out["slices_retrained"] == {"0": [2], "1": [2], "2": [2]}
    after = file_hashes(trained_run)
    assert all(after[(k, i)] == before[(k, i)] for k in range(3) for i in range(2)), "earlier slices untouched"
    run = sisa.Run.open(trained_run)
    try:
        result = audit(run, retrain=[0, 1, 2])  # bitwise: training from scratch includes the new samples
        assert result.ok, result.failures
    finally:
        run.close()
    forget = tmp_path_ids(trained_run, "new-0003")
    f = invoke("forget", "--ids", forget, "--run-dir", trained_run, "--device", "cpu", "--json")
    assert f.exit_code == 0 and json.loads(f.stdout)["slices_retrained"] == {"0": [2]}
    run = sisa.Run.open(trained_run)
    try:
        assert audit(run, retrain=[0]).ok
    finally:
        run.close()


def tmp_path_ids(run_dir, *ids):
    path = run_dir.parent / "ids.csv"
    path.write_text("id\n" + "\n".join(ids) + "\n")
    return path


def test_bad_additions_are_one_line_and_change_nothing(trained_run, new_samples, tmp_path):
    before = file_hashes(trained_run)
    existing = tmp_path / "existing.csv"
    existing.write_text(new_samples.read_text().replace("new-0002,", "train-0002,"))  # the id, not the path
    shutil.copytree(new_samples.parent / "img", tmp_path / "img")
    wrong_label = tmp_path / "label.csv"
    wrong_label.write_text("id,path,label\nx-1,img/new-0000.png,cat\n")
    missing_file = tmp_path / "missing.csv"
    missing_file.write_text("id,path,label\nx-1,img/nope.png,3\n")
    for path, code, match in [(existing, 1, "ids already in the run, e.g. 'train-0002'"),
                              (wrong_label, 1, "unknown label 'cat'"),
                              (missing_file, 1, "image not found"),
                              (tmp_path / "absent.csv", 2, "manifest not found")]:
        r = invoke("add", "--dataset", path, "--run-dir", trained_run, "--device", "cpu")
        assert r.exit_code == code, (path, r.output)
        assert len(r.stderr.strip().splitlines()) == 1 and match in r.stderr, r.stderr
    assert file_hashes(trained_run) == before and placements(trained_run) == {}


def test_add_with_a_frozen_trunk_caches_the_new_features(tmp_path, digits_manifest, new_samples):
    from sisa.backbone import pretrain

    from .conftest import small_config

    backbone = tmp_path / "b.pt"
    pretrain(str(digits_manifest[1]), "data", backbone, epochs=1, batch_size=16, width=16)
    run_dir = tmp_path / "run"
    sisa.train(run_dir, small_config(digits_manifest[0], trainable="fc", crop_pad=0, flip=False),
               init_from=backbone).close()
    run = sisa.Run.open(run_dir)
    try:
        report = run.add(new_samples)
        assert report.samples_added == 5 and count_features(run.index) == 245
        run.forget(ids=["new-0001"])
        assert count_features(run.index) == 244
        result = audit(run, retrain=[0, 1, 2])  # heads bitwise, and the new rows against the trunk
        assert result.ok, result.failures
    finally:
        run.close()
