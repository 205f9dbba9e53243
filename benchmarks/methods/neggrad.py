"""NegGrad+ (Kurmanji et al., 2023): descend alpha*CE(retain) - (1-alpha)*CE(forget), with forget
batches cycled against the retain batches so every step sees both.

Against the reference (github.com/meghdadk/SCRUB, `negative_grad` / `run_neggrad_epoch` in
`small_scale_unlearning.ipynb` and `large_scale_ictest.ipynb`): there the loss is
alpha*(CE(retain) + wd/2*||theta - theta_original||^2) - (1-alpha)*CE(forget), with wd the
training weight decay (5e-4), minimised by plain SGD (no momentum, no weight decay) for 10 epochs
at lr 0.01, alpha 0.95 (small scale) or 0.9999 (CIFAR-10, retain batches of 128). Ours has no
pull towards the original's weights, uses `common.sgd` (Nesterov momentum 0.9, weight decay
5e-4 towards zero, so about 10x the step of plain SGD at the same lr) and runs 1 or 3 epochs
(GRID); kept so for comparability with earlier benchmark results.
"""
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


