"""sisa: exact machine unlearning by Sharded, Isolated, Sliced, Aggregated training.

    import sisa
    run = sisa.train("sisa-run", sisa.config_for("digits", shards=5))
    report = sisa.forget("sisa-run", ids=["train-00042"])
    ensemble = sisa.Ensemble.load("sisa-run")
    labels = ensemble.predict(images)          # uint8 (N, C, H, W)
"""
from __future__ import annotations

from pathlib import Path

from .aggregate import Ensemble
from .config import RunConfig, slice_epochs
from .data import Dataset, load_dataset
from .errors import IntegrityError, SisaError, UsageError
from .evaluate import evaluate
from .run import CompleteReport, ForgetReport, Run, config_for, writer_lock

__all__ = ["Ensemble", "RunConfig", "Run", "Dataset", "ForgetReport", "CompleteReport", "SisaError",
           "UsageError", "IntegrityError", "config_for", "evaluate", "forget", "load_dataset",
           "slice_epochs", "train"]


def train(run_dir: Path | str, config: RunConfig | None = None, device: str = "cpu", progress=None,
          **create_kwargs) -> Run:
    """Create a run (partition + index) and train every shard, slice by slice."""
    run = Run.create(run_dir, config or config_for("digits"), **create_kwargs)
    with writer_lock(run.dir):
        run.complete(device, progress)
    return run


def forget(run_dir: Path | str, ids=(), owners=(), ignore_missing: bool = False, device: str = "cpu",
           progress=None) -> ForgetReport:
    """Exactly unlearn the given sample ids, or every sample of the given owners."""
    run = Run.open(run_dir)
    try:
        with writer_lock(run.dir):
            return run.forget(ids, owners, ignore_missing, device, progress)
    finally:
        run.close()
