"""Executors (sisa/executors.py). Shard jobs run as tasks on a real local Ray instance (2 CPUs)
give bitwise the checkpoints of the sequential executor, for training and for a forget; a Ray
worker SIGKILLed mid-job is retried and the result is still exact; a shard job that raises fails
the command with one line, keeps the other shard's committed work, and `--resume` finishes it.
The gpus executor needs a GPU: without one it must say so and change nothing; its worker
processes are tested on the CPU, one per device and two sharing one device (really at once,
each job still exact)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import sisa
from cli import app
from sisa import faults
from sisa.audit import audit
from sisa.errors import UsageError
from sisa.executors import GpuExecutor, LocalExecutor, RayExecutor, ShardFailure, make_executor
from sisa.training import ShardJob
from store.index import Index

from .conftest import file_hashes, small_config
from .test_cli import assert_clean_error

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install -e '.[test,ray]'; CI installs it)")


def request_ids(run_dir):
    """Two ids hitting shard 0 from slice 1 and shard 2 from slice 0: two concurrent jobs."""
    index = Index(run_dir / "index.sqlite")
    try:
        pick = {(0, 1, 2), (2, 0, 4)}
        return [s.id for k in (0, 2) for s in index.shard_samples(k) if (s.shard, s.slice, s.position) in pick]
    finally:
        index.close()


def cli(args, run_dir, env=None):
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local Ray, not a cluster
    return subprocess.run([sys.executable, "-m", "cli", *args, "--run-dir", str(run_dir), "--device", "cpu"],
                          env={**environ, **(env or {})}, capture_output=True, text=True, timeout=300)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def stale_shards(run_dir):
    run = sisa.Run.open(run_dir)
    try:
        return sorted(j.shard for j in run.shard_jobs())
    finally:
        run.close()


def assert_audit_ok(run_dir):
    run = sisa.Run.open(run_dir)
    try:
        result = audit(run)
        assert result.ok, result.failures
    finally:
        run.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, trained_template):
    """The forget of `request_ids` done by the sequential executor: live checkpoint hashes."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    shutil.copytree(trained_template, run_dir)
    sisa.forget(run_dir, ids=request_ids(run_dir))
    return file_hashes(run_dir)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# --- without Ray or a GPU -------------------------------------------------------------------
def test_ray_executor_without_ray_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when not installed
    with pytest.raises(UsageError, match=r'pip install "sisa\[ray\]"'):
        make_executor("ray")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_gpus_executor_without_a_gpu_fails_clearly_and_creates_nothing(tmp_path, digits_manifest):
    run_dir = tmp_path / "run"
    result = invoke("train", "--dataset", digits_manifest[0], "--executor", "gpus", "--run-dir", run_dir)
    assert_clean_error(result, 2, "--executor gpus needs CUDA GPUs, but torch sees none")
    assert not run_dir.exists()


def test_worker_processes_of_the_gpus_executor_forget_exactly(trained_run, reference):
    """The gpus executor's spawned worker process, progress queue and results, on the CPU."""
    events = []
    report = sisa.forget(trained_run, ids=request_ids(trained_run), device="auto",
                         executor=GpuExecutor(devices=["cpu"]), progress=lambda *p: events.append(p))
    assert report.shards_retrained == [0, 2]
    assert file_hashes(trained_run) == reference
    assert {(s, i) for s, i, _, _ in events} == {(0, 1), (0, 2), (2, 0), (2, 1), (2, 2)}


def test_two_jobs_per_device_train_exactly(tmp_path, digits_manifest, trained_template):
    """Two worker processes on one device (3 shard jobs): every checkpoint bitwise the local one."""
    train_csv, test_csv = digits_manifest
    events = []
    sisa.train(tmp_path / "run", small_config(train_csv), device="auto", test_manifest=test_csv,
               executor=GpuExecutor(devices=["cpu"], jobs_per_device=2), progress=lambda *p: events.append(p)).close()
    assert file_hashes(tmp_path / "run") == file_hashes(trained_template)
    cfg = small_config(train_csv)
    assert {(s, i) for s, i, _, _ in events} == {(s, i) for s in range(cfg.shards) for i in range(cfg.slices)}


