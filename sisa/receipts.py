"""Deletion receipts: what a finished request removed, provably, as a JSON file per request.

A receipt names the request, the sha256 of each deleted id (the raw ids only when asked for),
its times, the shards and slices retrained, the sha256 of every checkpoint removed and of every
checkpoint that replaced it, and its own sha256 (over its canonical JSON without that field),
so a copy handed to the data subject can be checked against the run later.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path

from sqlalchemy import select

from store.checkpoints import write_atomic
from store.index import Index, Replacement, Request, RunRow, Sample

RECEIPT_DIR = "receipts"


def _canonical(receipt: dict) -> bytes:
    body = {k: v for k, v in receipt.items() if k != "receipt_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def build_receipt(index: Index, req: Request, finished_at: datetime) -> dict:
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
        "deleted_id_sha256": sorted(hashlib.sha256(i.encode()).hexdigest() for i in ids),
        "shards_retrained": sorted(int(k) for k in slices),
        "slices_retrained": slices,
        "removed_checkpoints": [{"shard": r.shard, "slice": r.slice, "sha256": r.old_sha256}
                                for r in swaps if r.old_sha256],
        "new_checkpoints": [{"shard": r.shard, "slice": r.slice, "sha256": r.new_sha256} for r in swaps],
    }
    if req.receipt_ids:
        receipt["deleted_ids"] = sorted(ids)
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
