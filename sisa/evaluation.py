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
    from .imagecache import open_dataset

    run = Run.open(run_dir)
    try:  # the run's image cache, if it has one: the test split is not decoded again
        data = (open_dataset(run.dir, run.index, run.config.dataset, run.config.class_names)
                or load_dataset(run.config.dataset, run.data_dir or "data", test_manifest=run.test_manifest,
                                size=run.config.resize or None))
    finally:
        run.close()
    if data.test is None:
        raise SisaError(f"{run.config.dataset} has no test split (create the run with --test-manifest or --test-dir)")
    ens = Ensemble.load(run_dir, device=device)
    logits = ens.constituent_logits(data.test.images)
    labels = data.test.labels
    result = {
        "generation": ens.generation,
        "test_samples": len(labels),
        "constituents": {str(s): accuracy(l.argmax(-1), labels) for s, l in zip(ens.shards, logits)},
    }
    result.update(ensemble_accuracy(ens, logits, labels))
    return result


def ensemble_accuracy(ens: Ensemble, logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """{"ensemble_vote", "ensemble_mean"}: the ensemble's accuracy under both aggregations, from
    the constituents' logits computed once (vote ties broken as `Ensemble.predict` breaks them)."""
    out, kept = {}, ens.aggregation
    try:
        for agg in ("vote", "mean"):
            ens.aggregation = agg
            proba = ens.aggregate(logits)
            if agg == "vote":
                proba = proba + 1e-6 * logits.softmax(-1).mean(0)
            out[f"ensemble_{agg}"] = accuracy(proba.argmax(-1), labels)
    finally:
        ens.aggregation = kept
    return out


def holdout_accuracy(run: Run, device: str | torch.device = "cpu") -> dict | None:
    """The ensemble's test accuracy for the end of `train` and `forget` ({"test_accuracy": vote,
    "test_accuracy_mean", "test_samples", "seconds"}), on the run's data as already loaded; None
    when the data set has no test split."""
    import time

    start = time.perf_counter()
    test = run.dataset().test
    if test is None:
        return None
    ens = Ensemble.load(run.dir, device=device)
    acc = ensemble_accuracy(ens, ens.constituent_logits(test.images), test.labels)
    return {"test_accuracy": acc["ensemble_vote"], "test_accuracy_mean": acc["ensemble_mean"],
            "test_samples": len(test), "seconds": time.perf_counter() - start}
