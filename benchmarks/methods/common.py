"""What the unlearning methods share: a monolithic model, its training loop, the data they see.

The monolithic model uses the project's own constituent (sisa.model) and input pipeline
(sisa.training.augment, sisa.model.to_input), so Retrain, the approximate methods and SISA
differ only in what they do, not in how a model is built or fed.

In the public-backbone regime a Task holds a frozen trunk's cached features (floats) instead of
images and names the head to train (`head`): every method then runs on the head alone, as SISA's
constituents do, with the features fed as they are (no normalisation, no augmentation).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sisa.model import build_model, to_input
from sisa.partition import derive_seed
from sisa.training import augment


@dataclass
class Task:
    """One unlearning problem: the full training tensors and which rows to keep or forget."""

    images: torch.Tensor  # uint8 (N, C, H, W), on the training device
    labels: torch.Tensor
    retain: torch.Tensor  # row indices
    forget: torch.Tensor
    classes: int
    crop_pad: int = 0
    flip: bool = False
    batch_size: int = 64
    seed: int = 0
    head: Callable[[], nn.Module] | None = None  # features, not images: builds the head to train

    @property
    def channels(self) -> int:
        return self.images.shape[1]


def new_model(task: Task, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "monolithic-init"))
        model = task.head() if task.head is not None else build_model("resnet18", task.channels, task.classes)
    return model.to(task.images.device)


def inputs(x: torch.Tensor) -> torch.Tensor:
    """uint8 images to the network's input range; features (floats) as they are."""
    return to_input(x) if x.dtype == torch.uint8 else x


def batches(task: Task, rows: torch.Tensor, gen: torch.Generator, augmented: bool = True):
    """Shuffled, augmented (x, y) batches over `rows`; near-equal sizes, none of one sample."""
    order = rows[torch.randperm(len(rows), generator=gen).to(rows.device)]
    n_batches = max(1, math.ceil(len(order) / task.batch_size))
    for idx in torch.tensor_split(order, n_batches):
        x = task.images[idx]
        if augmented:
            x = augment(x, task.crop_pad, task.flip, gen)
        yield inputs(x), task.labels[idx]


def sgd(model: nn.Module, lr: float, weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)


def schedule(kind: str, lr: float, total: int) -> Callable[[int], float]:
    """lr at step t: "cosine" (decay to 0), "constant", or "onecycle" (linear warm-up 20%, linear decay)."""
    if kind == "cosine":
        return lambda t: lr * 0.5 * (1 + math.cos(math.pi * t / total))
    if kind == "constant":
        return lambda t: lr
    warm = max(1, round(0.2 * total))
    return lambda t: lr * (t + 1) / warm if t < warm else lr * (total - t) / max(1, total - warm)


def fit(model: nn.Module, task: Task, rows: torch.Tensor, epochs: int, lr: float, gen: torch.Generator,
        loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], kind: str = "onecycle") -> nn.Module:
    """`epochs` passes over `rows` (augmented batches from `gen`) minimising `loss_of(x, y)`, the
    lr on `kind`'s schedule (see `schedule`); train mode while it runs, eval mode after."""
    opt = sgd(model, lr)
    per_epoch = max(1, math.ceil(len(rows) / task.batch_size))
    lr_at = schedule(kind, lr, max(1, epochs * per_epoch))
    model.train()
    step = 0
    for _ in range(epochs):
        for x, y in batches(task, rows, gen):
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = loss_of(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return model.eval()


def train(model: nn.Module, task: Task, rows: torch.Tensor, epochs: int, lr: float, kind: str = "onecycle",
          seed: int = 0) -> nn.Module:
    """Plain supervised training on `rows` (used by the original model, Retrain and Fine-tune)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "monolithic-train"))
    return fit(model, task, rows, epochs, lr, gen, lambda x, y: F.cross_entropy(model(x), y), kind)


def accuracy(model: nn.Module, task: Task, rows: torch.Tensor) -> float:
    """Top-1 accuracy (0..1) on `rows`, un-augmented, in eval mode; nan for no rows."""
    if len(rows) == 0:
        return float("nan")
    pred = logits_of(model, task.images[rows]).argmax(-1)
    return (pred == task.labels[rows].cpu()).float().mean().item()


def epoch_record(model: nn.Module, task: Task, epoch: int, eval_fn: Callable[[nn.Module], dict] | None = None) -> dict:
    """One entry of a method's per-epoch history: the epoch and the forget/retain accuracy, plus
    `eval_fn(model)`'s entries. Draws no randomness and leaves batch-norm statistics untouched
    (eval mode), so recording a history changes nothing in the result."""
    was_training = model.training
    model.eval()
    entry = {"epoch": epoch, "forget_acc": accuracy(model, task, task.forget),
             "retain_acc": accuracy(model, task, task.retain)}
    if eval_fn is not None:
        with torch.no_grad():
            entry.update(eval_fn(model))
    model.train(was_training)
    return entry


@torch.no_grad()
def logits_of(model: nn.Module, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(inputs(x)).float() for x in torch.split(images, batch)]).cpu()
