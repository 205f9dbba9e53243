"""What a new user met in a first afternoon (issue 9), each as it is met: through the CLI."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import sisa
from cli import app
from sisa.audit import audit

from .conftest import file_hashes, small_config

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code: int, match: str) -> None:
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and match in message, message


def template_options(digits_manifest) -> list:
    """`sisa train` options that build exactly the conftest template run."""
    train_csv, test_csv = digits_manifest
    cfg = small_config(train_csv)
    return ["--dataset", train_csv, "--test-manifest", test_csv, "--shards", cfg.shards, "--slices", cfg.slices,
            "--epochs", cfg.epochs, "--batch-size", cfg.batch_size, "--lr", cfg.lr, "--crop-pad", cfg.crop_pad,
            "--no-flip", "--seed", cfg.seed, "--width", cfg.width]


# --- 1, 2: --overwrite never destroys what is not a run ------------------------------------
@pytest.mark.parametrize("overwrite", [True, False])
def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, digits_manifest, overwrite):
    mine = tmp_path / "mystuff"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    r = invoke("train", "--dataset", digits_manifest[0], "--run-dir", mine, *(["--overwrite"] if overwrite else []))
    one_line_error(r, 2, "is not a SISA run")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "my notes"
    with pytest.raises(sisa.UsageError, match="is not a SISA run"):
        sisa.Run.create(mine, small_config(digits_manifest[0]), overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "nothing built beside it"


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_regular_file_as_run_dir_is_one_line_and_untouched(tmp_path, digits_manifest, overwrite):
    afile = tmp_path / "afile.txt"
    afile.write_text("keep me")
    r = invoke("train", "--dataset", digits_manifest[0], "--run-dir", afile, *(["--overwrite"] if overwrite else []))
    one_line_error(r, 2, "is a file, not a run directory")
    assert afile.read_text() == "keep me"
    inside = invoke("train", "--dataset", digits_manifest[0], "--run-dir", afile / "run")
    one_line_error(inside, 2, "is not a directory")


def test_overwrite_replaces_an_empty_folder_and_an_existing_run(tmp_path, digits_manifest):
    empty = tmp_path / "empty"
    empty.mkdir()
    tiny = ["--dataset", digits_manifest[0], "--shards", 1, "--slices", 1, "--epochs", 1, "--batch-size", 64, "--width", 8,
            "--device", "cpu", "--run-dir", empty]
    one_line_error(invoke("train", *tiny), 2, "already exists (pass --overwrite to replace it)")
    assert invoke("train", *tiny, "--overwrite").exit_code == 0
    again = invoke("train", *tiny)
    one_line_error(again, 2, "or --resume to finish training it")
    assert invoke("train", *tiny, "--overwrite").exit_code == 0


# --- 3, 6: an interrupted training resumes where it stopped, and the audit says so ---------
def test_resume_reuses_the_checkpoints_an_interrupted_train_wrote(tmp_path, digits_manifest, trained_template):
    run_dir = tmp_path / "run"
    env = {**os.environ, "SISA_FAULT": "checkpoint-saved", "SISA_FAULT_AT": "2"}  # shard 0's slices 0, 1 written
    killed = subprocess.run([sys.executable, "-m", "cli", "train", *map(str, template_options(digits_manifest)),
                             "--run-dir", str(run_dir), "--device", "cpu"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert len(list((run_dir / "checkpoints").glob("shard000-*.pt"))) == 2

    run = sisa.Run.open(run_dir)
    try:
        report = audit(run)
    finally:
        run.close()
    assert not report.ok
    assert not [f for f in report.failures if "stray" in f], report.failures
    assert len(report.failures) == 1 and "the run is unfinished" in report.failures[0]
    assert "`sisa train --resume`, which reuses the 2 checkpoint files" in report.failures[0]
    status = invoke("status", "--run-dir", run_dir)
    assert "run `sisa train --resume`" in status.stdout

    resumed = invoke("train", "--resume", "--run-dir", run_dir, "--device", "cpu", "--json")
    assert resumed.exit_code == 0, resumed.output
    out = json.loads(resumed.stdout)
    assert out["slices_reused"] == {"0": [0, 1]}
    assert out["slices_trained"] == {"0": [2], "1": [0, 1, 2], "2": [0, 1, 2]}, "only what was not finished"
    assert file_hashes(run_dir) == file_hashes(trained_template), "bitwise what an uninterrupted train wrote"
    run = sisa.Run.open(run_dir)
    try:
        assert audit(run).ok
    finally:
        run.close()


def test_resume_refuses_options_that_contradict_the_run(trained_run, digits_manifest):
    before = file_hashes(trained_run)
    r = invoke("train", "--resume", "--shards", 5, "--lr", 0.05, "--run-dir", trained_run)
    one_line_error(r, 2, "drop --shards 5 (the run has 3)")
    assert "--lr" not in r.stderr, "an option that agrees with the run is fine"
    one_line_error(invoke("train", "--resume", "--overwrite", "--run-dir", trained_run), 2, "pass one of them")
    one_line_error(invoke("train", "--resume", "--dataset", "digits", "--run-dir", trained_run), 2, "--dataset digits")
    assert file_hashes(trained_run) == before
    ok = invoke("train", "--resume", *template_options(digits_manifest), "--run-dir", trained_run, "--device", "cpu")
    assert ok.exit_code == 0, ok.output


# --- 5: long runs say what they do --------------------------------------------------------
def test_training_reports_loading_images_rate_and_time_left(tmp_path, digits_manifest, monkeypatch):
    import io

    from rich.console import Console

    import cli

    terminal = io.StringIO()  # what a user at a terminal sees on stderr, control codes included
    monkeypatch.setattr(cli, "err", Console(file=terminal, force_terminal=True, width=120))
    r = invoke("train", "--dataset", digits_manifest[0], "--shards", 1, "--slices", 2, "--epochs", 1, "--width", 8,
               "--batch-size", 64, "--device", "cpu", "--run-dir", tmp_path / "run")
    assert r.exit_code == 0, r.output
    seen = terminal.getvalue()
    # a manifest's images are decoded once, into the run's cache, while the run is created
    assert f"decoding {digits_manifest[0]} into the run's image cache ..." in seen, "a note while the data loads"
    assert "shard 0 slice 2/2" in seen and "images" in seen and "img/s" in seen and "left" in seen
    monkeypatch.undo()  # stderr a pipe again
    piped = invoke("train", "--dataset", digits_manifest[0], "--run-dir", tmp_path / "run")
    assert piped.stderr.count("\n") == 1, "the notes vanish: an error stands alone on its line"


def test_progress_counts_samples_batch_by_batch(digits_manifest):
    from sisa.data import load_manifest
    from sisa.training import ShardJob, initial_state, run_shard_job

    split, classes = load_manifest(digits_manifest[0])
    cfg = sisa.config_for(str(digits_manifest[0]), shards=1, slices=2, epochs=1, batch_size=32, channels=1, width=8,
                          classes=len(classes))
    rows = [list(range(0, 40)), list(range(40, 80))]
    calls = []
    list(run_shard_job(cfg, ShardJob(0, 0, rows, [[str(r) for r in s] for s in rows]), initial_state(cfg, 0),
                       split.images, split.labels, "cpu", lambda *a: calls.append(a)))
    total = 40 * 1 + 80 * 1  # slice_epochs(2, 1) == [1, 1]: 40 samples, then 80
    assert [c[2] for c in calls] == [20, 40, 67, 94, 120], "after every batch (near-equal splits)"
    assert {c[3] for c in calls} == {total} and [c[1] for c in calls] == [0, 0, 1, 1, 1]


# --- 7: --ignore-missing says what it skipped ---------------------------------------------
def test_ignore_missing_reports_unknown_ids_in_output_and_receipt(trained_run, tmp_path):
    req = tmp_path / "req.csv"
    req.write_text("id\ntrain-0005\nghost\nnobody\n")
    r = invoke("forget", "--ids", req, "--ignore-missing", "--run-dir", trained_run, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "2 not in the index were skipped: 'ghost', 'nobody'" in r.stdout
    receipt = json.loads((trained_run / "receipts" / "request-000001.json").read_text())
    assert receipt["ids_not_found"] == 2 and len(receipt["ids_not_found_examples"]) == 2
    assert "ghost" not in json.dumps(receipt), "only keyed hashes without --receipt-ids"
    req.write_text("id\ntrain-0006\nghost\n")
    j = invoke("forget", "--ids", req, "--ignore-missing", "--run-dir", trained_run, "--device", "cpu", "--json")
    assert json.loads(j.stdout)["ids_not_found"] == 1 and json.loads(j.stdout)["ids_not_found_examples"] == ["ghost"]


# --- 8: help, version --------------------------------------------------------------------
def test_help_shows_defaults_and_says_what_device_does():
    # rich wraps option help inside a box at 80 columns: read it as one line of words
    train_help = re.sub(r"[\s│]+", " ", invoke("train", "--help").output)
    assert train_help.count("[default: per dataset]") == 2
    assert "Where to run the models" in invoke("evaluate", "--help").output
    version = invoke("--version")
    assert version.exit_code == 0 and version.stdout.startswith("sisa ")


# --- 9: predict checks its input before it loads the models -------------------------------
def test_predict_and_forget_path_errors_come_first_and_match_the_readme(trained_run, tmp_path):
    code = ("import sys; from typer.testing import CliRunner; from cli import app; "
            "r = CliRunner().invoke(app, sys.argv[1:]); "
            "print(r.exit_code, 'torch' in sys.modules); print(r.stderr.strip())")

    def fresh(*args):  # a fresh interpreter: what was imported shows what was done
        p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120)
        first, message = p.stdout.splitlines()[:2]
        return first, message

    assert fresh("predict", tmp_path / "nope.png", "--run-dir", trained_run) == ("2 False", f"error: image not found: {tmp_path / 'nope.png'}")
    first, message = fresh("predict", tmp_path, "--run-dir", trained_run)
    assert first == "2 False" and "is a directory, not an image file" in message
    first, message = fresh("predict", tmp_path / "x.png", "--aggregation", "median", "--run-dir", trained_run)
    assert first == "2 False" and "unknown aggregation" in message
    first, message = fresh("forget", "--ids", tmp_path, "--run-dir", trained_run)
    assert first == "2 False" and "is a directory, not a CSV of ids" in message


# --- 11: commands that do not train answer without importing torch -------------------------
def test_status_receipts_and_bad_input_do_not_import_torch(trained_run, tmp_path):
    code = ("import sys; from typer.testing import CliRunner; from cli import app; "
            "r = CliRunner().invoke(app, sys.argv[1:]); print(r.exit_code, 'torch' in sys.modules)")
    for args in (["status", "--run-dir", trained_run], ["receipts", "--run-dir", trained_run],
                 ["forget", "--ids", tmp_path / "missing.csv", "--run-dir", trained_run],
                 ["train", "--run-dir", trained_run], ["status", "--run-dir", tmp_path / "none"]):
        p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120)
        assert p.stdout.split()[1] == "False", (args, p.stdout, p.stderr)


# --- 4: the suite cleans up after itself -----------------------------------------------------
def test_the_suite_deletes_what_passed_tests_created(pytestconfig, tmp_path_factory):
    # pytest's default keeps every test's folder of the last three sessions (runs of 89 MB
    # checkpoints: ~12 GB a session before the suite's runs were narrowed to width 16)
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
    assert small_config("x.csv").width == 16, "the suite's runs are narrow: ~2.8 MB per checkpoint"
