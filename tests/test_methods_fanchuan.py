"""The NeurIPS 2023 challenge winner (Fanchuan) and its improved first-stage loss: deterministic,
leave the original alone, the first stage lowers the forget set's confidence, and the variant
changes that loss and nothing else."""
from __future__ import annotations

import math

import pytest
import torch

from benchmarks.methods import fanchuan
from benchmarks.methods.common import Task, logits_of, new_model
from sisa.audit import state_equal
from sisa.data import load_digits
from tests.memorised_problem import accuracy, feature_task, memorise, one_thread, weights  # noqa: F401


@pytest.fixture(scope="module")
def features() -> Task:
    return feature_task(batch_size=8)


@pytest.fixture(scope="module")
def memorised(features):
    return memorise(features)


def confidence(model, task, rows) -> float:
    """Mean softmax probability of the (training) label."""
    p = logits_of(model, task.images[rows]).softmax(-1)
    return p[torch.arange(len(rows)), task.labels[rows]].mean().item()


LOGITS = [[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]


def by_hand(reverse_weight: float) -> float:
    total = 0.0
    for row in LOGITS:
        z = sum(math.exp(v) for v in row)
        p = [math.exp(v) / z for v in row]
        u = 1 / len(row)
        kl_u_p = sum(u * math.log(u / q) for q in p)
        kl_p_u = sum(q * math.log(q / u) for q in p)
        total += kl_u_p + reverse_weight * kl_p_u
    return total / len(LOGITS)


def test_stage1_losses_match_a_hand_computation():
    logits = torch.tensor(LOGITS, dtype=torch.float64)
    base, improved = by_hand(0.0), by_hand(0.85)
    assert fanchuan.stage1_loss(logits).item() == pytest.approx(base, rel=1e-12)
    assert fanchuan.stage1_loss(logits, fanchuan.REVERSE_WEIGHT).item() == pytest.approx(improved, rel=1e-12)
    assert improved > base + 0.1  # the terms differ, so the check can tell them apart
    assert fanchuan.stage1_loss(torch.zeros(2, 3)).item() == pytest.approx(0.0, abs=1e-7)  # uniform: no loss


def test_contrastive_objective_by_hand():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    r = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    T = 1.15
    total = 0.0
    for fi in f.tolist():
        s = [sum(a * b for a, b in zip(fi, rj)) / T for rj in r.tolist()]
        lse = math.log(sum(math.exp(v) for v in s))
        total += sum(v - lse for v in s)
    assert fanchuan.contrastive_objective(f, r, T).item() == pytest.approx(total / 6, rel=1e-12)


def test_grid_starts_with_the_sources_recipe():
    assert fanchuan.GRID[0] == dict(epochs=8, lr_first=0.005, lr_forget=3e-4, lr_retain=1e-3, T=1.15)
    assert fanchuan.GRID_IMPROVED == [dict(hp, improved=True) for hp in fanchuan.GRID]


@pytest.mark.parametrize("improved", [False, True])
def test_first_stage_lowers_the_forget_sets_confidence(features, memorised, improved):
    before = confidence(memorised, features, features.forget)
    for lr, drop in ((0.005, 0.0), (0.1, 0.2)):  # the recipe's lr, and a larger one
        after = fanchuan.unlearn(memorised, features, lr_first=lr, improved=improved, stage1_only=True)
        assert confidence(after, features, features.forget) < before - drop


def test_deterministic_and_leaves_the_original_alone(features, memorised):
    hp = fanchuan.GRID[3]
    before = weights(memorised)
    a = fanchuan.unlearn(memorised, features, **hp, seed=0)
    assert state_equal(weights(memorised), before), "the original is not modified"
    assert not a.training
    assert state_equal(weights(a), weights(fanchuan.unlearn(memorised, features, **hp, seed=0)))
    assert not state_equal(weights(a), weights(fanchuan.unlearn(memorised, features, **hp, seed=1)))
    assert accuracy(a, features, features.forget) <= accuracy(memorised, features, features.forget) - 0.4
    assert accuracy(a, features, features.retain) >= 0.9


def test_the_variant_changes_only_the_first_stage_loss(features, memorised, monkeypatch):
    hp = dict(fanchuan.GRID[3], epochs=2)
    base = weights(fanchuan.unlearn(memorised, features, **hp))
    improved = weights(fanchuan.unlearn(memorised, features, **hp, improved=True))
    assert not state_equal(base, improved)
    # the base run with its first-stage loss swapped for the variant's is the variant run, bit for bit
    real = fanchuan.stage1_loss
    seen = []

    def variant(logits, reverse_weight=0.0):
        seen.append(reverse_weight)
        return real(logits, fanchuan.REVERSE_WEIGHT)

    monkeypatch.setattr(fanchuan, "stage1_loss", variant)
    assert state_equal(weights(fanchuan.unlearn(memorised, features, **hp)), improved)
    assert seen == [0.0, 0.0], "the base run passes no reverse weight, one call per forget batch"


def test_a_resnet_on_images_is_unlearnt_deterministically():
    d = load_digits()
    n = 24
    rows = torch.arange(n)
    task = Task(d.train.images[:n].clone(), d.train.labels[:n].clone(), rows[8:], rows[:8], 10, crop_pad=1,
                flip=True, batch_size=8, seed=2)
    original = new_model(task, 2).eval()
    before = weights(original)
    hp = dict(epochs=1, lr_first=0.01, lr_forget=0.01, lr_retain=0.01)
    a = fanchuan.unlearn(original, task, **hp, improved=True, seed=0)
    assert state_equal(weights(original), before), "the original is not modified"
    assert state_equal(weights(a), weights(fanchuan.unlearn(original, task, **hp, improved=True, seed=0)))
    assert not state_equal(weights(a), before)
    assert not a.training