def test_two_jobs_per_device_run_at_once_and_forget_exactly(trained_run, reference, tmp_path, monkeypatch):
    """Proof that two jobs share the device at the same time, independent of timing: the first
    worker to finish an epoch is paused (SISA_FAULT_ACTION=pause, inherited by the spawned
    workers) until the other job has trained to its end, which only a second, concurrent worker
    process can do. A timer releases the pause if that never happens, and the test fails."""
    flag = tmp_path / "paused"
    for name, value in {"SISA_FAULT": "epoch", "SISA_FAULT_ACTION": "pause", "SISA_FAULT_FLAG": str(flag),
                        "SISA_FAULT_ONCE": str(tmp_path / "once")}.items():
        monkeypatch.setenv(name, value)
    paused_at_first_finish = []  # pid of the worker still paused when a job finished, or None

    def progress(shard, slice_, done, total):
        if done == total and not paused_at_first_finish:  # a job's last batch (both jobs have 2+ epochs)
            paused_at_first_finish.append(int(flag.read_text()) if flag.exists() else None)
            flag.unlink(missing_ok=True)

    safety = threading.Timer(240, lambda: flag.unlink(missing_ok=True))
    safety.start()
    try:
        report = sisa.forget(trained_run, ids=request_ids(trained_run), device="auto", progress=progress,
                             executor=GpuExecutor(devices=["cpu"], jobs_per_device=2))
    finally:
        safety.cancel()
        flag.unlink(missing_ok=True)
    [paused] = paused_at_first_finish
    assert paused is not None and paused != os.getpid(), "the jobs did not run at once"
    assert report.shards_retrained == [0, 2]
    assert file_hashes(trained_run) == reference
    assert_audit_ok(trained_run)


def test_jobs_at_once_in_threads_train_exactly(tmp_path, digits_manifest, trained_template):
    """`--executor local --jobs-per-gpu 2`: two shard jobs at a time in threads of this process
    (3 jobs), every checkpoint bitwise the sequential one, every slice reported."""
    train_csv, test_csv = digits_manifest
    events = []
    sisa.train(tmp_path / "run", small_config(train_csv), device="cpu", test_manifest=test_csv,
               executor=LocalExecutor(jobs=2), progress=lambda *p: events.append(p)).close()
    assert file_hashes(tmp_path / "run") == file_hashes(trained_template)
    cfg = small_config(train_csv)
    assert {(s, i) for s, i, _, _ in events} == {(s, i) for s in range(cfg.shards) for i in range(cfg.slices)}


