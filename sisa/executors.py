"""Where shard jobs run: in this process, on every GPU of the machine, or on a Ray cluster.

SISA's shards never exchange data, so each shard job (train slices r..R-1 of shard k from the
checkpoint of slice r-1) is an independent piece of work. A worker runs one end to end: it loads
the data and the start state, trains, writes the checkpoint files into <run>/checkpoints itself
(atomically, under content-addressed names) and returns only their metadata (`ShardResult`). The
coordinating process, the only one that writes the index, puts each shard live as its result
arrives (`Run.complete`). A retried job writes the very same files again, so retries stay exact.

  LocalExecutor   in this process (the default): one job after another, or several at once,
                  each in its own thread and CUDA stream
  GpuExecutor     spawned worker processes on every visible CUDA GPU, one or more per GPU
  RayExecutor     one Ray task per job, on a local Ray instance or a running cluster

Each has `run(tasks, device, progress, data)`, which yields (task, ShardResult | ShardFailure)
as jobs finish. Workers other than the local one load the data themselves and check it against
the index's content hashes; they must see the run directory at the same path (a shared
filesystem on a cluster), and fail naming the path and their host when they cannot. On CPU the
bits of a trained model depend on torch's thread count, so every worker uses the coordinator's.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import multiprocessing
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from store.checkpoints import load_checkpoint, save_checkpoint
from store.index import lineage_hash

from .config import RunConfig
from .data import Dataset, Split, load_dataset, with_additions
from .errors import IntegrityError, SisaError, UsageError
from .faults import fault_point
from .partition import ShardJob
from .training import Progress, initial_state, run_shard_job

EXECUTORS = ("local", "gpus", "ray")


@dataclass
class ShardTask:
    """Everything a worker needs, in plain values: no index, no open files."""

    job: ShardJob  # slice_ids in training order; a worker maps them to rows of its own data
    run_dir: str  # absolute, and the same path on every worker
    checkpoint_dir: str  # absolute: where the worker writes
    config_json: str
    dataset: str  # a built-in's name or a manifest's absolute path
    data_dir: str | None
    test_manifest: str | None
    start_path: str | None  # checkpoint of slice job.start-1 (absolute); None: initial weights
    start_sha256: str | None
    data_sha256: str  # over the index's content hashes of the retained samples, in training order
    threads: int  # torch intra-op threads: on CPU the bits of the result depend on their number
    device: str = "cpu"
    additions: tuple[str, ...] = ()  # manifests `sisa add` took in (absolute), in order


@dataclass
class SavedSlice:
    slice: int
    name: str  # file name in <run>/checkpoints
    sha256: str
    size: int
    lineage_sha256: str
    n_samples: int
    sample_epochs: int


@dataclass
class ShardResult:
    shard: int
    host: str
    slices: list[SavedSlice]
    # where the job's time went: "prepare" (inputs and starting state loaded), "train" (the slice
    # loop; checkpoints are written beside it), "write_wait" (the last writes, after the loop)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class ShardFailure:
    shard: int
    host: str
    error: str  # one line
    outdated: bool = False  # the job's data changed since it was planned (OutdatedJob): not a failure

    @classmethod
    def of_outdated(cls, task: "ShardTask", e: "OutdatedJob") -> "ShardFailure":
        return cls(task.job.shard, socket.gethostname(), str(e), outdated=True)


Outcome = ShardResult | ShardFailure


class OutdatedJob(SisaError):
    """A sample of the job was deleted after the job was planned (`sisa serve` journals requests
    while its writer retrains), and its cached features went with it. The job is dropped; its
    shard stays stale and the next round plans it afresh, as `Run._task` does for a deletion it
    sees."""


# --- the worker side ------------------------------------------------------------------------
@dataclass
class _Data:
    dataset: Dataset
    row_of: dict[str, int]


def _index_data(dataset: Dataset) -> _Data:
    return _Data(dataset, {sid: r for r, sid in enumerate(dataset.train.ids)})


@functools.lru_cache(maxsize=1)  # a worker process keeps the last data set it loaded
def _worker_data(run_dir: str, name: str, data_dir: str | None, test_manifest: str | None, additions: tuple[str, ...],
                 size: tuple[int, ...] = (), class_names: tuple[str, ...] = ()) -> _Data:
    """The run's image cache, memory-mapped (a job reads only its rows' pages), when it has one;
    else the data set loaded as the coordinator loads it."""
    from store.index import Index

    from .imagecache import open_dataset

    index = Index(Path(run_dir) / "index.sqlite")
    try:
        base = open_dataset(Path(run_dir), index, name, class_names)
    finally:
        index.close()
    if base is None:
        base = load_dataset(name, data_dir or "data", test_manifest=test_manifest, size=size or None)
    return _index_data(with_additions(base, additions))


def run_task(task: ShardTask, progress: Progress | None = None, data: _Data | None = None) -> ShardResult:
    """Run one shard job end to end and return what it wrote. `data` is the coordinator's own
    copy when the job runs in its process (already checked against the index); a worker loads
    and checks its own.

    Checkpoints are written by a background thread while the next slice trains."""
    host = socket.gethostname()
    started = time.perf_counter()
    ckpt_dir = Path(task.checkpoint_dir)
    if not ckpt_dir.is_dir():
        raise SisaError(f"run directory {task.run_dir} is not visible on worker host {host}: it must be on "
                        "a filesystem every worker mounts at the same path")
    cfg = RunConfig.from_json(task.config_json)
    if cfg.frozen:  # the cached features of the job's samples, not images: no data set to load
        inputs, labels, job = job_features(Path(task.run_dir), cfg, task.job)
    else:
        if data is None:
            data = _worker_data(task.run_dir, task.dataset, task.data_dir, task.test_manifest, task.additions,
                                cfg.resize, cfg.class_names)
            _check_worker_data(task, data, host)
        # Rows in the index are positions at creation; map through ids in case the source (a user's
        # manifest) has since dropped deleted rows.
        job = replace(task.job, slice_rows=[[data.row_of[x] for x in ids] for ids in task.job.slice_ids])
        inputs, labels = data.dataset.train.images, data.dataset.train.labels
    if task.start_path is None:
        state = initial_state(cfg, job.shard, run_init_state(Path(task.run_dir), cfg))
    else:
        state = load_checkpoint(task.start_path, task.start_sha256)
    saved = []
    threads = torch.get_num_threads()
    if threads != task.threads:  # on CPU the bits depend on the thread count: use the coordinator's
        torch.set_num_threads(task.threads)
    seconds = {"prepare": time.perf_counter() - started}
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer") as writer:
            loop = time.perf_counter()
            for res in run_shard_job(cfg, job, state, inputs, labels, task.device, progress):
                lineage = lineage_hash(res.ids)
                # The file describes itself, so a resumed command can reuse it (Run._adopt_staged).
                meta = {"shard": res.shard, "slice": res.slice, "lineage_sha256": lineage,
                        "config_hash": cfg.config_hash, "n_samples": len(res.ids), "sample_epochs": res.sample_epochs}
                saved.append((res.slice, lineage, len(res.ids), res.sample_epochs,
                              writer.submit(_save, {**res.state, "meta": meta}, ckpt_dir, res.shard, res.slice)))
            waiting = time.perf_counter()
            seconds["train"] = waiting - loop
            slices = [SavedSlice(slc, path.name, sha, size, lineage, n, work)
                      for slc, lineage, n, work, done in saved for path, sha, size in [done.result()]]
            seconds["write_wait"] = time.perf_counter() - waiting
    finally:
        torch.set_num_threads(threads)
    return ShardResult(job.shard, host, slices, seconds)


def checkpoint_stem(shard: int, slice_: int) -> str:
    return f"shard{shard:03d}-slice{slice_:03d}"


def job_features(run_dir: Path, cfg: RunConfig, job: ShardJob) -> tuple[torch.Tensor, torch.Tensor, ShardJob]:
    """A frozen-trunk job's inputs: the cached features and labels of its samples, in training
    order, and the job with rows pointing into them."""
    from store.features import read_features
    from store.index import Index

    ids = [x for s in job.slice_ids for x in s]
    index = Index(run_dir / "index.sqlite")
    try:
        features, labels = read_features(index, ids, cfg.feature_shape)
    except LookupError:
        recorded = index.content_hashes(job.shard)  # a deletion clears the hash; it is never undone
        gone = [x for x in ids if recorded.get(x, "") is None]
        if gone:
            raise OutdatedJob(f"shard {job.shard}: {len(gone)} of its samples, e.g. {gone[0]!r}, were deleted "
                              "after its job was planned") from None
        raise
    finally:
        index.close()
    rows, start = [], 0
    for s in job.slice_ids:
        rows.append(list(range(start, start + len(s))))
        start += len(s)
    return torch.from_numpy(features), torch.from_numpy(labels), replace(job, slice_rows=rows)


def run_init_state(run_dir: Path, cfg: RunConfig) -> dict | None:
    """The run's copy of its init weights file (checked against the config's sha256), or None."""
    if not cfg.init_sha256:
        return None
    from .backbone import load_init_file
    from .run import init_file_name

    path = Path(run_dir) / init_file_name(cfg.init_sha256)
    if not path.is_file():
        raise SisaError(f"the run's init weights file {path} is missing")
    state, sha = load_init_file(path)
    if sha != cfg.init_sha256:
        raise IntegrityError(f"the run's init weights file {path} was altered: sha256 {sha[:12]}, "
                             f"the run was created from {cfg.init_sha256[:12]}")
    return state


def _save(state: dict, folder: Path, shard: int, slice_: int) -> tuple[Path, str, int]:
    path, sha = save_checkpoint(state, folder, checkpoint_stem(shard, slice_))
    fault_point("checkpoint-saved")
    return path, sha, path.stat().st_size


def _check_worker_data(task: ShardTask, data: _Data, host: str) -> None:
    """A worker must train on the very samples the index recorded: same ids, same content."""
    ids = [x for s in task.job.slice_ids for x in s]
    absent = [x for x in ids if x not in data.row_of]
    if absent:
        raise SisaError(f"{len(absent)} retained samples, e.g. {absent[0]!r}, are missing from "
                        f"{task.dataset} on worker host {host}")
    rows = torch.tensor([data.row_of[x] for x in ids], dtype=torch.long)
    train = data.dataset.train
    hashes = Split(ids, train.images[rows], train.labels[rows], [None] * len(ids)).sample_hashes()
    if hashlib.sha256("".join(hashes).encode()).hexdigest() != task.data_sha256:
        raise SisaError(f"{task.dataset} on worker host {host} differs from the data the run was created "
                        "with: retraining on other data would not be exact")


def _guarded(task: ShardTask, progress: Progress | None) -> Outcome:
    """run_task in a worker process: a failure comes back as a value naming shard and host."""
    try:
        return run_task(task, progress)
    except OutdatedJob as e:
        return ShardFailure.of_outdated(task, e)
    except Exception as e:  # noqa: BLE001: anything a job raises fails that shard, not the others
        text = str(e).splitlines()[0] if str(e) else ""
        what = text if isinstance(e, SisaError) else f"{type(e).__name__}: {text}"
        return ShardFailure(task.job.shard, socket.gethostname(), what)


# --- executors ------------------------------------------------------------------------------
def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but no CUDA GPU is available")
    return device


class LocalExecutor:
    """Shard jobs in this process, on `device`: one after another, or with `jobs` > 1 up to that
    many at once, each in a thread of its own and, on a GPU, on a CUDA stream of its own.

    Jobs at once share one CUDA context, its cuDNN plans and its allocator, and nothing has to
    start: no process, no import, no data load (the gpus executor's worker processes pay all of
    that, and without MPS the GPU time-slices between them instead of running their kernels
    side by side). While one job copies a slice's state to the host, plans a new batch shape or
    sets up an epoch, the others' kernels can keep the GPU busy (whether that pays on an H100 is
    what benchmarks.gpu's concurrent stage measures). Each job's result is the one it would be
    alone: its randomness comes from its own generators (initial weights are drawn under a lock,
    sisa.training.initial_state), and the numeric switches of the run's config are set once for
    all of them. On a CPU the jobs share its cores, each with the command's thread count (the
    bits depend on it): two digits jobs at once took 0.91x the time on 2 cores
    (benchmarks/results/executors_cpu.md), but a very small model's threads can contend so much
    that it takes many times longer."""

    def __init__(self, jobs: int = 1):
        if jobs < 1:
            raise UsageError(f"--jobs-per-gpu must be at least 1, got {jobs}")
        self.jobs = jobs

    def run(self, tasks: list[ShardTask], device: str, progress: Progress | None = None,
            data: Dataset | None = None) -> Iterator[tuple[ShardTask, Outcome]]:
        dev = str(pick_device(device))  # checked now, before the first job starts
        if self.jobs > 1 and len(tasks) > 1:
            return self._run_at_once(tasks, dev, progress, data)
        return self._run(tasks, dev, progress, data)

    def _run(self, tasks, device, progress, data):
        indexed = _index_data(data) if tasks and data is not None else None
        for task in tasks:
            # A failure propagates unchanged: the shards before it are already live.
            try:
                outcome = run_task(replace(task, device=device), progress, indexed)
            except OutdatedJob as e:
                outcome = ShardFailure.of_outdated(task, e)
            yield task, outcome

    def _run_at_once(self, tasks, device, progress, data):
        from .training import numerics

        indexed = _index_data(data) if data is not None else None
        reports: queue.SimpleQueue = queue.SimpleQueue()  # the jobs' progress, reported from this thread
        stop = threading.Event()

        def report(*p) -> None:  # called after every batch of every job: where a job stops early
            if stop.is_set():
                raise _Stopped()
            if progress:
                reports.put(p)

        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:  # "cuda" is this thread's current GPU: name it for the job threads
            dev = torch.device("cuda", torch.cuda.current_device())
            device = str(dev)
        # Set once for all jobs: a job's own numerics() then finds them set and restores them as found.
        with numerics(RunConfig.from_json(tasks[0].config_json), dev):
            pool = ThreadPoolExecutor(self.jobs, thread_name_prefix="shard-job")
            try:
                futures = {pool.submit(_on_own_stream, replace(task, device=device), report, indexed): task
                           for task in tasks}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    _drain_queue(reports, progress)
                    for f in done:
                        # A failure propagates unchanged, once the jobs running beside it have
                        # stopped (below): shards already yielded are live, and what the stopped
                        # jobs wrote is reused by --resume (Run._adopt_staged).
                        yield futures[f], f.result()
            finally:
                stop.set()  # a failure, or the caller closed this generator: end the other jobs too
                pool.shutdown(wait=True, cancel_futures=True)
        _drain_queue(reports, progress)


class _Stopped(Exception):
    """Raised inside a job running beside one that failed: it ends at its next batch."""


_job_thread = threading.local()  # a job thread's CUDA stream, kept for the next job it runs


def _on_own_stream(task: ShardTask, progress: Progress, data: _Data | None) -> Outcome:
    """run_task in a job thread, on that thread's own CUDA stream when the device is a GPU (one
    stream per thread, not per job: the allocator reuses a freed block on its stream only)."""
    device = torch.device(task.device)
    stream = None
    if device.type == "cuda":  # (a device with its index: _run_at_once names it)
        stream = getattr(_job_thread, "stream", None)
        if stream is None or stream.device != device:
            stream = _job_thread.stream = torch.cuda.Stream(device)
    try:
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            outcome = run_task(task, progress, data)
            if stream is not None:
                stream.synchronize()  # the job's last kernels have run when its result is reported
            return outcome
    except OutdatedJob as e:
        return ShardFailure.of_outdated(task, e)


class GpuExecutor:
    """`jobs_per_device` worker processes per visible CUDA GPU, started with `spawn` (a forked
    process cannot use CUDA once the parent has touched it). Each worker is pinned to one device
    and takes the next job when it is free, so up to len(devices) * jobs_per_device jobs run at
    once. A small shard's batches leave most of a large GPU idle; several jobs per GPU fill it.

    A job runs alone in its process either way (same code, data, seed and thread count), so its
    result is the one it would be alone. On a GPU, that holds while memory suffices: each worker
    has its own CUDA context and allocator, and cuDNN skips an algorithm whose workspace it
    cannot allocate. Without NVIDIA MPS the GPU time-slices between processes, so the gain is
    the time one job leaves the GPU idle (kernel launches, host work, checkpoint writes).

    `devices` names other devices to run the same worker processes on (["cpu"]: how the tests
    exercise this executor on a machine without a GPU)."""

    def __init__(self, devices: list[str] | None = None, jobs_per_device: int = 1):
        if jobs_per_device < 1:  # checked first: a bad option is reported as such, GPUs or not
            raise UsageError(f"--jobs-per-gpu must be at least 1, got {jobs_per_device}")
        if devices is None:
            if torch.cuda.device_count() == 0:
                seen = os.environ.get("CUDA_VISIBLE_DEVICES")
                raise UsageError("--executor gpus needs CUDA GPUs, but torch sees none"
                                 + (f" (CUDA_VISIBLE_DEVICES={seen!r})" if seen is not None else "")
                                 + "; use --executor local")
            devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        self.devices, self.jobs_per_device = devices, jobs_per_device

    @property
    def slots(self) -> list[str]:
        """The device of each worker process, GPUs in turn: fewer jobs than slots spread over
        every GPU before any GPU takes a second job."""
        return [d for _ in range(self.jobs_per_device) for d in self.devices]

    def run(self, tasks, device, progress=None, data=None):
        if device not in ("auto", "cuda"):
            raise UsageError(f"--executor gpus trains on every GPU; it cannot use --device {device}")
        return self._run(tasks, progress)

    def _run(self, tasks, progress):
        if not tasks:
            return
        ctx = multiprocessing.get_context("spawn")
        devices, events = ctx.Queue(), ctx.Queue()
        workers = min(len(self.slots), len(tasks))
        for d in self.slots[:workers]:  # each worker's initializer takes one
            devices.put(d)
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_device_worker_init,
                                 initargs=(devices, events)) as pool:
            futures = {pool.submit(_device_job, task): task for task in tasks}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain_queue(events, progress)
                for f in done:
                    task = futures[f]
                    try:
                        outcome = f.result()
                    except Exception as e:  # noqa: BLE001: the worker process died (BrokenProcessPool)
                        outcome = ShardFailure(task.job.shard, socket.gethostname(), f"{type(e).__name__}: {e}")
                    yield task, outcome
        _drain_queue(events, progress)  # workers flush what they put before they exit


_device: str | None = None  # the device of this worker process
_events = None  # its queue of progress reports to the coordinator


def _device_worker_init(devices, events) -> None:
    global _device, _events
    _device, _events = devices.get(), events
    if _device.startswith("cuda"):
        torch.cuda.set_device(_device)


def _throttled(report: Progress, every: float = 0.5) -> Progress:
    """Progress reports cross a process boundary: send at most one per `every` seconds, besides
    the first of each slice and the last."""
    last, last_slice = -every, None

    def send(shard: int, slice_: int, done: int, total: int) -> None:
        nonlocal last, last_slice
        now = time.monotonic()
        if now - last >= every or done == total or slice_ != last_slice:
            last, last_slice = now, slice_
            report(shard, slice_, done, total)
    return send


def _device_job(task: ShardTask) -> Outcome:
    return _guarded(replace(task, device=_device), _throttled(lambda *p: _events.put(p)))


def _drain_queue(events, progress: Progress | None) -> None:
    while True:
        try:
            p = events.get_nowait()
        except queue.Empty:
            return
        if progress:
            progress(*p)


class RayExecutor:
    """One Ray task per shard job. `address` joins a running cluster ("auto", "ray://host:10001",
    "host:6379"); without it, a Ray instance already started in this process is used, else Ray's
    own rule applies (RAY_ADDRESS, then a cluster `ray start` began on this machine, else a new
    local instance for the duration of the run). `gpus_per_task` may be fractional (0.2: five
    jobs share a GPU); by default 1 when the cluster has GPUs and the device is not cpu, else 0.
    A CPU job reserves as many CPUs as it uses threads (this process's torch thread count, which
    the bits depend on). A task whose worker dies is retried up to `max_retries` times; a job
    that raises is not (it would raise again)."""

    def __init__(self, address: str | None = None, gpus_per_task: float | None = None, max_retries: int = 3):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UsageError("--executor ray needs Ray: pip install \"sisa[ray]\" (or pip install ray)") from None
        if gpus_per_task is not None and gpus_per_task < 0:
            raise UsageError(f"--gpus-per-task must be >= 0, got {gpus_per_task}")
        self.address, self.gpus_per_task, self.max_retries = address, gpus_per_task, max_retries

    def run(self, tasks, device, progress=None, data=None):
        return self._run(tasks, device, progress)

    def _run(self, tasks, device, progress):
        import ray

        if not tasks:
            return
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, include_dashboard=False, logging_level=logging.ERROR,
                     log_to_driver=False)
        try:
            gpus = self.gpus_per_task
            if gpus is None:
                gpus = 1 if device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0
            if device == "auto":
                device = "cuda" if gpus > 0 else "cpu"  # Ray shows a task only the GPUs it was given
            elif device.startswith("cuda") and gpus == 0:
                raise UsageError("--device cuda with --executor ray needs --gpus-per-task > 0")
            cpus = 1
            if device == "cpu":  # never more than the largest node has, or the job could not start
                largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
                cpus = max(1, min(tasks[0].threads, int(largest)))
            board = ray.remote(_ProgressBoard).options(num_cpus=0).remote() if progress else None
            job = ray.remote(_ray_job).options(num_cpus=cpus, num_gpus=gpus, max_retries=self.max_retries,
                                               retry_exceptions=False)
            refs = {job.remote(replace(t, device=device), board): t for t in tasks}
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1, timeout=0.25)
                if board is not None:
                    for p in ray.get(board.drain.remote()):
                        progress(*p)
                for ref in done:
                    task = refs.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.RayError as e:  # the worker died more often than retried
                        outcome = ShardFailure(task.job.shard, "?", f"{type(e).__name__}: {str(e).splitlines()[0]}")
                    yield task, outcome
        finally:
            if started:
                ray.shutdown()


class _ProgressBoard:
    """A Ray actor that collects (shard, slice, done, total) from remote jobs for the CLI."""

    def __init__(self):
        self.events: list[tuple] = []

    def report(self, *p) -> None:
        self.events.append(p)

    def drain(self) -> list[tuple]:
        events, self.events = self.events, []
        return events


def _ray_job(task: ShardTask, board) -> Outcome:
    if board is None:
        return _guarded(task, None)
    import ray

    # Reports are fire and forget, so training never waits on the board. Ray runs one caller's
    # calls in order: waiting for the last one before returning means the coordinator, which
    # drains the board after each finished job, then holds every report of this job.
    last = None

    def report(*p):
        nonlocal last
        last = board.report.remote(*p)

    outcome = _guarded(task, _throttled(report))
    if last is not None:
        ray.get(last)
    return outcome


def make_executor(executor: "str | LocalExecutor | GpuExecutor | RayExecutor | None" = None,
                  ray_address: str | None = None, gpus_per_task: float | None = None, jobs_per_gpu: int = 1):
    """An executor by name (local, gpus, ray), or the one given."""
    if executor is None or executor == "local":
        return LocalExecutor(jobs_per_gpu)
    if executor == "gpus":
        return GpuExecutor(jobs_per_device=jobs_per_gpu)
    if executor == "ray":
        return RayExecutor(ray_address, gpus_per_task)
    if isinstance(executor, str):
        raise UsageError(f"unknown executor {executor!r}: use one of {', '.join(EXECUTORS)}")
    return executor
