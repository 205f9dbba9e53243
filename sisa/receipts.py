"""Deletion receipts: what a finished request removed, provably, as a JSON file per request.

A receipt names the request, a keyed hash of each deleted id (the raw ids only when asked for),
its times, the shards and slices retrained, the sha256 of every checkpoint removed and of every
checkpoint that replaced it, and its own sha256 (over its canonical JSON without that field),
so a copy handed to the data subject can be checked against the run later.

Ids are hashed with HMAC-SHA256 under a per-run secret (`<run>/secret.key`, created with the run,
readable by its owner only, never written into a receipt). A plain sha256 would protect nothing:
ids such as `train-00042` are predictable, and hashing every candidate would recover them. With
the key, the operator can still answer "was my id deleted?" (`sisa receipts --id ID`); without
it, a receipt reveals how many ids were deleted, not which.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from datetime import datetime
from pathlib import Path

from sqlalchemy import select

from store.checkpoints import write_atomic
from store.index import Index, Replacement, Request, RunRow, Sample

RECEIPT_DIR = "receipts"
SECRET_FILE = "secret.key"
ID_HASH = "HMAC-SHA256 of the UTF-8 id, keyed with the run's secret.key (kept outside the receipts)"


def run_secret(run_dir: Path) -> bytes:
    """The run's receipt key, created (owner-only, atomically) the first time it is needed."""
    path = Path(run_dir) / SECRET_FILE
    if not path.exists():
        key = secrets.token_hex(32).encode()
        write_atomic(path, key)
        os.chmod(path, 0o600)
    return path.read_bytes().strip()


def id_digest(key: bytes, sample_id: str) -> str:
    return hmac.new(key, sample_id.encode(), hashlib.sha256).hexdigest()


def _canonical(receipt: dict) -> bytes:
    body = {k: v for k, v in receipt.items() if k != "receipt_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def build_receipt(index: Index, req: Request, finished_at: datetime, key: bytes) -> dict:
    with index.transaction() as s:
        run = s.get(RunRow, 1)
        ids = list(s.scalars(select(Sample.id).where(Sample.request_id == req.id)))
        swaps = list(s.scalars(select(Replacement).where(Replacement.request_id == req.id)
                               .order_by(Replacement.shard, Replacement.slice, Replacement.id)))
    slices: dict[str, list[int]] = {}
    for r in swaps:
        slices.setdefault(str(r.shard), [])
        if r.slice not in slices[str(r.shard)]:
            slices[str(r.shard)].append(r.slice)
    receipt = {
        "request_id": req.id,
        "created_at": req.created_at.isoformat() + "Z",
        "finished_at": finished_at.isoformat() + "Z",
        "dataset": run.dataset,
        "config_sha256": run.config_hash,
        "samples_deleted": len(ids),
        "already_deleted": req.n_already_deleted,
        "id_hash": ID_HASH,
        "deleted_id_hashes": sorted(id_digest(key, i) for i in ids),
        "ids_not_found": req.n_unknown,  # named in the request, unknown to the index (--ignore-missing)
        "ids_not_found_examples": sorted(id_digest(key, i) for i in json.loads(req.unknown_examples or "[]")),
        "shards_retrained": sorted(int(k) for k in slices),
        "slices_retrained": slices,
        "removed_checkpoints": [{"shard": r.shard, "slice": r.slice, "sha256": r.old_sha256}
                                for r in swaps if r.old_sha256],
        "new_checkpoints": [{"shard": r.shard, "slice": r.slice, "sha256": r.new_sha256} for r in swaps],
    }
    if req.receipt_ids:
        receipt["deleted_ids"] = sorted(ids)
        receipt["ids_not_found_examples"] = sorted(json.loads(req.unknown_examples or "[]"))
    receipt["receipt_sha256"] = hashlib.sha256(_canonical(receipt)).hexdigest()
    return receipt


def write_receipt(run_dir: Path, receipt: dict) -> tuple[Path, str]:
    folder = Path(run_dir) / RECEIPT_DIR
    folder.mkdir(exist_ok=True)
    path = folder / f"request-{receipt['request_id']:06d}.json"
    write_atomic(path, (json.dumps(receipt, indent=2, sort_keys=True) + "\n").encode())
    return path, receipt["receipt_sha256"]


def verify_receipt(path: Path, expected_sha256: str | None = None) -> str | None:
    """None if the receipt is intact (and matches `expected_sha256`), else what is wrong."""
    try:
        receipt = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return f"receipt {path} is missing"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"receipt {path} is not valid JSON"
    actual = hashlib.sha256(_canonical(receipt)).hexdigest()
    if actual != receipt.get("receipt_sha256"):
        return f"receipt {path} was altered: its content hashes to {actual[:12]}, it claims {str(receipt.get('receipt_sha256'))[:12]}"
    if expected_sha256 and actual != expected_sha256:
        return f"receipt {path} is not the one the index recorded ({expected_sha256[:12]})"
    return None


def receipts_naming(run_dir: Path, paths: list[Path], sample_id: str) -> list[Path]:
    """The receipts (of `paths`) that record `sample_id` as deleted."""
    digest = id_digest(run_secret(run_dir), sample_id)
    found = []
    for path in paths:
        try:
            receipt = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        if digest in receipt.get("deleted_id_hashes", ()) or sample_id in receipt.get("deleted_ids", ()):
            found.append(path)
    return found
