"""bf16 autocast with channels_last, and the deterministic flag: both are part of the recipe (the
config hash), both code paths run on the CPU, and a bf16 run forgets exactly like an fp32 one."""
from __future__ import annotations

import json

import pytest
import torch
from sqlalchemy import update
from typer.testing import CliRunner

import sisa
from cli import app
from sisa.audit import audit
from sisa.training import forward, prepare
from store.checkpoints import load_checkpoint, save_checkpoint
from store.index import Checkpoint

from .conftest import small_config


def test_defaults_keep_the_config_hash_and_new_settings_change_it(digits_manifest):
    base = small_config(digits_manifest[0])
    # the hash older runs recorded: fields at their defaults are left out of it
    assert "precision" not in base.training_fields() and "deterministic" not in base.training_fields()
    assert small_config(digits_manifest[0], precision="bf16").config_hash != base.config_hash
    assert small_config(digits_manifest[0], deterministic=True).config_hash != base.config_hash
    with pytest.raises(sisa.UsageError, match="precision"):
        small_config(digits_manifest[0], precision="fp16").validate()


def test_bf16_forward_runs_under_autocast_in_channels_last():
    cfg = sisa.RunConfig(precision="bf16", channels=1, classes=10, width=8)
    seen = {}
    model = prepare(cfg, torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10)))
    model[0].register_forward_hook(lambda m, i, o: seen.update(input=i[0], output=o))
    x = torch.randn(2, 1, 8, 8)
    logits = forward(cfg, model, x)
    assert seen["input"].is_contiguous(memory_format=torch.channels_last)
    assert seen["output"].dtype == torch.bfloat16 and logits.dtype == torch.float32
    fp32 = sisa.RunConfig(channels=1, classes=10)
    assert forward(fp32, model, x).dtype == torch.float32 and not torch.equal(forward(fp32, model, x), logits)


@pytest.fixture(scope="module")
def bf16_template(tmp_path_factory, digits_manifest):
    train_csv, test_csv = digits_manifest
    run_dir = tmp_path_factory.mktemp("bf16") / "run"
    sisa.train(run_dir, small_config(train_csv, precision="bf16", shards=2, slices=2, epochs=6), test_manifest=test_csv).close()
    return run_dir


