"""A run directory: create it, train it, forget samples from it, say what it holds.

    <run>/index.sqlite        the index (store.index): config, samples, live checkpoints, requests
    <run>/checkpoints/*.pt    content-addressed checkpoint files, one per (shard, slice)
    <run>/images-*.npy        a run made from image files: them decoded once (sisa.imagecache)
    <run>/.lock               held by the one command that may write the run

Training and forgetting are the same operation, `complete()`: for every shard, find the first
slice whose live checkpoint is missing or was trained on ids other than the retained ones (its
lineage hash), and retrain from there. A forget only marks samples deleted (one transaction,
journaled as a request) and then completes; a crash anywhere leaves a state the next
`complete()` finishes, because the work to do is always derived from the index, never
remembered in memory.

Shard jobs run through an executor (sisa.executors: here, on every GPU, or on Ray); wherever
they run, only this process writes the index.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field, replace
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, select, update

from store.checkpoints import clean_temp, read_staged, write_atomic
from store.features import Feature, copy_features, write_features
from store.images import caches, mark_zeroed, record as record_images, rows_to_zero, zero_rows
from store.index import (ACTIVE, DELETED, DONE, PENDING, RETRAINING, Addition, Checkpoint, Index, MissingKeys,
                         Replacement, Request, RunRow, Sample, utcnow)

from .config import AUGMENT_DEFAULTS, RunConfig, slice_epochs, step_sample_epochs
from .errors import ConflictError, IntegrityError, SisaError, UsageError
from .faults import fault_point
from .partition import ShardJob, partition
from .receipts import build_receipt, run_secret, write_receipt

if TYPE_CHECKING:  # torch and the training code load only when a command trains (~7 s here)
    import torch

    from .data import Dataset
    from .executors import SavedSlice, ShardFailure, ShardResult, ShardTask
    from .training import Progress

INDEX_FILE = "index.sqlite"
CKPT_DIR = "checkpoints"


def init_file_name(sha256: str) -> str:
    """The run's copy of its init weights file, named by its content."""
    return f"init-{sha256[:16]}.pt"


@dataclass
class CompleteReport:
    shards_retrained: list[int] = field(default_factory=list)
    slices_retrained: dict[int, list[int]] = field(default_factory=dict)  # shard -> slices
    slices_reused: dict[int, list[int]] = field(default_factory=dict)  # staged by an interrupted command
    sample_epochs: int = 0  # work spent
    full_sample_epochs: int = 0  # work a retrain of every shard from scratch would spend
    seconds: float = 0.0
    # the shard jobs' time by phase (sisa.executors.ShardResult.seconds), summed over jobs: under
    # a parallel executor the jobs overlap, so the sum can exceed `seconds`
    phase_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class ForgetReport:
    request_id: int
    samples_removed: int
    already_deleted: int
    shards_retrained: list[int]
    slices_retrained: dict[int, list[int]]
    sample_epochs: int
    full_sample_epochs: int
    seconds: float
    slices_reused: dict[int, list[int]] = field(default_factory=dict)  # staged by an interrupted command
    ids_not_found: int = 0  # named in the request but unknown to the index (--ignore-missing)
    ids_not_found_examples: list[str] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # CompleteReport's

    @property
    def cost_fraction(self) -> float:
        return self.sample_epochs / self.full_sample_epochs if self.full_sample_epochs else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["slices_retrained"] = {str(k): v for k, v in self.slices_retrained.items()}
        d["slices_reused"] = {str(k): v for k, v in self.slices_reused.items() if v}
        d["cost_fraction"] = round(self.cost_fraction, 6)
        d["phase_seconds"] = {k: round(v, 3) for k, v in self.phase_seconds.items()}
        return d


@dataclass
class AddReport:
    samples_added: int
    placed: dict[int, int]  # shard -> new samples
    shards_retrained: list[int]
    slices_retrained: dict[int, list[int]]
    sample_epochs: int
    full_sample_epochs: int
    seconds: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["placed"] = {str(k): v for k, v in self.placed.items()}
        d["slices_retrained"] = {str(k): v for k, v in self.slices_retrained.items()}
        return d


