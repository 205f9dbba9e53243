"""Public-backbone mode (issue 10): a frozen trunk from an init weights file, only `layer4` or `fc`
trained per shard on features cached once. Exactness, scrubbing and bad input, for real."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import sisa
from cli import app
from sisa.audit import audit, state_equal
from sisa.backbone import is_trainable, pretrain
from sisa.model import build_model
from store.checkpoints import load_checkpoint
from store.features import count_features
from store.index import Index

from .conftest import file_hashes, small_config

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def backbone(tmp_path_factory, digits_manifest) -> Path:
    """Weights pretrained on the 'public' split (here: the test manifest, disjoint from training)."""
    out = tmp_path_factory.mktemp("public") / "backbone.pt"
    pretrain(str(digits_manifest[1]), "data", out, epochs=2, seed=3, batch_size=16, width=16)
    return out


def frozen_config(manifest, trainable: str, **kw):
    return small_config(manifest, trainable=trainable, crop_pad=0, flip=False, **kw)


@pytest.fixture(scope="module", params=["fc", "layer4"])
def frozen_template(request, tmp_path_factory, digits_manifest, backbone):
    run_dir = tmp_path_factory.mktemp(f"frozen-{request.param}") / "run"
    sisa.train(run_dir, frozen_config(digits_manifest[0], request.param), test_manifest=digits_manifest[1],
               init_from=backbone).close()
    return run_dir


@pytest.fixture
def frozen_run(tmp_path, frozen_template):
    run_dir = tmp_path / "run"
    shutil.copytree(frozen_template, run_dir)
    return run_dir


def sample_in(run_dir, shard: int, slice_: int) -> str:
    index = Index(run_dir / "index.sqlite")
    try:
        return next(s.id for s in index.shard_samples(shard) if s.slice == slice_)
    finally:
        index.close()


def test_forget_with_a_frozen_trunk_equals_training_from_scratch(frozen_run):
    before = file_hashes(frozen_run)
    victim = sample_in(frozen_run, 1, 1)
    report = sisa.forget(frozen_run, ids=[victim])
    assert report.slices_retrained == {1: [1, 2]}
    after = file_hashes(frozen_run)
    assert {k: v for k, v in after.items() if k[0] != 1 or k[1] < 1} == \
           {k: v for k, v in before.items() if k[0] != 1 or k[1] < 1}, "untouched checkpoints did not change"
    run = sisa.Run.open(frozen_run)
    try:
        live = run.index.checkpoints()
        for res in run.train_from_scratch(1):
            ck = live[(1, res.slice)]
            saved = load_checkpoint(frozen_run / ck.path, ck.sha256)
            assert state_equal({k: saved[k] for k in res.state}, res.state), f"slice {res.slice}"
            assert all(is_trainable(k, run.config.trainable) for k in saved["model"]), "only the trained part is stored"
        result = audit(run, retrain=[1])  # bitwise retrain, and the cache against the trunk
        assert result.ok, result.failures
    finally:
        run.close()


def test_checkpoints_hold_only_the_head_and_the_cache_only_retained_samples(frozen_run):
    run = sisa.Run.open(frozen_run)
    try:
        sizes = [(frozen_run / c.path).stat().st_size for c in run.index.checkpoints().values()]
        c = run.config
        full = 8 * sum(p.numel() for p in build_model(c.arch, c.channels, c.classes, c.width).parameters())
        share = 0.01 if c.trainable == "fc" else 0.8  # weights and momentum of the whole network vs the part
        assert max(sizes) < share * full, (sizes, full)
        assert count_features(run.index) == 240
    finally:
        run.close()
    victims = [sample_in(frozen_run, 0, 0), sample_in(frozen_run, 2, 2)]
    sisa.forget(frozen_run, ids=victims)
    index = Index(frozen_run / "index.sqlite")
    try:
        assert count_features(index) == 238
        rows = index.engine.connect().exec_driver_sql(
            "SELECT count(*) FROM features WHERE id IN (?, ?)", tuple(victims)).scalar_one()
        assert rows == 0
    finally:
        index.close()


def test_the_trunk_is_the_init_files_and_identical_in_every_constituent(frozen_run, backbone):
    ens = sisa.Ensemble.load(frozen_run)
    init = torch.load(backbone, weights_only=True)
    trunk = ens.trunk.state_dict()
    assert trunk and all(torch.equal(v, init[k]) for k, v in trunk.items()), "batch-norm statistics never move"
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    assert ens.predict(images).shape == (5,)


def test_sigkill_mid_forget_then_resume_leaves_nothing_of_the_sample(frozen_run):
    victim = sample_in(frozen_run, 0, 1)
    req = frozen_run.parent / "req.csv"
    req.write_text(f"id\n{victim}\n")
    base = [sys.executable, "-m", "cli", "forget", "--run-dir", str(frozen_run), "--device", "cpu"]
    killed = subprocess.run(base + ["--ids", str(req)], env={**os.environ, "SISA_FAULT": "epoch"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    index = Index(frozen_run / "index.sqlite")
    try:
        assert count_features(index) == 239, "scrubbed in the journaling transaction, before any training"
    finally:
        index.close()
    resumed = subprocess.run(base + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    run = sisa.Run.open(frozen_run)
    try:
        assert audit(run).ok
    finally:
        run.close()


def test_an_fc_head_forget_does_not_import_torchvision(frozen_run):
    """Retraining an fc head from a checkpoint builds one Linear, not the network: importing
    torchvision (about 2 s of start-up on the 2-core CPU) would be most of such a forget."""
    req = frozen_run.parent / "req.csv"
    req.write_text(f"id\n{sample_in(frozen_run, 1, 1)}\n")
    code = ("import sys; from typer.testing import CliRunner; from cli import app; "
            "r = CliRunner().invoke(app, sys.argv[1:]); print(r.exit_code, 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, "forget", "--ids", str(req), "--run-dir", str(frozen_run),
                          "--device", "cpu", "--no-eval", "--json"], capture_output=True, text=True, timeout=300)
    run = sisa.Run.open(frozen_run)
    trainable, retrained = run.config.trainable, not run.shard_jobs() and run.index.requests()[-1].status
    run.close()
    assert out.returncode == 0 and retrained == "done", out.stderr
    assert out.stdout.split()[-2:] == ["0", "True" if trainable == "layer4" else "False"], out.stdout + out.stderr


def test_a_request_journaled_while_a_head_job_starts_waits_for_the_next_round(frozen_run, monkeypatch):
    """`sisa serve` journals requests while its writer retrains. One landing after a shard's job
    was planned but before it read its cached features (gone with the deleted sample) failed the
    whole batch and reported its requests failed; now that job waits for the next round."""
    import sisa.executors as executors

    run = sisa.Run.open(frozen_run)
    a, b = [x for ids in run.retained(0)[1] for x in ids][:2]
    run.record_request(ids=[a])
    read = executors.job_features
    journaled = []

    def job_features(run_dir, cfg, job):
        if not journaled:  # a /forget handler, just as the writer's job starts
            other = sisa.Run.open(frozen_run)
            journaled.append(other.record_request(ids=[b]))
            other.close()
        return read(run_dir, cfg, job)

    monkeypatch.setattr(executors, "job_features", job_features)
    first = run.complete()
    assert journaled and 0 not in first.shards_retrained and [j.shard for j in run.shard_jobs()] == [0]
    monkeypatch.setattr(executors, "job_features", read)
    second = run.complete()
    assert second.shards_retrained == [0] and not run.shard_jobs()
    assert len(run.finish_requests()) == 2
    report = audit(run, retrain=[0])
    assert report.ok, report.failures
    run.close()


def test_tampered_init_file_is_caught_by_the_audit(frozen_run):
    init = next(frozen_run.glob("init-*.pt"))
    data = bytearray(init.read_bytes())
    data[-100] ^= 0xFF
    init.write_bytes(bytes(data))
    result = invoke("audit", "--run-dir", frozen_run)
    assert result.exit_code == 1 and "was altered" in result.stdout


@pytest.mark.parametrize("content,code,match", [
    (None, 2, "does not exist"),
    (b"just some notes\n", 1, "is not a weights file"),
    ("list", 1, "does not hold a state dict"),
    ("linear", 1, "does not hold ResNet-18 weights"),
])
def test_wrong_init_files_are_one_line_and_change_nothing(tmp_path, digits_manifest, content, code, match):
    path = tmp_path / "init.pt"
    if content == "list":
        torch.save([1, 2, 3], path)
    elif content == "linear":
        torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    elif content is not None:
        path.write_bytes(content)
    r = invoke("train", "--dataset", digits_manifest[0], "--init-from", path, "--trainable", "fc",
               "--run-dir", tmp_path / "run")
    assert r.exit_code == code, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and match in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_torchvision_weights_give_what_fits_and_the_rest_is_listed(tmp_path, digits_manifest):
    import torchvision

    path = tmp_path / "imagenet-shaped.pt"  # a 7x7 RGB stem and 1000 classes: neither fits 8x8 digits
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), path)
    r = invoke("train", "--dataset", digits_manifest[0], "--init-from", path, "--trainable", "fc", "--shards", 1,
               "--slices", 1, "--epochs", 1, "--device", "cpu", "--run-dir", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert "conv1.weight, fc.weight, fc.bias initialised from the seed" in r.stderr


def test_frozen_trunk_needs_init_weights_and_no_augmentation(tmp_path, digits_manifest):
    r = invoke("train", "--dataset", digits_manifest[0], "--trainable", "fc", "--run-dir", tmp_path / "run")
    assert r.exit_code == 2 and "needs its weights: pass --init-from" in r.stderr
    r = invoke("train", "--dataset", digits_manifest[0], "--trainable", "fc", "--flip", "--run-dir", tmp_path / "run")
    assert r.exit_code == 2 and "takes no augmentation" in r.stderr
    r = invoke("train", "--dataset", digits_manifest[0], "--trainable", "head", "--run-dir", tmp_path / "run")
    assert r.exit_code == 2 and "--trainable must be all, layer4 or fc" in r.stderr


def test_cli_pretrain_train_forget_evaluate_predict(tmp_path, digits_manifest):
    train_csv, test_csv = digits_manifest
    out = tmp_path / "backbone.pt"
    p = invoke("pretrain", "--dataset", test_csv, "--out", out, "--epochs", 1, "--width", 16, "--batch-size", 16,
               "--device", "cpu", "--json")
    assert p.exit_code == 0, p.output
    record = json.loads(p.stdout)
    assert json.loads(out.with_suffix(".json").read_text()) == record and record["samples"] == 60
    run = tmp_path / "run"
    t = invoke("train", "--dataset", train_csv, "--test-manifest", test_csv, "--init-from", out, "--trainable", "fc",
               "--width", 16, "--shards", 4, "--slices", 2, "--epochs", 2, "--device", "cpu", "--run-dir", run)
    assert t.exit_code == 0, t.output
    assert "every tensor taken from the init file" in t.stderr
    ids = tmp_path / "f.csv"
    ids.write_text("id\ntrain-0010\n")
    f = invoke("forget", "--ids", ids, "--run-dir", run, "--device", "cpu", "--json")
    assert f.exit_code == 0 and len(json.loads(f.stdout)["shards_retrained"]) == 1
    ev = json.loads(invoke("evaluate", "--run-dir", run, "--device", "cpu", "--json").stdout)
    assert len(ev["constituents"]) == 4 and 0 <= ev["ensemble_mean"] <= 1
    pred = invoke("predict", train_csv.parent / "img" / "train-0001.png", "--run-dir", run, "--json")
    assert pred.exit_code == 0 and len(json.loads(pred.stdout)["predictions"]) == 1
    st = json.loads(invoke("status", "--run-dir", run, "--json").stdout)
    assert st["config"]["trainable"] == "fc" and st["config"]["init_sha256"] == record["weights_sha256"]
    again = invoke("train", "--resume", "--trainable", "all", "--run-dir", run)
    assert again.exit_code == 2 and "--trainable all (the run has fc)" in again.stderr


def test_a_second_run_copies_the_feature_cache_and_trains_the_same(tmp_path, digits_manifest, backbone, frozen_template):
    cfg = sisa.Run.open(frozen_template).config
    copy = tmp_path / "copy"
    sisa.train(copy, frozen_config(digits_manifest[0], cfg.trainable), test_manifest=digits_manifest[1],
               init_from=backbone, features_from=frozen_template).close()
    assert file_hashes(copy) == file_hashes(frozen_template)
    other = frozen_config(digits_manifest[0], cfg.trainable, seed=8)
    with pytest.raises(sisa.UsageError, match="its trunk differs \\(seed\\)"):
        sisa.Run.create(tmp_path / "no", other, init_from=backbone, features_from=frozen_template)
    assert not (tmp_path / "no").exists()


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the ray extra")
def test_ray_executor_trains_frozen_heads_bitwise_like_local(tmp_path, digits_manifest, backbone):
    cfg = frozen_config(digits_manifest[0], "fc")
    sisa.train(tmp_path / "local", cfg, init_from=backbone).close()
    sisa.train(tmp_path / "ray", cfg, init_from=backbone, executor="ray").close()
    assert file_hashes(tmp_path / "ray") == file_hashes(tmp_path / "local")
