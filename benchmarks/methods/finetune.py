"""Fine-tune (FT): continue training the original model on the retain set only, hoping it
overwrites what it knew about the forget set (NeurIPS 2023 kit: SGD, momentum 0.9, wd 5e-4,
cosine schedule)."""
from __future__ import annotations

import copy

from .common import Task, train

GRID = [dict(epochs=e, lr=lr) for e in (1, 3) for lr in (0.01, 0.1)]


def unlearn(original, task: Task, epochs: int, lr: float, seed: int = 0):
    return train(copy.deepcopy(original), task, task.retain, epochs, lr, kind="cosine", seed=seed + 1)
