"""sisa: exact machine unlearning by Sharded, Isolated, Sliced, Aggregated training.

    import sisa
    run = sisa.train("sisa-run", sisa.config_for("digits", shards=5))
    report = sisa.forget("sisa-run", ids=["train-00042"])
    ensemble = sisa.Ensemble.load("sisa-run")
    labels = ensemble.predict(images)          # uint8 (N, C, H, W)

Names are imported on first use, so `import sisa.errors` (which `store` needs) stays light.
No module shares a name with an exported function (a submodule would shadow it).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Ensemble": "aggregate",
    "RunConfig": "config", "slice_epochs": "config",
    "Dataset": "data", "load_dataset": "data",
    "SisaError": "errors", "UsageError": "errors", "IntegrityError": "errors",
    "evaluate": "evaluation",
    "Run": "run", "ForgetReport": "run", "CompleteReport": "run", "config_for": "run",
    "train": "run", "forget": "run", "writer_lock": "run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sisa' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
