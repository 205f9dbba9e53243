"""`sisa audit`: it passes on a healthy run and names each kind of damage; --repair rebuilds
corrupt checkpoints byte for byte; --retrain catches a checkpoint the index vouches for wrongly."""
from __future__ import annotations

import json
import shutil

from sqlalchemy import update
from typer.testing import CliRunner

import sisa
from cli import app
from store.index import Checkpoint, Index

from .conftest import file_hashes

runner = CliRunner()


def run_cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def live(run_dir):
    index = Index(run_dir / "index.sqlite")
    try:
        return index.checkpoints()
    finally:
        index.close()


def rewrite(path, data: bytes) -> None:
    """Damage a file without touching the template it is hard-linked to."""
    path.unlink()
    path.write_bytes(data)


def audit_json(run_dir, *extra):
    r = run_cli("audit", "--run-dir", run_dir, "--json", *extra)
    return r.exit_code, json.loads(r.stdout)


def test_healthy_run_passes_including_bitwise_retrain(trained_run):
    sisa.forget(trained_run, ids=["train-0005"])
    code, rep = audit_json(trained_run, "--retrain", "all")
    assert code == 0 and rep["ok"] and rep["retrained_shards"] == [0, 1, 2]
    human = run_cli("audit", "--run-dir", trained_run)
    assert human.exit_code == 0 and "audit ok" in human.stdout


def test_flipped_byte_is_detected_and_repaired(trained_run):
    cks = live(trained_run)
    original = file_hashes(trained_run)
    target = trained_run / cks[(1, 2)].path
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0x01
    rewrite(target, bytes(data))

    code, rep = audit_json(trained_run)
    assert code == 1 and any("shard 1 slice 2" in f and "corrupt" in f for f in rep["failures"]), rep
    pred = run_cli("predict", target, "--run-dir", trained_run)  # any file: loading the models fails first
    assert pred.exit_code == 1 and "corrupt" in pred.stderr and "Traceback" not in pred.output

    code, rep = audit_json(trained_run, "--repair")
    assert code == 0 and rep["repaired"] == ["shard 1: rebuilt slices 2..2"], rep
    assert file_hashes(trained_run) == original, "deterministic training rebuilds the very same bytes"


def test_truncated_middle_checkpoint_is_rebuilt_with_its_successors(trained_run):
    cks = live(trained_run)
    original = file_hashes(trained_run)
    path = trained_run / cks[(0, 1)].path
    rewrite(path, path.read_bytes()[:1000])
    code, rep = audit_json(trained_run)
    assert code == 1 and rep["failures"] == [f"shard 0 slice 1: checkpoint file {cks[(0, 1)].path} "
                                             "does not match its sha256 (corrupt)"]
    code, rep = audit_json(trained_run, "--repair")
    assert code == 0 and rep["repaired"] == ["shard 0: rebuilt slices 1..2"]
    assert file_hashes(trained_run) == original


def test_retrain_catches_a_checkpoint_the_index_vouches_for(trained_run, tmp_path):
    """Put the pre-forget final checkpoint back and make the index's sha256 agree: the sha and
    lineage checks pass, and only retraining from scratch can tell the weights saw the sample."""
    index = Index(trained_run / "index.sqlite")
    victim = next(s.id for s in index.shard_samples(2) if (s.slice, s.position) == (1, 0))
    index.close()
    old = live(trained_run)[(2, 2)]
    shutil.copy(trained_run / old.path, tmp_path / "old.pt")
    sisa.forget(trained_run, ids=[victim])
    new = live(trained_run)[(2, 2)]
    (trained_run / new.path).unlink()
    shutil.copy(tmp_path / "old.pt", trained_run / old.path)
    index = Index(trained_run / "index.sqlite")
    with index.transaction() as s:
        s.execute(update(Checkpoint).where(Checkpoint.shard == 2, Checkpoint.slice == 2)
                  .values(sha256=old.sha256, path=old.path))
    index.close()

    assert audit_json(trained_run)[0] == 0, "the forgery fools the cheap checks"
    code, rep = audit_json(trained_run, "--retrain", "2")
    assert code == 1 and rep["failures"] == ["shard 2 slice 2: differs from retraining from scratch"]


def test_lineage_stray_files_and_receipts_are_checked(trained_run, tmp_path):
    before = live(trained_run)
    shutil.copy(trained_run / before[(0, 0)].path, tmp_path / "kept.pt")
    index = Index(trained_run / "index.sqlite")
    victim = next(s.id for s in index.shard_samples(0) if (s.slice, s.position) == (0, 0))
    index.close()
    sisa.forget(trained_run, ids=[victim])
    assert audit_json(trained_run)[0] == 0

    shutil.copy(tmp_path / "kept.pt", trained_run / before[(0, 0)].path)  # a superseded file lingers
    receipt = trained_run / "receipts" / "request-000001.json"
    data = json.loads(receipt.read_text())
    data["samples_deleted"] = 0
    receipt.write_text(json.dumps(data))
    index = Index(trained_run / "index.sqlite")
    with index.transaction() as s:
        s.execute(update(Checkpoint).where(Checkpoint.shard == 1, Checkpoint.slice == 0)
                  .values(lineage_sha256="0" * 64))
    index.close()

    code, rep = audit_json(trained_run)
    assert code == 1
    assert any(f.startswith("stray checkpoint file") for f in rep["failures"])
    assert any("request 1: receipt" in f and "altered" in f for f in rep["failures"])
    assert "shard 1 slice 0: trained on ids other than the retained ones (its lineage holds deleted or " \
           "missing samples)" in rep["failures"]
    assert len(rep["failures"]) == 3


def test_receipt_lists_hashes_not_ids_unless_asked(trained_run, tmp_path):
    import hashlib

    from sisa.receipts import id_digest, run_secret

    req = tmp_path / "r.csv"
    req.write_text("owner\nuser03\n")
    assert run_cli("forget", "--ids", req, "--run-dir", trained_run, "--device", "cpu").exit_code == 0
    req.write_text("id\ntrain-0010\n")
    assert run_cli("forget", "--ids", req, "--receipt-ids", "--run-dir", trained_run, "--device", "cpu").exit_code == 0
    listing = json.loads(run_cli("receipts", "--run-dir", trained_run, "--json").stdout)["receipts"]
    assert [(r["request_id"], r["status"], r["intact"]) for r in listing] == [(1, "done", True), (2, "done", True)]
    first = json.loads((trained_run / "receipts" / "request-000001.json").read_text())
    assert first["samples_deleted"] == 6 and "deleted_ids" not in first
    assert "user03" not in json.dumps(first) and "train-0003" not in json.dumps(first)
    second = json.loads((trained_run / "receipts" / "request-000002.json").read_text())
    assert second["deleted_ids"] == ["train-0010"]
    # Keyed: the plain sha256 of a guessable id is nowhere in the receipt; the run's key finds it.
    assert hashlib.sha256(b"train-0010").hexdigest() not in json.dumps(second)
    assert second["deleted_id_hashes"] == [id_digest(run_secret(trained_run), "train-0010")]
    found = json.loads(run_cli("receipts", "--id", "train-0003", "--run-dir", trained_run, "--json").stdout)
    assert [r["request_id"] for r in found["receipts"]] == [1]
    assert json.loads(run_cli("receipts", "--id", "train-0004", "--run-dir", trained_run, "--json").stdout)["receipts"] == []
    assert {c["sha256"] for c in second["new_checkpoints"]} <= set(file_hashes(trained_run).values())
    assert len(second["removed_checkpoints"]) == len(second["new_checkpoints"]) >= 1
