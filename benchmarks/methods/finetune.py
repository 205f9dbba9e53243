"""Fine-tune (FT): continue training the original model on the retain set only, hoping it
overwrites what it knew about the forget set (NeurIPS 2023 kit: SGD, momentum 0.9, wd 5e-4,
cosine schedule).

Against the references: the kit runs 5 epochs at lr 0.1; SalUn's `Classification/unlearn/FT.py`
(github.com/OPTML-Group/Unlearn-Saliency) uses SGD with plain momentum 0.9, wd 5e-4, a constant
lr (its MultiStepLR milestones, 91 and 136, are never reached) and batches of 256, 10 epochs at
lr 0.01-0.1; SCRUB's notebooks fine-tune with plain SGD (no momentum, no weight decay) at lr
0.01 for 10 epochs. Ours uses `common.train`: Nesterov momentum, a cosine decay to 0, and 1 or 3
epochs (GRID), so at equal epochs it takes smaller late steps than SalUn's constant lr.
"""
from __future__ import annotations

import copy

from .common import Task, train

GRID = [dict(epochs=e, lr=lr) for e in (1, 3) for lr in (0.01, 0.1)]


def unlearn(original, task: Task, epochs: int, lr: float, seed: int = 0):
    return train(copy.deepcopy(original), task, task.retain, epochs, lr, kind="cosine", seed=seed + 1)
