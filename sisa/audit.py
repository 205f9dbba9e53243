"""`sisa audit`: check that a run holds what its index says, and nothing it should have forgotten.

For every live checkpoint: its file's sha256 matches the index; its lineage (the hash of the
exact ordered ids it was trained on), recomputed from the index, holds no deleted sample; the
chain of slices is complete; no superseded checkpoint file lingers. Every request is finished and
its receipt intact. `retrain` additionally retrains shards from scratch on `device` and compares
every slice bit for bit (a CPU-trained run matches on any CPU; a GPU-trained one on the same GPU
type, when its config is deterministic). `repair` rebuilds corrupt or missing checkpoints from the last good
checkpoint before them (deterministic training makes the rebuilt file byte-identical).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sqlalchemy import select

from store.checkpoints import file_sha256, load_checkpoint, read_staged
from store.features import count_features, deleted_with_features
from store.index import ACTIVE, DELETED, DONE, Checkpoint, Sample

from .receipts import verify_receipt
from .run import CKPT_DIR, Run, init_file_name


@dataclass
class AuditReport:
    checks: int = 0
    failures: list[str] = field(default_factory=list)
    retrained: list[int] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checks": self.checks, "failures": self.failures,
                "retrained_shards": self.retrained, "repaired": self.repaired}


def state_equal(a, b) -> bool:
    """Bitwise equality of two nested states (tensors compared with torch.equal, dtype and shape)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b


def audit(run: Run, retrain: Iterable[int] = (), repair: bool = False, device: str | torch.device = "cpu") -> AuditReport:
    if repair:
        report = AuditReport(repaired=_repair(run, device))
        result = audit(run, retrain, device=device)
        result.repaired = report.repaired
        return result
    report = AuditReport()
    live = run.index.checkpoints()
    bad_files: set[tuple[int, int]] = set()
    expected = {shard: run.expected_lineages(shard) for shard in range(run.config.shards)}
    unfinished: dict[int, int] = {}  # shard -> live slices, for shards an interrupted command left
    for shard in range(run.config.shards):
        for i, lineage in enumerate(expected[shard]):
            where = f"shard {shard} slice {i}"
            report.checks += 3
            ck = live.get((shard, i))
            if ck is None:
                unfinished[shard] = sum((shard, j) in live for j in range(run.config.slices))
                bad_files.add((shard, i))
                continue
            path = run.dir / ck.path
            if not path.exists():
                report.failures.append(f"{where}: checkpoint file {ck.path} is missing")
                bad_files.add((shard, i))
            elif file_sha256(path) != ck.sha256:
                report.failures.append(f"{where}: checkpoint file {ck.path} does not match its sha256 (corrupt)")
                bad_files.add((shard, i))
            if ck.lineage_sha256 != lineage:
                report.failures.append(f"{where}: trained on ids other than the retained ones "
                                       "(its lineage holds deleted or missing samples)")
            if ck.config_hash != run.config.config_hash:
                report.failures.append(f"{where}: trained with another configuration")
    live_names = {Path(c.path).name for c in live.values()}
    staged = 0
    for p in sorted((run.dir / CKPT_DIR).glob("*.pt")):
        report.checks += 1
        if p.name in live_names:
            continue
        meta, _ = read_staged(p)
        if meta and meta.get("shard") in unfinished and meta.get("config_hash") == run.config.config_hash \
                and meta.get("lineage_sha256") == expected[meta["shard"]][meta["slice"]]:
            staged += 1  # written by the interrupted command, trained on retained data only: resume reuses it
        else:
            report.failures.append(f"stray checkpoint file {CKPT_DIR}/{p.name} (superseded, not removed; "
                                   f"`{_resume_command(run)}` removes it)")
    if unfinished:
        live_count = sum(unfinished.values())
        report.failures.append(
            f"the run is unfinished: shards {sorted(unfinished)} have {live_count} of "
            f"{len(unfinished) * run.config.slices} slice checkpoints live (an interrupted command; run "
            f"`{_resume_command(run)}`" + (f", which reuses the {staged} checkpoint files it already wrote)" if staged else ")"))
    for req in run.index.requests():
        report.checks += 1
        if req.status != DONE:
            report.failures.append(f"request {req.id} is {req.status}, not done (run `sisa forget --resume`)")
        elif problem := verify_receipt(run.dir / (req.receipt_path or "missing"), req.receipt_sha256):
            report.failures.append(f"request {req.id}: {problem}")
    with run.index.transaction() as s:
        kept = list(s.scalars(select(Sample.id).where(Sample.status == DELETED, Sample.content_sha256.is_not(None))))
    report.checks += 1
    if kept:
        report.failures.append(f"{len(kept)} deleted samples still have a content hash, e.g. {kept[0]!r}")
    _audit_backbone(run, report)
    _audit_images(run, report)
    for shard in sorted(set(retrain)):
        report.retrained.append(shard)
        if any(k[0] == shard for k in bad_files):
            report.failures.append(f"shard {shard}: cannot compare with a retrain, its checkpoints are broken")
            continue
        for res in run.train_from_scratch(shard, device):
            report.checks += 1
            ck = live[(shard, res.slice)]
            saved = load_checkpoint(run.dir / ck.path, ck.sha256)
            # What the retrain resumes from, compared bit for bit: the weights, and the momentum where
            # the retrain keeps one (the last slice's never serves; runs trained before this rule
            # saved it there, and it was never read).
            compared = [k for k in res.state if not (k == "optimizer" and res.state[k] is None)]
            if not state_equal({k: saved.get(k) for k in compared}, {k: res.state[k] for k in compared}):
                report.failures.append(f"shard {shard} slice {res.slice}: differs from retraining from scratch")
        if run.config.frozen:
            report.checks += 1
            if not _features_match(run, shard):
                report.failures.append(f"shard {shard}: cached features differ from what the trunk computes")
    return report


