"""One writer at a time; reads work during a forget; a long-lived Ensemble knows when it is stale."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
from typer.testing import CliRunner

import sisa
from cli import app
from sisa.data import load_manifest

runner = CliRunner()


def run_cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_reads_work_and_writers_wait_during_a_forget(trained_run, tmp_path, digits_manifest):
    ensemble = sisa.Ensemble.load(trained_run)
    images = load_manifest(digits_manifest[1])[0].images
    before = ensemble.predict_proba(images)
    req = tmp_path / "req.csv"
    req.write_text("id\ntrain-0001\n")
    flag = tmp_path / "paused"
    env = {**os.environ, "SISA_FAULT": "epoch", "SISA_FAULT_ACTION": "pause", "SISA_FAULT_FLAG": str(flag)}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "forget", "--ids", str(req), "--run-dir", str(trained_run),
                             "--device", "cpu", "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 120
        while not flag.exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
            time.sleep(0.1)
        # the forget is mid-training now: other writers are refused, clearly
        second = run_cli("forget", "--ids", req, "--run-dir", trained_run, "--device", "cpu")
        assert second.exit_code == 1 and "another sisa command is writing" in second.stderr
        over = run_cli("train", "--dataset", digits_manifest[0], "--run-dir", trained_run, "--overwrite")
        assert over.exit_code == 1 and "another sisa command is writing" in over.stderr
        assert not list(trained_run.parent.glob(".run.*")), "the refused train left nothing behind"
        # readers are not
        st = json.loads(run_cli("status", "--run-dir", trained_run, "--json").stdout)
        assert st["requests"] == {"total": 1, "unfinished": 1} and st["samples"]["deleted"] == 1
        assert st["writer"]["command"] == "sisa forget" and st["writer"]["pid"] == proc.pid
        human = run_cli("status", "--run-dir", trained_run).stdout
        assert f"`sisa forget` (pid {proc.pid}) is working on them" in human and "--resume" not in human
        assert run_cli("evaluate", "--run-dir", trained_run, "--device", "cpu").exit_code == 0
        during = sisa.Ensemble.load(trained_run)
        assert during.generation == ensemble.generation, "an unfinished forget serves the last finished models"
        assert torch.equal(during.predict_proba(images), before)
        assert not ensemble.is_stale()
    finally:
        flag.unlink(missing_ok=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert ensemble.is_stale()
    fresh = ensemble.reload()
    assert fresh.generation == ensemble.generation + 1 and not fresh.is_stale()


def test_a_request_journaled_while_complete_plans_its_jobs_is_retrained_next_round(trained_run, monkeypatch):
    """`sisa serve` journals requests while its writer retrains. One landing between planning a
    shard's job and reading its samples' hashes once crashed complete() (a deleted sample has no
    hash); now that job waits for the next round, and the result is still exact."""
    from sisa.audit import audit
    from sisa.run import Run

    run = Run.open(trained_run)
    a, b = [x for ids in run.retained(0)[1] for x in ids][:2]
    run.record_request(ids=[a])
    planned = Run.shard_jobs
    journaled = []

    def shard_jobs(self, *args, **kw):
        jobs = planned(self, *args, **kw)
        if not journaled:  # a /forget handler, right after the writer planned its jobs
            other = Run.open(trained_run)
            journaled.append(other.record_request(ids=[b]))
            other.close()
        return jobs

    monkeypatch.setattr(Run, "shard_jobs", shard_jobs)
    first = run.complete()
    assert journaled and 0 not in first.shards_retrained  # its job was out of date: skipped
    monkeypatch.setattr(Run, "shard_jobs", planned)
    second = run.complete()
    assert 0 in second.shards_retrained and not run.shard_jobs()
    assert len(run.finish_requests()) == 2
    report = audit(run, retrain=[0])
    assert report.ok, report.failures
    run.close()