class Run:
    def __init__(self, run_dir: Path, index: Index):
        self.dir = Path(run_dir)
        self.index = index
        row = index.run()
        self.config = RunConfig.from_json(row.config_json)
        self.data_dir = row.data_dir
        self.test_manifest = row.test_manifest
        self._dataset: Dataset | None = None
        self.init_notes: str | None = None

    # --- opening and creating -----------------------------------------------------------
    @classmethod
    def open(cls, run_dir: Path | str) -> "Run":
        run_dir = Path(run_dir)
        if not (run_dir / INDEX_FILE).is_file():
            raise UsageError(f"no SISA run at {run_dir} (create one with `sisa train`)")
        return cls(run_dir, Index(run_dir / INDEX_FILE))

    @classmethod
    def create(cls, run_dir: Path | str, config: RunConfig, data_dir: Path | str = "data",
               download: bool = False, test_manifest: Path | str | None = None,
               overwrite: bool = False, init_from: Path | str | None = None,
               notify: Callable[[str], None] | None = None, features_from: Path | str | None = None) -> "Run":
        """Partition the data and write the index. Training happens in `complete()`.

        `init_from`: an init weights file (`sisa pretrain`'s, or torchvision ResNet-18 weights);
        the run keeps a copy named by its sha256. With a frozen trunk (config.trainable layer4 or
        fc) every training sample's features are computed here, once, and cached in the index.
        `notify` hears what takes a while (loading the data), once the input has been checked;
        `init_notes` on the result says which tensors the init file gave.
        `features_from`: another frozen-trunk run over the same data with the same trunk, whose
        cached features are copied instead of computed again (a sweep over S pays for them once).
        The index is built in a sibling folder and renamed into place, so a crash never
        leaves a half-written run under the user's name.
        """
        run_dir = Path(run_dir)
        config.validate()
        check_replaceable(run_dir, overwrite)
        if config.frozen and init_from is None:
            raise UsageError(f"--trainable {config.trainable} freezes the trunk, so it needs its weights: "
                             "pass --init-from (a `sisa pretrain` output or ResNet-18 weights)")
        init = None
        if init_from is not None:
            from .backbone import load_init_file

            init, init_sha = load_init_file(init_from)  # a bad file fails here, before the data loads
            config = replace(config, init_sha256=init_sha)
        data_dir = Path(data_dir).resolve()
        from .data import is_folder

        if is_folder(config.dataset) and Path(config.dataset).is_dir():  # later commands and workers may run elsewhere
            config = replace(config, dataset=str(Path(config.dataset).resolve()))

        building = run_dir.with_name(f".{run_dir.name}.creating-{os.getpid()}")
        shutil.rmtree(building, ignore_errors=True)
        # the first folder this call makes (run_dir's parents may not exist yet): bad input leaves none
        made = next((p for p in reversed(building.parents) if not p.exists()), building)
        try:
            return cls._create_in(building, run_dir, config, data_dir, download, test_manifest, init, init_from,
                                  notify, features_from)
        except BaseException:
            shutil.rmtree(made, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(building, ignore_errors=True)

    @classmethod
    def _create_in(cls, building: Path, run_dir: Path, config: RunConfig, data_dir: Path, download: bool,
                   test_manifest: Path | str | None, init, init_from, notify, features_from) -> "Run":
        """`create` in the sibling folder `building`, which the caller removes whatever happens."""
        from .data import load_dataset
        from .imagecache import decode_dataset, is_file_dataset

        building.mkdir(parents=True)
        decoded = {}
        if is_file_dataset(config.dataset):  # image files: decoded once, in parallel, into the run's cache
            if notify:
                notify(f"decoding {config.dataset} into the run's image cache ...")
            data, decoded, sources = decode_dataset(config.dataset, building, test_manifest, config.resize or None)
        else:
            if notify:
                notify(f"loading {config.dataset} ...")
            data = load_dataset(config.dataset, data_dir, download, test_manifest, config.resize or None)
        config = _fit_to_data(config, data)
        init_notes = None
        if init is not None:
            from .backbone import describe_init, unfitted

            missing = unfitted(config.arch, config.channels, config.classes, init, config.width)
            init_notes = f"init from {init_from} (sha256 {config.init_sha256[:12]}): {describe_init(missing)}"
        n = len(data.train)
        if n < 2 * config.shards * config.slices:
            raise UsageError(f"{n} samples are too few for {config.shards} shards x {config.slices} slices "
                             "(each slice needs at least 2)")
        hashes = decoded["train"].hashes if decoded else data.train.sample_hashes()  # the decoders hashed each row
        features = None
        if init_from is not None:
            blob = Path(init_from).read_bytes()
            if hashlib.sha256(blob).hexdigest() != config.init_sha256:
                raise SisaError(f"{init_from} changed while the run was being created; try again")
            write_atomic(building / init_file_name(config.init_sha256), blob)
        if config.frozen and features_from is not None:
            source = _feature_source(Path(features_from), config, hashes)
            config = replace(config, feature_shape=source.feature_shape)
        elif config.frozen:
            from .backbone import trunk_features

            if notify:
                notify(f"computing the frozen trunk's features of {len(data.train)} samples ...")
            features = trunk_features(config, init, data.train.images).numpy()
            config = replace(config, feature_shape=tuple(features.shape[1:]))
        cls._write_index(building, config, data, hashes, data_dir, test_manifest, features)
        if decoded or (config.frozen and features_from is not None):
            index = Index(building / INDEX_FILE)
            try:
                for split, d in decoded.items():
                    record_images(index, split, d.images.shape, d.layout, d.content_sha256, sources[split], d.sources,
                                  d.seconds, d.workers)
                if config.frozen and features_from is not None:
                    if copy_features(index, Path(features_from) / INDEX_FILE) != n:
                        raise SisaError(f"{features_from} lacks the cached features of some samples (deleted there?)")
            finally:
                index.close()
        if run_dir.exists():
            with writer_lock(run_dir):  # never pull a run from under a running forget
                trash = run_dir.with_name(f".{run_dir.name}.old-{os.getpid()}")
                os.replace(run_dir, trash)
            os.replace(building, run_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(building, run_dir)
        run = cls.open(run_dir)
        run._dataset = data
        run.init_notes = init_notes  # which tensors the init file gave, for the user
        return run

    @staticmethod
    def _write_index(folder: Path, config: RunConfig, data: Dataset, hashes: list[str], data_dir: Path,
                     test_manifest: Path | str | None, features=None) -> None:
        (folder / CKPT_DIR).mkdir(parents=True)
        run_secret(folder)  # the receipts' key, made with the run
        index = Index(folder / INDEX_FILE)
        places = partition(len(data.train), config.shards, config.slices, config.seed)
        with index.transaction() as s:
            s.add(RunRow(id=1, created_at=utcnow(), dataset=config.dataset,
                         dataset_hash=hashlib.sha256("".join(hashes).encode()).hexdigest(),
                         data_dir=str(data_dir), test_manifest=str(Path(test_manifest).resolve()) if test_manifest else None,
                         shards=config.shards, slices=config.slices, epochs=config.epochs, arch=config.arch,
                         seed=config.seed, config_json=config.to_json(), config_hash=config.config_hash))
            s.execute(Sample.__table__.insert(), [
                dict(id=i, row=r, label=int(y), owner=o, shard=p.shard, slice=p.slice, position=p.position,
                     content_sha256=h, status=ACTIVE, request_id=None)
                for r, (i, y, o, h, p) in enumerate(zip(data.train.ids, data.train.labels.tolist(),
                                                        data.train.owners, hashes, places))])
        if features is not None:
            write_features(index, data.train.ids, features)
        index.close()

    # --- data --------------------------------------------------------------------------
    def dataset(self) -> Dataset:
        """The training data: the data set the run was created from, then what `add` took in."""
        if self._dataset is None:
            from .data import load_dataset, with_additions
            from .imagecache import open_dataset

            # A run made from image files opens the cache it decoded them into; `add`'s manifests
            # are decoded again each time, as are the files of a run made before the cache.
            base = (open_dataset(self.dir, self.index, self.config.dataset, self.config.class_names)
                    or load_dataset(self.config.dataset, self.data_dir or "data", test_manifest=self.test_manifest,
                                    size=self.config.resize or None))
            self._dataset = with_additions(base, self.additions())
        return self._dataset

    def additions(self) -> tuple[str, ...]:
        return tuple(a.manifest for a in self.index.additions())

    # --- what needs training -----------------------------------------------------------
    def retained(self, shard: int) -> tuple[list[list[int]], list[list[str]]]:
        """(rows, ids) of the shard's retained samples, per slice, in training order."""
        return self.retained_by_shard([shard])[shard]

    def retained_by_shard(self, only: Iterable[int] | None = None) -> dict[int, tuple[list[list[int]], list[list[str]]]]:
        """`retained` for every shard (or only some), from one query. Every command plans from
        it (every shard's lineage is checked), so it is built a whole slice at a time."""
        shards = range(self.config.shards) if only is None else sorted(only)
        out = {k: ([[] for _ in range(self.config.slices)], [[] for _ in range(self.config.slices)]) for k in shards}
        for (k, slc), places in groupby(self.index.retained_places(None if only is None else shards),
                                        key=itemgetter(0, 1)):
            _, _, ids, rows = zip(*places)
            out[k][0][slc], out[k][1][slc] = list(rows), list(ids)
        return out

    def expected_lineages(self, shard: int, ids: list[list[str]] | None = None) -> list[str]:
        """The lineage hash each slice's checkpoint must have, given the retained data: the
        sha256 of the ids of slices 0..i (store.index.lineage_hash), one running hash, fed a
        slice at a time (the same bytes as one id at a time)."""
        ids = self.retained(shard)[1] if ids is None else ids
        h, out = hashlib.sha256(), []
        for slice_ids in ids:
            if slice_ids:
                h.update(("\n".join(slice_ids) + "\n").encode())
            out.append(h.copy().hexdigest())
        return out

    def shard_jobs(self, only: Iterable[int] | None = None,
                   retained: dict[int, tuple[list[list[int]], list[list[str]]]] | None = None) -> list[ShardJob]:
        """One job per shard (of all, or of `only`) whose live checkpoints are not exactly what
        its retained data would train: a missing checkpoint, or one whose lineage holds a deleted
        sample. `retained`: `retained_by_shard(only)`, when the caller has read it already."""
        live = self.index.checkpoints()
        config_hash = self.config.config_hash
        jobs = []
        for shard, (rows, ids) in (self.retained_by_shard(only) if retained is None else retained).items():
            for i, lineage in enumerate(self.expected_lineages(shard, ids)):
                ck = live.get((shard, i))
                if ck is None or ck.lineage_sha256 != lineage or ck.config_hash != config_hash:
                    jobs.append(ShardJob(shard, i, rows, ids))
                    break
        return jobs

    def train_from_scratch(self, shard: int, device: str | torch.device = "cpu"):
        """Every slice state of `shard` trained from its initial weights on the retained data,
        without reading or writing any checkpoint (what `audit --retrain` compares against)."""
        from .executors import job_features, run_init_state
        from .training import initial_state, run_shard_job

        job = ShardJob(shard, 0, *self.retained(shard))
        start = initial_state(self.config, shard, run_init_state(self.dir, self.config))
        if self.config.frozen:
            inputs, labels, job = job_features(self.dir, self.config, job)
            return run_shard_job(self.config, job, start, inputs, labels, device)
        data = self.dataset()
        self._check_data(data, [job])
        row_of = {sid: r for r, sid in enumerate(data.train.ids)}
        job.slice_rows = [[row_of[x] for x in ids] for ids in job.slice_ids]
        return run_shard_job(self.config, job, start, data.train.images, data.train.labels, device)

    def full_cost(self, retained: dict[int, tuple[list[list[int]], list[list[str]]]] | None = None) -> int:
        """Sample-epochs of retraining every shard from scratch on the retained data
        (`retained`: `retained_by_shard()`, when the caller has read it already)."""
        epochs = slice_epochs(self.config.slices, self.config.epochs)
        if retained is not None:
            counts = {(k, i): len(ids) for k, (_, slices) in retained.items() for i, ids in enumerate(slices)}
        else:
            with self.index.transaction() as s:
                counts = dict(((k, i), n) for k, i, n in s.execute(
                    select(Sample.shard, Sample.slice, func.count()).where(Sample.status == ACTIVE)
                    .group_by(Sample.shard, Sample.slice)))
        total = 0
        for shard in range(self.config.shards):
            prefix = 0
            for i in range(self.config.slices):
                prefix += counts.get((shard, i), 0)
                total += step_sample_epochs(self.config, prefix, epochs[i])
        return total

    # --- the one operation that writes checkpoints ------------------------------------
    def complete(self, device: str | torch.device = "cpu", progress: Progress | None = None,
                 executor=None) -> CompleteReport:
        """Bring every live checkpoint in line with the retained data (see module docstring).

        Shard jobs run through `executor` (sisa.executors: "local", the default, "gpus", "ray",
        or an executor object); whoever runs a job writes its checkpoint files. This process
        alone writes the index: as each shard's result arrives, its new checkpoints go live in
        one transaction, and only then are the files they replace deleted. A shard job that
        fails on a remote worker fails the command once the other jobs are done; what they
        committed stays committed, and the next `complete()` retrains only the failed shard.
        """
        from .executors import ShardFailure, ShardResult, make_executor

        start = time.perf_counter()
        executor = make_executor(executor)
        self.scrub_cache()  # a request journaled by a command that died before zeroing its cached pixels
        ckpt_dir = self.dir / CKPT_DIR
        clean_temp(ckpt_dir)
        retained = self.retained_by_shard()  # read once: the plan and the cost of a full retrain
        report = CompleteReport(full_sample_epochs=self.full_cost(retained))
        jobs = self.shard_jobs(retained=retained)
        with self.index.transaction() as s:
            s.execute(update(Request).where(Request.status == PENDING).values(status=RETRAINING))
            in_flight = list(s.scalars(select(Request.id).where(Request.status == RETRAINING)))
        # Slices an interrupted command already wrote are reused, not retrained; a shard still
        # goes live all at once, when its last slice exists.
        staged = {job.shard: self._adopt_staged(job) for job in jobs}
        for job in jobs:
            report.slices_reused[job.shard] = [s.slice for s in staged[job.shard]]
        tasks = [task for job in jobs if job.start + len(staged[job.shard]) < self.config.slices
                 if (task := self._task(job, staged[job.shard])) is not None]
        data = None
        if tasks and not self.config.frozen:  # a frozen trunk's jobs read cached features instead
            data = self.dataset()
            self._check_data(data, [t.job for t in tasks])
        for job in jobs:
            if job.start + len(staged[job.shard]) == self.config.slices:  # nothing left to train
                self._go_live(job, self._arrived(ShardResult(job.shard, socket.gethostname(), staged[job.shard])),
                              in_flight)
                report.shards_retrained.append(job.shard)
        first = {job.shard: job for job in jobs}
        failures: list[ShardFailure] = []
        with closing(executor.run(tasks, str(device), progress, data)) as outcomes:
            for task, outcome in outcomes:
                if isinstance(outcome, ShardFailure):
                    if not outcome.outdated:  # an outdated job's shard stays stale: the next round plans it
                        failures.append(outcome)
                    continue
                shard = task.job.shard
                trained = outcome.slices
                outcome = replace(outcome, slices=staged[shard] + trained)
                self._go_live(first[shard], self._arrived(outcome), in_flight)
                report.sample_epochs += sum(s.sample_epochs for s in trained)
                for phase, secs in outcome.seconds.items():
                    report.phase_seconds[phase] = report.phase_seconds.get(phase, 0.0) + secs
                report.shards_retrained.append(shard)
                report.slices_retrained[shard] = [s.slice for s in trained]
        report.shards_retrained.sort()  # parallel executors finish in any order
        clean_temp(ckpt_dir)  # a killed (and retried) remote attempt may have left temp files
        self._remove_orphans(keep={f.shard for f in failures})  # a failed shard's files serve --resume
        if report.shards_retrained:
            with self.index.transaction() as s:
                s.execute(update(RunRow).values(generation=RunRow.generation + 1))
        if failures:
            raise SisaError(_failure_message(failures, report.shards_retrained))
        fault_point("retrained")
        report.seconds = time.perf_counter() - start
        return report

    def _adopt_staged(self, job: ShardJob) -> list[SavedSlice]:
        """Checkpoint files that an interrupted command wrote for slices job.start.. of this shard
        but never put live, reusable because they name themselves: their bytes hash to the
        content address in their name, and the lineage and configuration inside them are the ones
        the retained data calls for. Deterministic training makes each equal to a retrain.

        Live files are skipped unread: the job exists because the live checkpoint at job.start
        is stale, and adoption stops at the first slice without a match, so a live file is never
        adopted. Reading it (every byte hashed, then unpickled) cost every stale shard 0.18-0.23 s
        for a ResNet-18 checkpoint with momentum (89 MB; measured on the 2-core CPU)."""
        from .executors import SavedSlice, checkpoint_stem

        expected = self.expected_lineages(job.shard, job.slice_ids)  # what the job trains
        live = {Path(c.path).name for c in self.index.checkpoints().values()}
        adopted: list[SavedSlice] = []
        for i in range(job.start, self.config.slices):
            found = None
            for path in sorted((self.dir / CKPT_DIR).glob(f"{checkpoint_stem(job.shard, i)}-*.pt")):
                if path.name in live:
                    continue
                meta, sha = read_staged(path)
                if meta and meta.get("lineage_sha256") == expected[i] and meta.get("config_hash") == self.config.config_hash:
                    found = SavedSlice(i, path.name, sha, path.stat().st_size, expected[i], meta["n_samples"],
                                       meta["sample_epochs"])
                    break
            if found is None:
                break
            adopted.append(found)
        return adopted

    def _task(self, job: ShardJob, staged: list[SavedSlice] = ()) -> ShardTask | None:
        """A shard job as plain values a worker anywhere can run (paths absolute), resuming after
        the staged slices if there are any."""
        import torch

        from .data import is_folder
        from .executors import ShardTask

        if staged:
            job = replace(job, start=staged[-1].slice + 1)
            start_path, start_sha = f"{CKPT_DIR}/{staged[-1].name}", staged[-1].sha256
        elif job.start:
            ck = self.index.checkpoints()[(job.shard, job.start - 1)]
            start_path, start_sha = ck.path, ck.sha256
        else:
            start_path = start_sha = None
        recorded = self.index.content_hashes(job.shard)
        if any(recorded[x] is None for ids in job.slice_ids for x in ids):
            # A sample deleted since the job was planned (a request journaled meanwhile: `sisa
            # serve` takes requests while it retrains): the job is out of date already. Skipped;
            # the shard stays stale and the next complete() plans it afresh.
            return None
        digest = hashlib.sha256("".join(recorded[x] for ids in job.slice_ids for x in ids).encode()).hexdigest()
        dataset = self.config.dataset
        if dataset.endswith(".csv") or is_folder(dataset):
            dataset = str(Path(dataset).resolve())  # workers need not share this process's cwd
        run_dir = self.dir.resolve()
        return ShardTask(job=job, run_dir=str(run_dir), checkpoint_dir=str(run_dir / CKPT_DIR),
                         config_json=self.config.to_json(), dataset=dataset, data_dir=self.data_dir,
                         test_manifest=self.test_manifest, additions=self.additions(),
                         start_path=str(run_dir / start_path) if start_path else None,
                         start_sha256=start_sha, data_sha256=digest, threads=torch.get_num_threads())

    def _arrived(self, result: ShardResult) -> list[Checkpoint]:
        """Index rows for the files a worker wrote, once this process can see every one of them."""
        rows = []
        for s in result.slices:
            path = self.dir / CKPT_DIR / s.name
            if not path.is_file() or path.stat().st_size != s.size:
                raise SisaError(f"shard {result.shard}: worker host {result.host} wrote {CKPT_DIR}/{s.name}, but "
                                f"{socket.gethostname()} does not see it in {self.dir.resolve()}: the run directory "
                                "must be on a filesystem every worker mounts at the same path")
            rows.append(Checkpoint(shard=result.shard, slice=s.slice, path=f"{CKPT_DIR}/{s.name}", sha256=s.sha256,
                                   lineage_sha256=s.lineage_sha256, config_hash=self.config.config_hash,
                                   n_samples=s.n_samples, sample_epochs=s.sample_epochs, created_at=utcnow()))
        return rows

    def _go_live(self, job: ShardJob, new_rows: list[Checkpoint], in_flight: list[int]) -> None:
        """Swap a shard's checkpoints from slice job.start on, in one transaction; record the
        swap for the receipts of the requests in flight; then delete the replaced files."""
        with self.index.transaction() as s:
            replaced = {c.slice: c for c in s.execute(select(Checkpoint.slice, Checkpoint.sha256, Checkpoint.path)
                                                      .where(Checkpoint.shard == job.shard, Checkpoint.slice >= job.start))}
            s.execute(Checkpoint.__table__.delete().where(Checkpoint.shard == job.shard,
                                                          Checkpoint.slice >= job.start))
            s.add_all(new_rows)
            s.add_all([Replacement(request_id=r, shard=job.shard, slice=c.slice, new_sha256=c.sha256,
                                   old_sha256=replaced[c.slice].sha256 if c.slice in replaced else None)
                       for r in in_flight for c in new_rows])
        fault_point("shard-committed")
        for old in replaced.values():
            if old.path not in {c.path for c in new_rows}:
                (self.dir / old.path).unlink(missing_ok=True)

    def _check_data(self, data: Dataset, jobs: list[ShardJob]) -> None:
        """Retraining must see the very data the run was created with, minus deletions."""
        from .data import hash_rows

        needed = {x for job in jobs for ids in job.slice_ids for x in ids}
        present = {sid: r for r, sid in enumerate(data.train.ids) if sid in needed}
        absent = needed - present.keys()
        if absent:
            raise SisaError(f"{len(absent)} retained samples are missing from {self.config.dataset}, "
                            f"e.g. {sorted(absent)[0]!r}")
        recorded = {}
        for job in jobs:
            recorded.update(self.index.content_hashes(job.shard))
        # Only the rows the jobs read are hashed: from the image cache, only their pages are read.
        hashes = hash_rows(data.train.images.numpy(), data.train.labels.tolist(), present.values())
        # A hash gone since the jobs were planned is a deletion journaled meanwhile, not changed data:
        # that job trains on what it was planned with, and its shard is retrained again after.
        changed = [sid for sid, r in present.items() if recorded[sid] is not None and hashes[r] != recorded[sid]]
        if changed:
            raise SisaError(f"{len(changed)} retained samples changed since the run was created, "
                            f"e.g. {changed[0]!r}: retraining on other data would not be exact")
        cache = caches(self.index).get("train")
        if cache is not None:  # and their source files are still what the cache was decoded from
            from .imagecache import check_sources

            check_sources(self.index, "train", sorted(r for r in present.values() if r < cache.rows))

    def _remove_orphans(self, keep: set[int] = frozenset()) -> None:
        """Delete checkpoint files no live row names, except those of the shards in `keep`."""
        live = {Path(c.path).name for c in self.index.checkpoints().values()}
        for p in (self.dir / CKPT_DIR).glob("*.pt"):
            if p.name not in live and int(p.name[5:8]) not in keep:  # shardKKK-sliceIII-<sha>.pt
                p.unlink(missing_ok=True)

    # --- adding ----------------------------------------------------------------------
    def record_addition(self, manifest: Path | str) -> tuple[int, dict[int, int], str]:
        """Take in new samples (a manifest `id,path,label[,owner]`, images converted and resized to
        the run's) in one transaction, before any training; returns (samples, {shard: count}, the
        addition's public id). `finish_additions()` marks it done once it is trained in.

        Placement, one sample at a time in manifest order: the shard with the fewest live samples
        (ties: the lowest shard), at the end of its last slice. Only the last slice's step of each
        shard that received samples then needs retraining. With a frozen trunk, the new samples'
        features are computed now and cached in the same transaction."""
        from .data import load_manifest

        manifest = Path(manifest).resolve()
        cfg = self.config
        split, _ = load_manifest(manifest, cfg.class_names, cfg.channels, tuple(cfg.image_size) or self.dataset().image_size)
        with self.index.transaction() as s:
            taken = list(s.scalars(select(Sample.id).where(Sample.id.in_(split.ids)).limit(5)))
        if taken:
            raise ConflictError(f"{manifest}: ids already in the run, e.g. {', '.join(repr(t) for t in taken)} "
                                "(new samples need new ids)")
        hashes = split.sample_hashes()
        features = None
        if cfg.frozen:
            from .backbone import trunk_features
            from .executors import run_init_state

            features = trunk_features(cfg, run_init_state(self.dir, cfg), split.images).numpy()
        placed: dict[int, int] = {}
        with self.index.transaction() as s:
            live = dict(s.execute(select(Sample.shard, func.count()).where(Sample.status == ACTIVE)
                                  .group_by(Sample.shard)).all())
            last = cfg.slices - 1
            ends = dict(s.execute(select(Sample.shard, func.max(Sample.position)).where(Sample.slice == last)
                                  .group_by(Sample.shard)).all())
            first_row = s.execute(select(func.count()).select_from(Sample)).scalar_one()
            rows = []
            for k, (sid, y, owner, h) in enumerate(zip(split.ids, split.labels.tolist(), split.owners, hashes)):
                shard = min(range(cfg.shards), key=lambda i: (live.get(i, 0), i))
                live[shard] = live.get(shard, 0) + 1
                ends[shard] = ends.get(shard, -1) + 1
                placed[shard] = placed.get(shard, 0) + 1
                rows.append(dict(id=sid, row=first_row + k, label=int(y), owner=owner, shard=shard, slice=last,
                                 position=ends[shard], content_sha256=h, status=ACTIVE, request_id=None))
            addition = Addition(created_at=utcnow(), manifest=str(manifest), n_samples=len(rows),
                                placed_json=json.dumps({str(k): v for k, v in sorted(placed.items())}))
            s.add(addition)
            s.execute(Sample.__table__.insert(), rows)
            if features is not None:
                s.execute(Feature.__table__.insert(), [{"id": sid, "data": f.tobytes()}
                                                       for sid, f in zip(split.ids, features)])
        self._dataset = None  # the training data now includes the new manifest
        fault_point("journaled")
        return len(rows), placed, addition.public_id

    def finish_additions(self) -> list[Addition]:
        """Mark journaled additions done once no shard is stale: every sample they brought is in
        a live model. Returns those marked."""
        with self.index.transaction() as s:
            pending = list(s.scalars(select(Addition).where(Addition.status != DONE)))
        if not pending or self.shard_jobs():
            return []
        with self.index.transaction() as s:
            s.execute(update(Addition).where(Addition.id.in_([a.id for a in pending]))
                      .values(status=DONE, finished_at=utcnow()))
        return pending

    def add(self, manifest: Path | str, device: str | torch.device = "cpu", progress: Progress | None = None,
            executor=None) -> "AddReport":
        """Take in new samples and train them in exactly: each shard that received some retrains
        its last slice step (a deterministic function of the retained ids, as always)."""
        start = time.perf_counter()
        n, placed, _ = self.record_addition(manifest)
        done = self.complete(device, progress, executor)
        self.finish_additions()
        return AddReport(n, placed, done.shards_retrained, done.slices_retrained, done.sample_epochs,
                         done.full_sample_epochs, time.perf_counter() - start)

    # --- forgetting ------------------------------------------------------------------
    def record_request(self, ids: Iterable[str] | None = None, owners: Iterable[str] | None = None,
                       ignore_missing: bool = False, receipt_ids: bool = False) -> Request:
        """Journal a deletion request and mark its samples deleted, in one transaction, before
        any training. `ids` and `owners` may be iterators: they are streamed, not collected."""
        if (ids is None) == (owners is None):
            raise UsageError("a request names either sample ids or owners")
        column, keys = ("id", ids) if ids is not None else ("owner", owners)
        try:
            req, _ = self.index.journal_request(keys, column, ignore_missing, receipt_ids)
        except MissingKeys as e:
            shown = ", ".join(repr(m) for m in e.examples)
            more = f" and {e.count - len(e.examples)} more" if e.count > len(e.examples) else ""
            raise SisaError(f"{e.count} {column}s not in the index: {shown}{more} "
                            "(pass --ignore-missing to forget the rest)") from None
        fault_point("journaled")
        self.scrub_cache()
        return req

    def scrub_cache(self) -> int:
        """Zero the image cache's rows of deleted samples (those not yet zeroed), durably: the
        second half of journaling a request, redone by whatever command runs next if this one
        dies in between (`complete()` starts with it). Returns the rows zeroed."""
        cache = caches(self.index).get("train")
        rows = rows_to_zero(self.index) if cache is not None else []
        if not rows:
            return 0
        try:
            zero_rows(self.dir, cache, rows)
        except (FileNotFoundError, ValueError) as e:
            raise IntegrityError(f"cannot zero deleted samples in the run's image cache {self.dir / cache.file}: "
                                 f"{' '.join(str(e).split())}") from None
        fault_point("cache-zeroed")
        mark_zeroed(self.index, rows)
        return len(rows)

    def forget(self, ids: Iterable[str] | None = None, owners: Iterable[str] | None = None,
               ignore_missing: bool = False, device: str | torch.device = "cpu",
               progress: Progress | None = None, receipt_ids: bool = False, executor=None) -> ForgetReport:
        """Exactly unlearn samples (by id) or every sample of some owners. Any unfinished
        earlier request is completed along the way."""
        start = time.perf_counter()
        req = self.record_request(ids, owners, ignore_missing, receipt_ids)
        return self.resume(device, progress, start, req, executor)

    def resume(self, device: str | torch.device = "cpu", progress: Progress | None = None,
               start: float | None = None, req: Request | None = None, executor=None) -> ForgetReport:
        """Finish whatever an interrupted command left: stale shards, unfinished requests."""
        start = time.perf_counter() if start is None else start
        done = self.complete(device, progress, executor)
        finished = self.finish_requests()
        self.finish_additions()
        req = req or (finished[-1] if finished else None)
        return ForgetReport(req.id if req else 0, req.n_samples if req else 0, req.n_already_deleted if req else 0,
                            done.shards_retrained, done.slices_retrained, done.sample_epochs,
                            done.full_sample_epochs, time.perf_counter() - start,
                            {k: v for k, v in done.slices_reused.items() if v},
                            req.n_unknown if req else 0, json.loads(req.unknown_examples or "[]") if req else [],
                            done.phase_seconds)

    def finish_requests(self) -> list[Request]:
        """Write a receipt for each journaled request and mark it done. Refuses while any live
        checkpoint was trained on data that is no longer retained: a request is never "done"
        while a model still holds one of its samples (checked on the shards that held them)."""
        unfinished = [r.id for r in self.index.requests() if r.status != DONE]
        if not unfinished:
            return []
        with self.index.transaction() as s:
            held = set(s.scalars(select(Sample.shard).where(Sample.request_id.in_(unfinished)).distinct()))
        stale = self.shard_jobs(held)
        if stale:
            raise SisaError(f"shards {[j.shard for j in stale]} are not retrained yet; run with --resume")
        finished = []
        for req in self.index.requests():
            if req.status == DONE:
                continue
            finished_at = utcnow()
            receipt = build_receipt(self.index, req, finished_at, run_secret(self.dir))
            path, sha = write_receipt(self.dir, receipt)
            fault_point("receipt-written")
            with self.index.transaction() as s:
                s.execute(update(Request).where(Request.id == req.id).values(
                    status=DONE, finished_at=finished_at, receipt_path=str(path.relative_to(self.dir)),
                    receipt_sha256=sha))
            finished.append(req)
        if finished:
            self.index.truncate_wal()  # no old page images of deleted rows stay in the log
        return finished

    # --- reading ---------------------------------------------------------------------
    def status(self) -> dict:
        row = self.index.run()
        counts = self.index.counts()
        live = self.index.checkpoints()
        expected = self.config.shards * self.config.slices
        stale = self.shard_jobs()
        requests = self.index.requests()
        return {
            "run_dir": str(self.dir), "dataset": row.dataset, "dataset_hash": row.dataset_hash,
            "writer": writer(self.dir),
            "config": json.loads(row.config_json), "config_hash": row.config_hash,
            "generation": row.generation,
            "samples": {"active": counts.get(ACTIVE, 0), "deleted": counts.get(DELETED, 0)},
            "checkpoints": {"live": len(live), "expected": expected},
            "complete": not stale,
            "stale_shards": {j.shard: j.start for j in stale},
            "requests": {"total": len(requests), "unfinished": sum(r.status != DONE for r in requests)},
            "image_cache": {c.split: {"file": c.file, "shape": [c.rows, c.channels, c.height, c.width],
                                      "bytes": c.rows * c.channels * c.height * c.width,
                                      "decode_seconds": round(c.decode_seconds, 3), "workers": c.workers}
                            for c in caches(self.index).values()},
        }

    def close(self) -> None:
        self.index.close()


def check_replaceable(run_dir: Path, overwrite: bool) -> None:
    """A run may be created where nothing is, or replace a SISA run (or an empty folder) when
    `overwrite` says so; anything else belongs to the user and is never touched."""
    if not run_dir.exists() and not run_dir.is_symlink():
        if run_dir.parent.exists() and not run_dir.parent.is_dir():
            raise UsageError(f"cannot create {run_dir}: {run_dir.parent} is not a directory")
        return
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is a file, not a run directory: choose another --run-dir")
    is_run = (run_dir / INDEX_FILE).is_file()
    empty = not any(run_dir.iterdir())
    if not (is_run or empty):
        raise UsageError(f"{run_dir} exists and is not a SISA run (no {INDEX_FILE}); "
                         "refusing to replace it: choose another --run-dir")
    if not overwrite:
        raise UsageError(f"{run_dir} already exists (pass --overwrite to replace it"
                         + (", or --resume to finish training it)" if is_run else ")"))


def pick_device(name: str = "auto") -> "torch.device":
    from .executors import pick_device as pick

    return pick(name)


def _failure_message(failures: list[ShardFailure], committed: list[int]) -> str:
    first, *more = sorted(failures, key=lambda f: f.shard)
    where = f" on worker host {first.host}" if first.host != "?" else ""
    also = f" (also failed: shards {[f.shard for f in more]})" if more else ""
    kept = f"; shards {committed} were retrained and are live" if committed else ""
    return f"shard {first.shard} failed{where}: {first.error}{also}{kept}; run again with --resume to finish"


def _feature_source(source: Path, config: RunConfig, hashes: list[str]) -> RunConfig:
    """The config of a run whose feature cache this one may copy: same data, same trunk."""
    if not (source / INDEX_FILE).is_file():
        raise UsageError(f"--features-from: no SISA run at {source}")
    index = Index(source / INDEX_FILE)
    try:
        row = index.run()
    finally:
        index.close()
    other = RunConfig.from_json(row.config_json)
    trunk = ("arch", "width", "channels", "seed", "trainable", "init_sha256")
    differ = [k for k in trunk if getattr(other, k) != getattr(config, k)]
    if not other.frozen or differ:
        raise UsageError(f"--features-from {source}: its trunk differs ({', '.join(differ) or 'not frozen'})")
    if row.dataset_hash != hashlib.sha256("".join(hashes).encode()).hexdigest():
        raise UsageError(f"--features-from {source}: it was created from other data")
    return other


def _fit_to_data(config: RunConfig, data: Dataset) -> RunConfig:
    return replace(config, dataset=data.name, channels=data.channels, classes=len(data.class_names),
                   class_names=data.class_names, image_size=tuple(data.image_size))


def config_for(dataset: str, **overrides) -> RunConfig:
    """A RunConfig with the dataset's augmentation defaults, then any explicit overrides."""
    fields = dict(AUGMENT_DEFAULTS.get(dataset, dict(crop_pad=0, flip=False)))
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return RunConfig(dataset=dataset, **fields)


@contextmanager
def writer_lock(run_dir: Path | str, command: str = "sisa"):
    """The one-writer rule: an exclusive, non-blocking lock on <run>/.lock. The holder writes
    who it is into the file (`writer()` reads it), and empties it when done."""
    path = Path(run_dir) / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = writer(run_dir)
            by = f" (`{held['command']}`, pid {held['pid']})" if held else ""
            raise SisaError(f"another sisa command is writing {run_dir}{by}; try again when it has finished") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command}).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def writer(run_dir: Path | str) -> dict | None:
    """Who holds the writer lock now ({"pid", "host", "command"}), or None. Read without
    taking the lock, so asking never makes a starting writer fail."""
    try:
        held = json.loads((Path(run_dir) / ".lock").read_text() or "null")
        if held and held.get("host") == socket.gethostname():
            os.kill(int(held["pid"]), 0)  # a holder killed by SIGKILL left its note behind
        return held
    except (OSError, ValueError, TypeError, KeyError):
        return None



def train(run_dir: Path | str, config: RunConfig | None = None, device: str = "cpu", progress: Progress | None = None,
          executor=None, **create_kwargs) -> Run:
    """Create a run (partition + index) and train every shard, slice by slice. `executor`:
    "local" (default), "gpus", "ray", or an executor from sisa.executors."""
    from .executors import make_executor

    executor = make_executor(executor)  # fails before the run is created, not after
    run = Run.create(run_dir, config or config_for("digits"), **create_kwargs)
    with writer_lock(run.dir):
        run.complete(device, progress, executor)
    return run


def forget(run_dir: Path | str, ids: Iterable[str] | None = None, owners: Iterable[str] | None = None,
           ignore_missing: bool = False, device: str = "cpu", progress: Progress | None = None,
           receipt_ids: bool = False, executor=None) -> ForgetReport:
    """Exactly unlearn the given sample ids, or every sample of the given owners."""
    from .executors import make_executor

    executor = make_executor(executor)
    run = Run.open(run_dir)
    try:
        with writer_lock(run.dir):
            return run.forget(ids, owners, ignore_missing, device, progress, receipt_ids, executor)
    finally:
        run.close()
