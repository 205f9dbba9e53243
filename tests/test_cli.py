"""The CLI through typer's runner: help everywhere, JSON output, exit codes, one-line errors that
change nothing."""
from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app

from .conftest import file_hashes

runner = CliRunner()
COMMANDS = ["train", "pretrain", "add", "serve", "forget", "predict", "evaluate", "status", "audit", "receipts"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(result, code: int, match: str):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and match in message, message


@pytest.mark.parametrize("command", [None] + COMMANDS)
def test_every_command_has_help(command):
    result = invoke(*([command] if command else []), "--help")
    assert result.exit_code == 0
    assert "Usage" in result.output
    if command:
        assert "--run-dir" in result.output or command in ("predict", "pretrain")


def test_train_status_evaluate_predict_forget(tmp_path, digits_manifest):
    train_csv, test_csv = digits_manifest
    run = tmp_path / "run"
    r = invoke("train", "--dataset", train_csv, "--test-manifest", test_csv, "--shards", 2, "--slices", 2,
               "--epochs", 1, "--batch-size", 32, "--width", 16, "--run-dir", run, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["shards_trained"] == [0, 1]
    assert json.loads(r.stdout)["phase_seconds"]["train"] > 0

    st = json.loads(invoke("status", "--run-dir", run, "--json").stdout)
    assert st["complete"] and st["samples"] == {"active": 240, "deleted": 0} and st["checkpoints"]["live"] == 4

    ev = json.loads(invoke("evaluate", "--run-dir", run, "--device", "cpu", "--json").stdout)
    assert set(ev["constituents"]) == {"0", "1"} and 0 <= ev["ensemble_vote"] <= 1

    img = tmp_path / "seven.png"
    shutil.copy(train_csv.parent / "img" / "train-0000.png", img)
    big = tmp_path / "big.png"
    Image.open(img).resize((32, 32)).save(big)  # resized to the run's 8x8
    pred = json.loads(invoke("predict", img, big, "--aggregation", "mean", "--run-dir", run, "--json").stdout)
    assert [p["file"] for p in pred["predictions"]] == [str(img), str(big)]
    assert all(abs(sum(p["proba"]) - 1) < 1e-4 for p in pred["predictions"])

    ids = tmp_path / "forget.csv"
    ids.write_text("id\r\n train-0003 \r\ntrain-0003\r\n\r\n")  # CRLF, spaces, a duplicate, a blank line
    f = invoke("forget", "--ids", ids, "--run-dir", run, "--device", "cpu", "--json")
    assert f.exit_code == 0, f.output
    rep = json.loads(f.stdout)
    assert rep["samples_removed"] == 1 and len(rep["shards_retrained"]) == 1
    assert 0 < rep["cost_fraction"] < 1
    # where the time went: one shard job's phases, each measured, together within the wall time
    phases = rep["phase_seconds"]
    assert set(phases) == {"prepare", "train", "write_wait"} and phases["train"] > 0
    assert min(phases.values()) >= 0 and sum(phases.values()) <= rep["seconds"]
    st = json.loads(invoke("status", "--run-dir", run, "--json").stdout)
    assert st["samples"]["deleted"] == 1 and st["generation"] == 2 and st["requests"]["unfinished"] == 0

    human = invoke("status", "--run-dir", run)
    assert human.exit_code == 0 and "1 deleted" in human.stdout


@pytest.mark.parametrize("content,code,match", [
    (None, 2, "not found"),
    ("", 1, "empty"),
    ("name\nx\n", 1, "no `id` or `owner` column"),
    ("id\ntrain-0001\nnobody\nghost\n", 1, "2 ids not in the index: 'nobody', 'ghost'"),
    (b"\x89PNG\r\n\x1a\n\0\0\0", 1, "binary"),
    (b"id\n\xff\xfe\xfa\n", 1, "not UTF-8"),
])
def test_bad_forget_requests_change_nothing(trained_run, tmp_path, content, code, match):
    path = tmp_path / "req.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    before = file_hashes(trained_run)
    r = invoke("forget", "--ids", path, "--run-dir", trained_run, "--device", "cpu")
    assert_clean_error(r, code, match)
    assert file_hashes(trained_run) == before
    st = json.loads(invoke("status", "--run-dir", trained_run, "--json").stdout)
    assert st["samples"]["deleted"] == 0 and st["requests"]["total"] == 0


def test_ignore_missing_forgets_the_rest(trained_run, tmp_path):
    path = tmp_path / "req.csv"
    path.write_text("id\ntrain-0001\nghost\n")
    r = invoke("forget", "--ids", path, "--ignore-missing", "--run-dir", trained_run, "--device", "cpu", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["samples_removed"] == 1


def test_train_refuses_existing_run_dir(trained_run, digits_manifest):
    before = file_hashes(trained_run)
    r = invoke("train", "--dataset", digits_manifest[0], "--run-dir", trained_run)
    assert_clean_error(r, 2, "already exists")
    assert file_hashes(trained_run) == before


@pytest.mark.parametrize("args,code,match", [
    (["status", "--run-dir", "nowhere"], 2, "no SISA run"),
    (["forget", "--run-dir", "nowhere"], 2, "--ids"),
    (["train", "--dataset", "mnist", "--data-dir", "nowhere", "--run-dir", "r"], 1, "MNIST/raw"),
    (["train", "--shards", "0", "--run-dir", "r"], 2, "--shards must be at least 1"),
    (["train", "--shards", "400", "--run-dir", "r"], 2, "too few"),
    (["predict", "missing.png", "--run-dir", "nowhere"], 2, "no SISA run"),
])
def test_usage_errors_are_one_line(tmp_path, monkeypatch, args, code, match):
    monkeypatch.chdir(tmp_path)
    assert_clean_error(invoke(*args), code, match)
    assert not (tmp_path / "r").exists()


def test_bad_option_type_is_exit_2():
    assert invoke("train", "--shards", "many").exit_code == 2
