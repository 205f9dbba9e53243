"""SCRUB and SalUn, the stronger approximate baselines: deterministic, leave the original alone, and
forget what an original memorised (here: a mislabelled forget set a linear head learnt by heart)."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from benchmarks.methods import salun, scrub
from benchmarks.methods.common import Task, new_model
from sisa.audit import state_equal
from sisa.data import load_digits
from sisa.partition import derive_seed
from tests.memorised_problem import C, D, accuracy, feature_task, memorise, one_thread, weights  # noqa: F401


@pytest.fixture(scope="module")
def features() -> Task:
    return feature_task(batch_size=32)


@pytest.fixture(scope="module")
def memorised(features):
    return memorise(features)


def salun_mask(original, task, ratio, seed=0):
    """The mask `salun.unlearn(..., seed=seed)` computes (its generator's first draws)."""
    return salun.saliency_mask(original, task, ratio, torch.Generator().manual_seed(derive_seed(seed, "salun")))


def check_forgets(method, original, task, hp):
    before = weights(original)
    a = method.unlearn(original, task, **hp, seed=0)
    assert state_equal(weights(original), before), "the original is not modified"
    assert not a.training
    assert state_equal(weights(a), weights(method.unlearn(original, task, **hp, seed=0))), "same seed, same model"
    assert not state_equal(weights(a), weights(method.unlearn(original, task, **hp, seed=1)))
    assert accuracy(a, task, task.forget) <= accuracy(original, task, task.forget) - 0.4
    assert accuracy(a, task, task.retain) >= 0.9
    return a


def test_grids_start_with_the_references_recipes():
    assert scrub.GRID[0] == dict(epochs=3, msteps=2, lr=5e-4, alpha=0.001, gamma=0.99, T=4.0)
    assert salun.GRID[0] == dict(epochs=10, lr=0.013, ratio=0.5)


def test_distill_kl_is_kl_of_teacher_to_student_at_temperature_T():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, C, generator=gen), 3 * torch.randn(5, C, generator=gen)
    T = 4.0
    p_s, p_t = F.softmax(s / T, 1), F.softmax(t / T, 1)
    expected = T * T * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    assert scrub.distill_kl(s, t, T).item() == pytest.approx(expected.item(), rel=1e-5)
    assert scrub.distill_kl(t, s, T).item() != pytest.approx(expected.item(), rel=1e-2)  # not symmetric
    assert scrub.distill_kl(s, s, T).item() == pytest.approx(0.0, abs=1e-6)


def test_scrub_forgets_a_memorised_forget_set(features, memorised):
    # the reference's loss weights and temperature; a linear head needs a larger lr and more epochs
    check_forgets(scrub, memorised, features, dict(epochs=6, msteps=5, lr=0.1, alpha=0.001, gamma=0.99, T=4.0))


def test_scrub_reads_the_forget_set_only_in_its_max_steps(features, memorised):
    hp = dict(epochs=2, lr=0.05, alpha=0.5, gamma=1.0, T=1.0)
    noise = replace(features, images=features.images.clone().index_fill_(0, features.forget, 3.0))
    same = lambda msteps: state_equal(  # noqa: E731
        weights(scrub.unlearn(memorised, features, msteps=msteps, **hp)),
        weights(scrub.unlearn(memorised, noise, msteps=msteps, **hp)))
    assert same(0), "no max-steps: the forget set is never read"
    assert not same(1)


def test_salun_forgets_a_memorised_forget_set(features, memorised):
    check_forgets(salun, memorised, features, dict(epochs=3, lr=0.05, ratio=0.5))


def test_salun_changes_only_its_salient_weights(features, memorised):
    mask = salun_mask(memorised, features, 0.3)
    # one forget batch: the saliency is |gradient of the forget set's mean loss|, all weights ranked together
    model = torch.nn.Linear(D, C)
    model.load_state_dict(memorised.state_dict())
    F.cross_entropy(model(features.images[features.forget]), features.labels[features.forget]).backward()
    g = {n: p.grad.abs() for n, p in model.named_parameters()}
    total = sum(t.numel() for t in g.values())
    assert sum(int(m.sum()) for m in mask.values()) == math.floor(0.3 * total)
    # the top share of all weights together (a per-tensor ranking would break this)
    inside = torch.cat([g[n][mask[n]] for n in g])
    outside = torch.cat([g[n][~mask[n]] for n in g])
    assert inside.min() >= (1 - 1e-5) * outside.max()

    out = salun.unlearn(memorised, features, epochs=2, lr=0.05, ratio=0.3)
    before, after = dict(memorised.named_parameters()), dict(out.named_parameters())
    for n in before:
        assert torch.equal(after[n][~mask[n]], before[n][~mask[n]]), f"{n}: an unmasked weight moved"
    assert any(not torch.equal(after[n][mask[n]], before[n][mask[n]]) for n in before)


def test_saliency_ties_go_to_the_earliest_weights(features, memorised):
    """Features with dead columns: their weights' gradients are exactly 0, so the mask's boundary
    falls among ties; the count stays exact and the choice deterministic."""
    dead = replace(features, images=features.images.clone().index_fill_(1, torch.arange(D // 2, D), 0.0))
    mask = salun_mask(memorised, dead, 0.75)
    w = mask["weight"]
    keep = int(0.75 * (C * D + C))
    assert sum(int(m.sum()) for m in mask.values()) == keep
    assert w[:, : D // 2].all() and mask["bias"].all(), "every weight with a gradient ranks first"
    zero = [r * D + c for r in range(C) for c in range(D // 2, D)]  # flattened positions, in order
    picked = [i for i in w.flatten().nonzero().flatten().tolist() if i in set(zero)]
    assert len(picked) == keep - (C * D // 2 + C)
    assert picked == zero[: len(picked)], "ties are taken in flattened order"


@pytest.fixture(scope="module")
def images() -> Task:
    d = load_digits()
    n = 24
    rows = torch.arange(n)
    return Task(d.train.images[:n].clone(), d.train.labels[:n].clone(), rows[8:], rows[:8], 10, crop_pad=1, flip=True,
                batch_size=8, seed=2)


@pytest.mark.parametrize("method,hp", [(scrub, dict(epochs=1, msteps=1, lr=0.01, alpha=0.5, gamma=1.0)),
                                       (salun, dict(epochs=1, lr=0.01, ratio=0.5))])
def test_a_resnet_on_images_is_unlearnt_deterministically(images, method, hp):
    original = new_model(images, 2).eval()
    before = weights(original)
    a = method.unlearn(original, images, **hp, seed=0)
    assert state_equal(weights(original), before), "the original is not modified"
    assert state_equal(weights(a), weights(method.unlearn(original, images, **hp, seed=0)))
    assert not state_equal(weights(a), before)
    assert not a.training
    if method is salun:
        mask = salun_mask(original, images, 0.5)
        for n, p in a.named_parameters():
            assert torch.equal(p[~mask[n]], before[n][~mask[n]]), f"{n}: an unmasked weight moved"
