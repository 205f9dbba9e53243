"""The ensemble: each shard's final checkpoint votes, or their softmaxes are averaged.

Aggregation is not trained (a learned aggregator would see training data and need unlearning
too). A loaded Ensemble remembers the run's generation; after a forget finishes the generation
moves on, `is_stale()` says so and `reload()` serves the new models. A prediction made while a
forget is still running uses the models of the last finished state: each shard's new
checkpoints go live together, in one transaction, only once they are all written.
"""
from __future__ import annotations

from pathlib import Path

import torch

from store.checkpoints import load_checkpoint
from store.index import ACTIVE, Checkpoint, Index, RunRow, Sample
from sqlalchemy import func, select

from .config import RunConfig
from .errors import IntegrityError, SisaError, UsageError
from .model import to_input

AGGREGATIONS = ("vote", "mean")


class Ensemble:
    def __init__(self, run_dir: Path, config: RunConfig, shards: list[int], models: list[torch.nn.Module],
                 generation: int, aggregation: str = "vote", device: torch.device | str = "cpu",
                 checkpoints: list[str] | None = None, trunk: torch.nn.Module | None = None):
        if aggregation not in AGGREGATIONS:
            raise UsageError(f"unknown aggregation {aggregation!r}: use one of {', '.join(AGGREGATIONS)}")
        self.run_dir, self.config, self.shards, self.models = Path(run_dir), config, shards, models
        self.generation, self.aggregation, self.device = generation, aggregation, torch.device(device)
        self.checkpoints = checkpoints or []  # the sha256 each model was loaded from
        self.trunk = trunk  # a frozen trunk shared by every constituent: run once per batch
        if config.frozen and trunk is None:
            from .backbone import build_trunk
            from .executors import run_init_state

            self.trunk = build_trunk(config, run_init_state(self.run_dir, config)).to(self.device)

    @classmethod
    def load(cls, run_dir: Path | str, aggregation: str = "vote", device: torch.device | str = "cpu",
             reuse: "Ensemble | None" = None) -> "Ensemble":
        """Load each non-empty shard's last-slice checkpoint, verified against its sha256. From
        `reuse` (an ensemble of the same run and config), constituents whose checkpoint did not
        change and the frozen trunk are taken as they are rather than loaded again."""
        run_dir = Path(run_dir)
        if not (run_dir / "index.sqlite").is_file():
            raise UsageError(f"no SISA run at {run_dir}")
        index = Index(run_dir / "index.sqlite")
        try:
            for attempt in range(3):  # a forget may swap files between our read and our load
                with index.transaction() as s:  # one snapshot: generation and rows agree
                    run = s.get(RunRow, 1)
                    config = RunConfig.from_json(run.config_json)
                    last = config.slices - 1
                    rows = list(s.scalars(select(Checkpoint).where(Checkpoint.slice == last).order_by(Checkpoint.shard)))
                    live = dict(s.execute(select(Sample.shard, func.count()).where(Sample.status == ACTIVE)
                                          .group_by(Sample.shard)).all())
                rows = [r for r in rows if live.get(r.shard, 0) > 0]  # a shard with no data has no model
                if not rows:
                    raise SisaError(f"{run_dir} has no trained constituents (run `sisa train --resume`)")
                same = reuse is not None and reuse.config.config_hash == config.config_hash
                kept = dict(zip(reuse.checkpoints, reuse.models)) if same else {}
                try:
                    models = [kept[r.sha256] if r.sha256 in kept else cls._load_model(run_dir / r.path, r.sha256, config, device)
                              for r in rows]
                    return cls(run_dir, config, [r.shard for r in rows], models, run.generation, aggregation, device,
                               [r.sha256 for r in rows], reuse.trunk if same else None)
                except IntegrityError:
                    if attempt == 2 or all((run_dir / r.path).exists() for r in rows):
                        raise
        finally:
            index.close()
        raise AssertionError("unreachable")

    @staticmethod
    def _load_model(path: Path, sha256: str, config: RunConfig, device) -> torch.nn.Module:
        from .training import build_trainable, prepare

        state = load_checkpoint(path, sha256)
        model = build_trainable(config)  # the whole network, or the head on a frozen trunk
        model.load_state_dict(state["model"])
        return prepare(config, model.to(device)).eval()

    def current_generation(self) -> int:
        index = Index(self.run_dir / "index.sqlite")
        try:
            return index.run().generation
        finally:
            index.close()

    def is_stale(self) -> bool:
        """True once a forget (or a resumed training) has changed the run since this was loaded."""
        return self.current_generation() != self.generation

    def reload(self) -> "Ensemble":
        """The run's current ensemble; unchanged constituents and the trunk are shared with this one
        (inference never writes to them, so both can predict at once)."""
        return Ensemble.load(self.run_dir, self.aggregation, self.device, reuse=self)

    # --- prediction --------------------------------------------------------------------
    @torch.no_grad()
    def constituent_logits(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Logits of every constituent, shape (models, N, classes), each batch through every model
        on the device in the run's precision (bf16 runs infer in bf16). The frozen trunk runs as
        it did when the cached features were computed."""
        from .training import forward

        self._check_shape(images)
        batch_size = batch_size or (8192 if self.device.type == "cuda" else 1024)
        out = []
        for chunk in torch.split(images, batch_size):
            chunk = chunk.to(self.device, non_blocking=True)
            x = self.trunk(chunk) if self.trunk is not None else to_input(chunk)
            out.append(torch.stack([forward(self.config, m, x) for m in self.models]))
        return torch.cat(out, dim=1).cpu()

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """(N, classes): the fraction of votes per class, or the mean softmax ("mean")."""
        return self.aggregate(self.constituent_logits(images))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) class indices. Vote ties go to the class with the larger summed softmax."""
        logits = self.constituent_logits(images)
        proba = self.aggregate(logits)
        if self.aggregation == "vote":
            proba = proba + 1e-6 * logits.softmax(-1).mean(0)  # below one vote's weight of 1/S
        return proba.argmax(-1)

    def aggregate(self, logits: torch.Tensor) -> torch.Tensor:
        if self.aggregation == "mean":
            return logits.softmax(-1).mean(0)
        votes = torch.nn.functional.one_hot(logits.argmax(-1), self.config.classes).float()
        return votes.mean(0)

    def _check_shape(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.config.channels:
            raise UsageError(f"expected images shaped (N, {self.config.channels}, H, W), got {tuple(images.shape)}")