def _audit_images(run: Run, report: AuditReport) -> None:
    """The image cache (a run made from image files): deleted samples' rows are zeros, retained
    ones match their content hashes, and every retained source file still hashes as when decoded."""
    from store.images import caches

    from .imagecache import find_problems

    if caches(run.index):
        report.checks += 3
        report.failures += find_problems(run.dir, run.index)


def _audit_backbone(run: Run, report: AuditReport) -> None:
    """The init weights file still hashes to what the run was created from; the feature cache
    holds a row for every retained sample and none for a deleted one."""
    cfg = run.config
    if cfg.init_sha256:
        report.checks += 1
        path = run.dir / init_file_name(cfg.init_sha256)
        if not path.is_file():
            report.failures.append(f"init weights file {path.name} is missing")
        elif file_sha256(path) != cfg.init_sha256:
            report.failures.append(f"init weights file {path.name} was altered: it no longer hashes to the "
                                   f"sha256 the run was created from ({cfg.init_sha256[:12]})")
    n_deleted, examples = deleted_with_features(run.index)
    report.checks += 1
    if n_deleted:
        report.failures.append(f"the feature cache still holds {n_deleted} deleted samples, e.g. {examples[0]!r}")
    if cfg.frozen:
        report.checks += 1
        active = run.index.counts().get(ACTIVE, 0)
        cached = count_features(run.index) - n_deleted
        if cached != active:
            report.failures.append(f"the feature cache holds {cached} retained samples, the index {active}")


def _features_match(run: Run, shard: int) -> bool:
    """The shard's cached features, bit for bit what the frozen trunk computes from its images."""
    from .backbone import trunk_features
    from .executors import job_features, run_init_state
    from .partition import ShardJob

    job = ShardJob(shard, 0, *run.retained(shard))
    cached, _, _ = job_features(run.dir, run.config, job)
    data = run.dataset()
    row_of = {sid: r for r, sid in enumerate(data.train.ids)}
    rows = torch.tensor([row_of[x] for ids in job.slice_ids for x in ids], dtype=torch.long)
    fresh = trunk_features(run.config, run_init_state(run.dir, run.config), data.train.images[rows])
    return torch.equal(cached, fresh)


def _resume_command(run: Run) -> str:
    return "sisa forget --resume" if any(r.status != DONE for r in run.index.requests()) else "sisa train --resume"


def _repair(run: Run, device: str | torch.device = "cpu") -> list[str]:
    """Drop the index rows of each shard from its first corrupt or missing checkpoint on, then
    let `complete()` rebuild them from the last good one before it."""
    repaired = []
    live = run.index.checkpoints()
    for shard in range(run.config.shards):
        for i in range(run.config.slices):
            ck = live.get((shard, i))
            if ck is not None and (run.dir / ck.path).exists() and file_sha256(run.dir / ck.path) == ck.sha256:
                continue
            with run.index.transaction() as s:
                s.execute(Checkpoint.__table__.delete().where(Checkpoint.shard == shard, Checkpoint.slice >= i))
            repaired.append(f"shard {shard}: rebuilt slices {i}..{run.config.slices - 1}")
            break
    from .imagecache import zero_deleted

    if zeroed := zero_deleted(run.dir, run.index):  # pixels of deleted samples put back into the cache
        repaired.append(f"image cache: zeroed the rows of {zeroed} deleted samples")
    run.complete(device)
    run.finish_requests()
    return repaired
