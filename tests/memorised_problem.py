"""The small problem the unlearning-method tests share: Gaussian class clusters standing in for a
frozen trunk's features, whose first NF rows carry wrong labels. A model that gets those right has
memorised them (a retrained one would not), so an unlearning method has something to forget."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from benchmarks.methods.common import Task, logits_of, new_model, train

C, D, N, NF = 4, 64, 160, 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread only waits (measured 30x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def feature_task(batch_size: int) -> Task:
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(C, D, generator=gen)
    labels = torch.arange(N) % C
    feats = centres[labels] + torch.randn(N, D, generator=gen)
    labels[:NF] = (labels[:NF] + torch.randint(1, C, (NF,), generator=gen)) % C
    rows = torch.arange(N)
    return Task(feats, labels, rows[NF:], rows[:NF], C, batch_size=batch_size, seed=1,
                head=lambda: torch.nn.Linear(D, C))


def memorise(task: Task) -> torch.nn.Module:
    """The original: a linear head trained on every row (batch 32) until it fits all of them."""
    everything = replace(task, retain=torch.arange(N), batch_size=32)
    model = train(new_model(task, 1), everything, everything.retain, epochs=40, lr=0.1, seed=1)
    assert accuracy(model, task, task.forget) == 1.0, "the original must have memorised its forget set"
    assert accuracy(model, task, task.retain) == 1.0
    return model


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def accuracy(model, task, rows) -> float:
    return (logits_of(model, task.images[rows]).argmax(-1) == task.labels[rows]).float().mean().item()