def _fault(monkeypatch, tmp_path, action: str) -> Path:
    """An injected fault at the first epoch any job thread ends, once (the count is per process,
    so it starts from zero here)."""
    flag = tmp_path / "paused"
    for name, value in {"SISA_FAULT": "epoch", "SISA_FAULT_ACTION": action, "SISA_FAULT_FLAG": str(flag),
                        "SISA_FAULT_ONCE": str(tmp_path / "once")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(faults, "_hits", {})
    return flag


def test_jobs_in_threads_run_at_once_and_forget_exactly(trained_run, reference, tmp_path, monkeypatch):
    """Proof that the two jobs of a forget run at once, independent of timing: the first job
    thread to end an epoch is paused until the other job has trained to its end, which only a
    job running beside it can do. A timer releases the pause if that never happens (one after
    another, the paused job would hold up the other), and the test fails."""
    flag = _fault(monkeypatch, tmp_path, "pause")
    paused_at_first_finish = []

    def progress(shard, slice_, done, total):
        if done == total and not paused_at_first_finish:
            paused_at_first_finish.append(flag.exists())
            flag.unlink(missing_ok=True)

    safety = threading.Timer(120, lambda: flag.unlink(missing_ok=True))
    safety.start()
    try:
        report = sisa.forget(trained_run, ids=request_ids(trained_run), device="cpu", progress=progress,
                             executor=LocalExecutor(jobs=2))
    finally:
        safety.cancel()
        flag.unlink(missing_ok=True)
    assert paused_at_first_finish == [True], "the jobs did not run at once"
    assert report.shards_retrained == [0, 2]
    assert file_hashes(trained_run) == reference
    assert_audit_ok(trained_run)


def test_a_failing_job_in_a_thread_stops_the_other_and_resume_finishes_exactly(trained_run, reference, tmp_path,
                                                                                monkeypatch):
    """A job that raises fails the command with its own error once the job beside it has
    stopped; nothing half-done goes live, and --resume finishes both shards exactly."""
    _fault(monkeypatch, tmp_path, "raise")
    with pytest.raises(faults.InjectedFault):
        sisa.forget(trained_run, ids=request_ids(trained_run), device="cpu", executor=LocalExecutor(jobs=2))
    assert not [t for t in threading.enumerate() if t.name.startswith("shard-job")], "a job thread outlived the command"
    assert set(stale_shards(trained_run)) <= {0, 2} and stale_shards(trained_run)
    monkeypatch.delenv("SISA_FAULT")
    run = sisa.Run.open(trained_run)
    try:
        run.resume("cpu", executor=LocalExecutor(jobs=2))
    finally:
        run.close()
    assert file_hashes(trained_run) == reference
    assert_audit_ok(trained_run)


def test_worker_slots_spread_over_devices_before_sharing_one():
    executor = GpuExecutor(devices=["cuda:0", "cuda:1"], jobs_per_device=2)  # devices given: no CUDA needed
    assert executor.slots == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    for name in ("gpus", "local"):
        with pytest.raises(UsageError, match="--jobs-per-gpu must be at least 1, got 0"):
            make_executor(name, jobs_per_gpu=0)  # refused before looking for GPUs


@pytest.mark.parametrize("command", ["train", "forget", "add"])
def test_jobs_per_gpu_option_is_documented_and_checked(tmp_path, digits_manifest, command):
    assert "--jobs-per-gpu" in invoke(command, "--help").output
    run_dir = tmp_path / "run"
    args = {"train": [], "forget": ["--resume"], "add": ["--dataset", digits_manifest[0]]}[command]
    assert_clean_error(invoke(command, *args, "--executor", "ray", "--jobs-per-gpu", 2, "--run-dir", run_dir),
                       2, "--jobs-per-gpu applies only to --executor local or gpus")
    for executor in (["--executor", "gpus"], ["--executor", "local"], []):  # local: the default
        assert_clean_error(invoke(command, *args, *executor, "--jobs-per-gpu", 0, "--run-dir", run_dir), 2,
                           "--jobs-per-gpu must be at least 1, got 0")
    assert not run_dir.exists()


def test_executor_options_are_checked(tmp_path):
    assert_clean_error(invoke("train", "--executor", "cluster", "--run-dir", tmp_path / "run"), 2,
                       "unknown executor 'cluster'")
    assert_clean_error(invoke("train", "--gpus-per-task", "0.5", "--run-dir", tmp_path / "run"), 2,
                       "--ray-address and --gpus-per-task apply only to --executor ray")
    assert not (tmp_path / "run").exists()


# --- Ray, in this process -------------------------------------------------------------------
@needs_ray
def test_ray_train_equals_sequential_and_reports_progress(tmp_path, digits_manifest, trained_template, ray_local):
    train_csv, test_csv = digits_manifest
    events = []
    run = sisa.train(tmp_path / "run", small_config(train_csv), test_manifest=test_csv, executor="ray",
                     progress=lambda *p: events.append(p))
    run.close()
    assert file_hashes(tmp_path / "run") == file_hashes(trained_template)
    # Per-shard progress came back from the remote jobs: every shard reached the end of its last
    # slice (progress counts images trained: done == total), and reported every slice.
    cfg = small_config(train_csv)
    assert {(s, i) for s, i, done, total in events if done == total} >= {(s, cfg.slices - 1) for s in range(cfg.shards)}
    assert {(s, i) for s, i, _, _ in events} == {(s, i) for s in range(cfg.shards) for i in range(cfg.slices)}


@needs_ray
def test_ray_forget_equals_sequential(trained_run, reference, ray_local):
    report = sisa.forget(trained_run, ids=request_ids(trained_run), executor=RayExecutor())
    assert report.shards_retrained == [0, 2] and report.slices_retrained == {0: [1, 2], 2: [0, 1, 2]}
    assert file_hashes(trained_run) == reference
    assert_audit_ok(trained_run)


@needs_ray
def test_a_worker_that_cannot_see_the_run_directory_fails_naming_path_and_host(trained_run, tmp_path, ray_local):
    run = sisa.Run.open(trained_run)
    try:
        task = run._task(ShardJob(0, 0, *run.retained(0)))  # retrain shard 0 from scratch
    finally:
        run.close()
    missing = tmp_path / "not-shared" / "run"
    task = replace(task, run_dir=str(missing), checkpoint_dir=str(missing / "checkpoints"))
    [(_, outcome)] = list(RayExecutor().run([task], "cpu"))
    assert isinstance(outcome, ShardFailure)
    assert f"run directory {missing} is not visible on worker host {outcome.host}" in outcome.error
    assert "filesystem every worker mounts at the same path" in outcome.error


# --- Ray, through the command line (a local Ray instance per command, inheriting its faults) --
@needs_ray
def test_a_killed_ray_worker_is_retried_and_the_forget_stays_exact(trained_run, tmp_path, reference):
    req = tmp_path / "req.csv"
    req.write_text("id\n" + "\n".join(request_ids(trained_run)) + "\n")
    marker = tmp_path / "killed-once"
    result = cli(["forget", "--ids", str(req), "--executor", "ray", "--json"], trained_run,
                 {"SISA_FAULT": "epoch", "SISA_FAULT_ONCE": str(marker)})
    assert result.returncode == 0, result.stderr
    assert marker.exists()  # a worker really was SIGKILLed mid-job
    assert file_hashes(trained_run) == reference
    assert not list((trained_run / "checkpoints").glob(".*.tmp"))
    assert_audit_ok(trained_run)


@needs_ray
def test_a_failing_shard_job_fails_clearly_keeps_the_other_shard_and_resumes(trained_run, tmp_path, reference):
    req = tmp_path / "req.csv"
    req.write_text("id\n" + "\n".join(request_ids(trained_run)) + "\n")
    failed = cli(["forget", "--ids", str(req), "--executor", "ray"], trained_run,
                 {"SISA_FAULT": "epoch", "SISA_FAULT_ACTION": "raise", "SISA_FAULT_ONCE": str(tmp_path / "raised")})
    assert failed.returncode == 1, failed.stderr
    [error] = [line for line in failed.stderr.splitlines() if "error" in line.lower()]  # beside progress bars
    assert error.startswith("error: ") and "Traceback" not in failed.stderr, failed.stderr
    assert "failed on worker host" in error and "InjectedFault: injected fault at epoch" in error
    assert "run again with --resume" in error
    # One of the two jobs raised; the other shard's new checkpoints are live and exact.
    [bad] = stale_shards(trained_run)
    good = 2 if bad == 0 else 0
    assert f"shard {bad} failed" in error and f"shards [{good}] were retrained and are live" in error
    hashes = file_hashes(trained_run)
    assert {k: v for k, v in hashes.items() if k[0] == good} == {k: v for k, v in reference.items() if k[0] == good}

    resumed = cli(["forget", "--resume", "--json"], trained_run)
    assert resumed.returncode == 0, resumed.stderr
    assert file_hashes(trained_run) == reference
    assert_audit_ok(trained_run)
