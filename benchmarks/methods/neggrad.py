"""NegGrad+ (Kurmanji et al., 2023): descend alpha*CE(retain) - (1-alpha)*CE(forget), with forget
batches cycled against the retain batches so every step sees both."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from sisa.partition import derive_seed

from .common import Task, batches, sgd

GRID = [dict(epochs=e, lr=0.01, alpha=a) for e in (1, 3) for a in (0.95, 0.99)]


def unlearn(original, task: Task, epochs: int, lr: float, alpha: float, seed: int = 0):
    model = copy.deepcopy(original).train()
    gen = torch.Generator().manual_seed(derive_seed(seed, "neggrad+"))
    opt = sgd(model, lr)

    def forget_batches():
        while True:
            yield from batches(task, task.forget, gen)

    for _ in range(epochs):
        for (xr, yr), (xf, yf) in zip(batches(task, task.retain, gen), forget_batches()):
            loss = alpha * F.cross_entropy(model(xr), yr) - (1 - alpha) * F.cross_entropy(model(xf), yf)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


