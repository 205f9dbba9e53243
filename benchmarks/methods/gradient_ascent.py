"""Gradient ascent (GA): ascend the cross-entropy on the forget set.

`unlearn` is plain GA (OPTML's recipe: a few epochs at a small lr). `unlearn_dual` is the
dual-phase form: each epoch an ascent pass on the forget set at lr*beta, then a descent pass on
the retain set at lr, which repairs what the ascent broke. With `decay_epoch` both lrs are
multiplied by `decay` from that epoch on (0-based), the schedule of the data-modification study's
gradient ascent (`data_modification`, whose relearning comparison passes `history`: one
`common.epoch_record` per epoch, after both passes; recording changes nothing in the result).

Against SalUn's `Classification/unlearn/GA.py` (github.com/OPTML-Group/Unlearn-Saliency): plain
GA there is SGD with momentum 0.9 and weight decay 5e-4 at a constant lr over the forget set
only; ours matches that except that `common.sgd`'s momentum is Nesterov's. The dual-phase form
has no single reference; its ascent runs without weight decay.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sisa.partition import derive_seed

from .common import Task, batches, epoch_record, sgd

GRID = [dict(epochs=5, lr=1e-3), dict(epochs=5, lr=1e-4), dict(epochs=1, lr=1e-2), dict(epochs=5, lr=1e-2)]
DUAL_GRID = [dict(epochs=e, lr=lr, beta=0.3) for e in (1, 2) for lr in (0.01, 0.05)]


def _pass(model, opt, task: Task, rows, gen, sign: float) -> None:
    for x, y in batches(task, rows, gen):
        loss = sign * F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def unlearn(original, task: Task, epochs: int, lr: float, seed: int = 0):
    model = copy.deepcopy(original).train()
    gen = torch.Generator().manual_seed(derive_seed(seed, "ga"))
    opt = sgd(model, lr)  # weight decay 5e-4, as SalUn's GA
    for _ in range(epochs):
        _pass(model, opt, task, task.forget, gen, sign=-1.0)
    return model.eval()


def unlearn_dual(original, task: Task, epochs: int, lr: float, beta: float = 0.3, decay_epoch: int | None = None,
                 decay: float = 0.1, history: list | None = None, eval_fn: Callable | None = None, seed: int = 0):
    model = copy.deepcopy(original).train()
    gen = torch.Generator().manual_seed(derive_seed(seed, "ga-dual"))
    ascent, descent = sgd(model, lr * beta, weight_decay=0.0), sgd(model, lr)
    for epoch in range(epochs):
        if decay_epoch is not None and epoch == decay_epoch:
            for opt in (ascent, descent):
                for g in opt.param_groups:
                    g["lr"] *= decay
        _pass(model, ascent, task, task.forget, gen, sign=-1.0)
        _pass(model, descent, task, task.retain, gen, sign=1.0)
        if history is not None:
            history.append(epoch_record(model, task, epoch + 1, eval_fn))
    return model.eval()
