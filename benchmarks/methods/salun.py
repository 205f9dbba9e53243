"""SalUn (Fan et al., ICLR 2024, "SalUn: Empowering Machine Unlearning via Gradient-based Weight
Saliency"): random-label unlearning restricted to the weights most salient for the forget set.

1. Saliency mask (`saliency_mask`): with the original in eval mode, sum over forget batches the
   gradient of the batch-mean cross-entropy, take its magnitude per weight, rank all parameters
   of the model together, and keep the top `ratio` share (int(ratio * n) weights; ties broken
   by position, so the mask is deterministic).
2. Random labels (`unlearn`): each epoch one pass over the forget set with every label replaced
   by a class drawn at random (see deviations), then one pass over the retain set with the true
   labels; SGD (momentum 0.9, weight decay 5e-4, constant lr). After every step the weights
   outside the mask are put back to the original's values and their momentum is cleared, so
   only masked weights ever change (weight decay would otherwise move them).

Reference (github.com/OPTML-Group/Unlearn-Saliency, read at a6e89fd): `Classification/generate_mask.py`
(`save_gradient_ratio`: eval mode, |sum of forget-batch gradients|, global rank, masks
`with_{0.1..1.0}.pt`), `Classification/unlearn/RL.py` (CIFAR-10/SVHN branch: forget pass with
`torch.randint(0, num_classes)` labels, then retain pass; gradients masked;
`_restore_masked_params` resets unmasked weights and momentum), `Classification/unlearn/impl.py`
(SGD, MultiStepLR at epochs 91 and 136, i.e. constant over 10 epochs), `Classification/arg_parser.py`
(batch 256, momentum 0.9, wd 5e-4) and `Classification/README.md`'s CIFAR-10 ResNet-18 example:
`--unlearn RL --unlearn_epochs 10 --unlearn_lr 0.013 --mask_path mask/with_0.5.pt`. That recipe
is GRID[0].

Deviations:
  - Random labels are random *wrong* classes (y + U{1..C-1} mod C), drawn afresh every batch from
    this method's generator; the reference draws uniformly over all C classes, so about 1/C of its
    "random" labels are the true ones.
  - Batches (size, augmentation) are the task's (`common.batches`), not a fixed 256.
  - Batch-norm running statistics are buffers, not parameters: as in the reference they are not
    masked and move during the train-mode passes.
  - Resetting the unmasked weights after each step came to the reference in a6e89fd ("Fix weight
    decay", 2026); the code behind the paper's numbers only masked the gradients, so weight decay
    and momentum still moved unmasked weights a little. Here, as now there, they never move.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from sisa.partition import derive_seed

from .common import Task, batches

GRID = [
    dict(epochs=10, lr=0.013, ratio=0.5),  # the reference's CIFAR-10 ResNet-18 recipe
    dict(epochs=3, lr=0.013, ratio=0.5),
    dict(epochs=10, lr=0.013, ratio=0.2),
    dict(epochs=3, lr=0.05, ratio=0.5),
]


def saliency_mask(model: nn.Module, task: Task, ratio: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Boolean mask per parameter name: the top `ratio` share of all weights by |forget-set gradient|."""
    model = copy.deepcopy(model).eval()
    params = dict(model.named_parameters())
    grads = {name: torch.zeros_like(p) for name, p in params.items()}
    for x, y in batches(task, task.forget, gen):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        for name, p in params.items():
            if p.grad is not None:
                grads[name] += p.grad
    magnitude = torch.cat([g.abs().flatten() for g in grads.values()])
    n, keep = len(magnitude), int(len(magnitude) * ratio)
    if keep == 0:
        flat = torch.zeros(n, dtype=torch.bool, device=magnitude.device)
    else:  # the keep-th largest value by selection (a full sort of ResNet-18's 11M weights is 8x slower)
        threshold = torch.kthvalue(magnitude, n - keep + 1).values
        flat = magnitude > threshold
        ties = (magnitude == threshold).nonzero().flatten()
        flat[ties[: keep - int(flat.sum())]] = True  # ties to the earliest positions
    masks, start = {}, 0
    for name, g in grads.items():
        masks[name] = flat[start:start + g.numel()].view_as(g)
        start += g.numel()
    return masks


def unlearn(original, task: Task, epochs: int, lr: float, ratio: float = 0.5, weight_decay: float = 5e-4,
            seed: int = 0):
    gen = torch.Generator().manual_seed(derive_seed(seed, "salun"))
    mask = saliency_mask(original, task, ratio, gen)
    model = copy.deepcopy(original).train()
    params = dict(model.named_parameters())
    theta0 = {name: p.detach().clone() for name, p in params.items()}
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for name, p in params.items():  # as the reference; the reset below alone would do
            if p.grad is not None:
                p.grad.mul_(mask[name])
        opt.step()
        with torch.no_grad():  # weight decay moved the unmasked weights too: put them back
            for name, p in params.items():
                p.copy_(torch.where(mask[name], p, theta0[name]))
                buf = opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buf.mul_(mask[name])

    for _ in range(epochs):
        for x, y in batches(task, task.forget, gen):
            shift = torch.randint(1, task.classes, y.shape, generator=gen).to(y.device)
            step(x, (y + shift) % task.classes)
        for x, y in batches(task, task.retain, gen):
            step(x, y)
    return model.eval()
