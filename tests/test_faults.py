"""Crash safety for real: `sisa forget` runs in a subprocess that is SIGKILLed at each phase (via
the hooks in sisa/faults.py), then `sisa forget --resume` finishes it. The final state must be
bitwise the state of an uninterrupted forget, the audit must pass, and at no point may the index
call a request done while a live checkpoint was trained on one of its samples."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import sisa
from sisa.audit import audit
from store.index import DONE, Index

from .conftest import file_hashes

# (point, n-th hit). The request below hits shard 0 from slice 1 (2 epochs) and shard 2 from
# slice 0 (3 epochs), so epoch 4 lands in the second shard, after the first one went live.
FAULTS = [("journaled", 1), ("epoch", 2), ("temp-written", 1), ("checkpoint-saved", 2),
          ("shard-committed", 1), ("epoch", 4), ("retrained", 1), ("receipt-written", 1)]


def request_ids(run_dir):
    index = Index(run_dir / "index.sqlite")
    try:
        pick = {(0, 1, 2), (2, 0, 4)}
        return [s.id for k in (0, 2) for s in index.shard_samples(k) if (s.shard, s.slice, s.position) in pick]
    finally:
        index.close()


def cli(args, run_dir, env=None):
    return subprocess.run([sys.executable, "-m", "cli", *args, "--run-dir", str(run_dir), "--device", "cpu"],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)


def receipt(run_dir, request_id=1):
    return json.loads((run_dir / "receipts" / f"request-{request_id:06d}.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, trained_template):
    """The uninterrupted forget: live checkpoint hashes and receipt."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    shutil.copytree(trained_template, run_dir)
    sisa.forget(run_dir, ids=request_ids(run_dir))
    return file_hashes(run_dir), receipt(run_dir)


def never_done_while_stale(run_dir):
    run = sisa.Run.open(run_dir)
    try:
        done = [r for r in run.index.requests() if r.status == DONE]
        return not (done and run.shard_jobs())
    finally:
        run.close()


@pytest.mark.parametrize("point,at", FAULTS, ids=[f"{p}-{n}" for p, n in FAULTS])
def test_kill_and_resume_equals_uninterrupted(trained_run, tmp_path, reference, point, at):
    ref_hashes, ref_receipt = reference
    req = tmp_path / "req.csv"
    req.write_text("id\n" + "\n".join(request_ids(trained_run)) + "\n")

    killed = cli(["forget", "--ids", str(req)], trained_run, {"SISA_FAULT": point, "SISA_FAULT_AT": str(at)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert never_done_while_stale(trained_run)

    resumed = cli(["forget", "--resume", "--json"], trained_run)
    assert resumed.returncode == 0, resumed.stderr
    assert file_hashes(trained_run) == ref_hashes
    if (point, at) == ("checkpoint-saved", 2):  # shard 0's new slices 1 and 2 were written, not yet live
        assert json.loads(resumed.stdout)["slices_reused"] == {"0": [1, 2]}, "written work is reused, not redone"
    run = sisa.Run.open(trained_run)
    try:
        result = audit(run)
        assert result.ok, result.failures
        assert [r.status for r in run.index.requests()] == [DONE]
    finally:
        run.close()
    got = receipt(trained_run)
    for key in ("samples_deleted", "deleted_id_hashes", "shards_retrained", "slices_retrained",
                "removed_checkpoints", "new_checkpoints"):
        assert got[key] == ref_receipt[key], key
    assert not list((trained_run / "checkpoints").glob(".*.tmp"))


def test_a_new_forget_completes_an_interrupted_one(trained_run, tmp_path, reference):
    """Any writing command finishes what a dead one left, not only --resume."""
    ids = request_ids(trained_run)
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text(f"id\n{ids[0]}\n")
    second.write_text(f"id\n{ids[1]}\n")
    assert cli(["forget", "--ids", str(first)], trained_run, {"SISA_FAULT": "epoch"}).returncode == -signal.SIGKILL
    done = cli(["forget", "--ids", str(second), "--json"], trained_run)
    assert done.returncode == 0, done.stderr
    assert file_hashes(trained_run) == reference[0]
    assert receipt(trained_run, 1)["samples_deleted"] == 1 and receipt(trained_run, 2)["samples_deleted"] == 1


def test_a_forget_reads_no_live_checkpoint_when_looking_for_staged_ones(trained_run, reference, monkeypatch):
    """Adoption looks only at files an interrupted command left: the live (stale) checkpoint
    files are never hashed and unpickled for it (that cost every forget ~0.3 s at 89 MB). An
    uninterrupted forget therefore reads no file for adoption, and still ends as the reference."""
    import sisa.run

    read = []
    real = sisa.run.read_staged
    monkeypatch.setattr(sisa.run, "read_staged", lambda path: read.append(path.name) or real(path))
    sisa.forget(trained_run, ids=request_ids(trained_run))
    assert read == []
    assert file_hashes(trained_run) == reference[0]
