"""Test accuracy of each constituent and of the ensemble under both aggregations."""
from __future__ import annotations

from pathlib import Path

import torch

from .aggregate import Ensemble
from .data import load_dataset
from .errors import SisaError
from .run import Run


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return (pred == labels).float().mean().item()


def evaluate(run_dir: Path | str, device: str | torch.device = "cpu") -> dict:
    run = Run.open(run_dir)
    try:
        data = load_dataset(run.config.dataset, run.data_dir or "data", test_manifest=run.test_manifest)
    finally:
        run.close()
    if data.test is None:
        raise SisaError(f"{run.config.dataset} has no test split (create the run with --test-manifest)")
    ens = Ensemble.load(run_dir, device=device)
    logits = ens.constituent_logits(data.test.images)
    labels = data.test.labels
    result = {
        "generation": ens.generation,
        "test_samples": len(labels),
        "constituents": {str(s): accuracy(l.argmax(-1), labels) for s, l in zip(ens.shards, logits)},
    }
    for agg in ("vote", "mean"):
        ens.aggregation = agg
        result[f"ensemble_{agg}"] = accuracy(ens.aggregate(logits).argmax(-1) if agg == "mean"
                                             else ens.predict(data.test.images), labels)
    return result
