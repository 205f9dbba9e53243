"""Retrain: a monolithic ResNet-18 trained from scratch on the retain set, the gold standard."""
from __future__ import annotations

from .common import Task, new_model, train


def unlearn(task: Task, epochs: int, lr: float, seed: int = 0):
    return train(new_model(task, seed), task, task.retain, epochs, lr, seed=seed)