def test_bf16_run_trains_other_weights_saves_standard_layout_and_forgets_exactly(bf16_template, trained_template, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(bf16_template, run_dir)
    run = sisa.Run.open(run_dir)
    ck = run.index.checkpoints()[(0, 1)]
    state = load_checkpoint(run_dir / ck.path, ck.sha256)
    conv = state["model"]["conv1.weight"]
    assert conv.dtype == torch.float32 and conv.is_contiguous()  # loads anywhere, in any precision
    fp32_run = sisa.Run.open(trained_template)
    fp32_ck = fp32_run.index.checkpoints()[(0, 0)]
    assert not torch.equal(load_checkpoint(trained_template / fp32_ck.path, fp32_ck.sha256)["model"]["conv1.weight"],
                           load_checkpoint(run_dir / run.index.checkpoints()[(0, 0)].path,
                                           run.index.checkpoints()[(0, 0)].sha256)["model"]["conv1.weight"])
    fp32_run.close()
    victim = run.retained(1)[1][1][0]  # shard 1, slice 1: retrain one slice
    run.forget(ids=[victim])
    report = audit(run, retrain=[0, 1])
    assert report.ok, report.failures
    assert sisa.evaluate(run_dir)["ensemble_vote"] > 0.4  # it learned (fp32 with these settings: 73%)
    run.close()


def test_cli_records_precision_and_determinism(digits_manifest, tmp_path):
    train_csv, test_csv = digits_manifest
    run_dir = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--dataset", str(train_csv), "--test-manifest", str(test_csv),
                                   "--shards", "2", "--slices", "1", "--epochs", "1", "--width", "8",
                                   "--deterministic", "--reset-momentum", "--batching", "full", "--run-dir", str(run_dir),
                                   "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    status = json.loads(CliRunner().invoke(app, ["status", "--run-dir", str(run_dir), "--json"]).stdout)
    assert status["config"]["deterministic"] is True and status["config"]["reset_momentum"] is True
    assert status["config"]["batching"] == "full"
    assert status["config"]["precision"] == "fp32"  # auto on a CPU
    assert "resnet18, fp32, deterministic, momentum reset per slice, full batches, seed 0" in CliRunner().invoke(app, ["status", "--run-dir", str(run_dir)]).stdout
    carried = tmp_path / "carried"
    res = CliRunner().invoke(app, ["train", "--dataset", str(train_csv), "--shards", "2", "--slices", "1", "--epochs", "1",
                                   "--width", "8", "--carry-momentum", "--run-dir", str(carried), "--device", "cpu", "--no-eval"])
    assert res.exit_code == 0, res.output
    assert "fp32, momentum carried across slices, seed 0" in CliRunner().invoke(app, ["status", "--run-dir", str(carried)]).stdout
    res = CliRunner().invoke(app, ["train", "--resume", "--precision", "bf16", "--run-dir", str(run_dir)])
    assert res.exit_code == 2 and "--precision bf16 (the run has fp32)" in res.output
    res = CliRunner().invoke(app, ["train", "--resume", "--batching", "split", "--run-dir", str(run_dir)])
    assert res.exit_code == 2 and "--batching split (the run has full)" in res.output
    res = CliRunner().invoke(app, ["train", "--dataset", str(train_csv), "--precision", "fp16",
                                   "--run-dir", str(tmp_path / "other")])
    assert res.exit_code == 2 and "--precision must be one of fp32, bf16" in res.output
    res = CliRunner().invoke(app, ["train", "--dataset", str(train_csv), "--batching", "ragged",
                                   "--run-dir", str(tmp_path / "other")])
    assert res.exit_code == 2 and "--batching must be one of split, full, got 'ragged'" in res.output
    assert not (tmp_path / "other").exists()
    res = CliRunner().invoke(app, ["audit", "--run-dir", str(run_dir), "--retrain", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output


def test_full_batches_train_one_batch_shape_and_forget_exactly(digits_manifest, tmp_path, monkeypatch):
    """--batching full: every training batch of exactly the batch size (what spares a GPU a cuDNN
    plan per new shape), fewer sample-epochs than split by the left-out tails, and exact: a forget
    equals retraining from scratch. Split, on the same data, makes many shapes."""
    import sisa.training

    train_csv, _ = digits_manifest
    seen = []
    plain = sisa.training.forward
    monkeypatch.setattr(sisa.training, "forward", lambda cfg, model, x: seen.append(len(x)) or plain(cfg, model, x))
    runs = {}
    for batching in ("split", "full"):
        seen.clear()
        runs[batching] = sisa.train(tmp_path / batching, small_config(train_csv, shards=2, slices=3, epochs=2,
                                                                       batching=batching))
        runs[batching].shapes = set(seen)
    split, full = runs["split"], runs["full"]
    assert full.shapes == {16} and len(split.shapes) > 3
    assert full.status()["config"]["batching"] == "full"
    ck = {name: run.index.checkpoints()[(0, 2)] for name, run in runs.items()}
    prefix, epochs = sum(len(ids) for ids in full.retained(0)[1]), sisa.slice_epochs(3, 2)[2]
    assert prefix % 16 != 0  # so a tail sits out of every epoch
    assert (ck["split"].sample_epochs, ck["full"].sample_epochs) == (epochs * prefix, epochs * (prefix - prefix % 16))
    full.forget(ids=[full.retained(1)[1][1][0]])  # shard 1, slice 1
    report = audit(full, retrain=[0, 1])
    assert report.ok, report.failures
    for run in runs.values():
        run.close()


def test_momentum_reset_by_default_or_carried_both_forget_exactly(digits_manifest, tmp_path):
    """Zero momentum at each slice step (the default) or momentum carried to the next one (what
    runs made before the default changed did): both exact. A recorded config without the field
    means carried momentum, with the hash such a run always had."""
    train_csv, test_csv = digits_manifest
    lean_cfg = small_config(train_csv, shards=2, slices=3, epochs=2)
    carry_cfg = small_config(train_csv, shards=2, slices=3, epochs=2, reset_momentum=False)
    assert lean_cfg.reset_momentum and "reset_momentum" in lean_cfg.training_fields()
    assert "reset_momentum" not in carry_cfg.training_fields(), "older runs keep their config hash"
    recorded = json.loads(carry_cfg.to_json())
    del recorded["reset_momentum"]
    assert sisa.RunConfig.from_json(json.dumps(recorded)) == carry_cfg
    carry, lean = (sisa.train(tmp_path / name, cfg, test_manifest=test_csv) for name, cfg in
                   (("carry", carry_cfg), ("lean", lean_cfg)))

    def state(run, slc):
        ck = run.index.checkpoints()[(0, slc)]
        return load_checkpoint(run.dir / ck.path, ck.sha256)

    # Slice 0 starts from nothing either way; slice 1 is where carried momentum acts. A shard's
    # last checkpoint holds the weights alone either way: no retrain resumes from it.
    assert state(lean, 0)["optimizer"] is None and state(carry, 0)["optimizer"]["state"]
    assert state(carry, 1)["optimizer"]["state"] and state(carry, 2)["optimizer"] is None
    assert all(torch.equal(v, state(carry, 0)["model"][k]) for k, v in state(lean, 0)["model"].items())
    assert not torch.equal(state(lean, 1)["model"]["conv1.weight"], state(carry, 1)["model"]["conv1.weight"])
    assert (lean.dir / lean.index.checkpoints()[(0, 0)].path).stat().st_size < \
        0.6 * (carry.dir / carry.index.checkpoints()[(0, 0)].path).stat().st_size
    for run in (carry, lean):
        run.forget(ids=[run.retained(0)[1][1][0]])  # shard 0, slice 1: retrained from slice 0's state
        report = audit(run, retrain=[0, 1])
        assert report.ok, report.failures
    lean.close()

    # A run trained while the last slice's momentum was saved too (never read) still audits.
    last = state(carry, 2)
    path, sha = save_checkpoint({**last, "optimizer": state(carry, 1)["optimizer"]}, carry.dir / "checkpoints",
                                "shard000-slice002")
    old = carry.index.checkpoints()[(0, 2)]
    with carry.index.transaction() as s:
        s.execute(update(Checkpoint).where(Checkpoint.shard == 0, Checkpoint.slice == 2)
                  .values(sha256=sha, path=f"checkpoints/{path.name}"))
    (carry.dir / old.path).unlink()
    report = audit(carry, retrain=[0])
    assert report.ok, report.failures
    carry.close()
