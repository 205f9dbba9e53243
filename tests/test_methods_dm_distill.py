"""Data modification and distillation into a fresh student: deterministic, leave the original alone;
data modification's descending form moves forget-set predictions towards uniform, its ascending
form does not; the student never learns from a forget sample unless its forget term is on."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from benchmarks.methods import data_modification as dm
from benchmarks.methods import distill
from benchmarks.methods.common import Task, logits_of, new_model
from sisa.audit import state_equal
from sisa.data import load_digits
from sisa.model import build_model
from sisa.partition import derive_seed
from tests.memorised_problem import N, NF, accuracy, feature_task, memorise, one_thread, weights  # noqa: F401


@pytest.fixture(scope="module")
def features() -> Task:
    return feature_task(batch_size=32)


@pytest.fixture(scope="module")
def memorised(features):
    return memorise(features)


def kl_to_uniform(model, task) -> float:
    """Mean KL(p || uniform) over the forget set: 0 for uniform predictions."""
    logp = F.log_softmax(logits_of(model, task.images[task.forget]), 1)
    return (logp.exp() * (logp + math.log(task.classes))).sum(1).mean().item()


def check_deterministic(method, original, task, hp):
    before = weights(original)
    a = method.unlearn(original, task, **hp, seed=0)
    assert state_equal(weights(original), before), "the original is not modified"
    assert not original.training and not a.training
    assert state_equal(weights(a), weights(method.unlearn(original, task, **hp, seed=0))), "same seed, same model"
    assert not state_equal(weights(a), weights(method.unlearn(original, task, **hp, seed=1)))
    return a


# --- data modification -------------------------------------------------------------------

DM_HP = dict(epochs=6, lr=0.1, beta=1.0, decay_epoch=4)


def test_data_modification_grids():
    assert dm.GRID[0] == dict(epochs=45, lr=0.01, beta=0.005, decay_epoch=20)
    assert dm.ASCEND_GRID[0] == dict(dm.GRID[0], direction="ascend")
    assert dm.DESCEND_GRID[0] == dict(dm.GRID[0], direction="descend")
    assert all(set(g) == set(dm.GRID[0]) for g in dm.GRID)
    with pytest.raises(ValueError):
        dm.unlearn(None, None, direction="sideways")


@pytest.mark.parametrize("direction", ["ascend", "descend"])
def test_data_modification_is_deterministic(features, memorised, direction):
    check_deterministic(dm, memorised, features, dict(DM_HP, direction=direction))


def test_descending_moves_forget_predictions_towards_uniform_and_ascending_does_not(features, memorised):
    down = dm.unlearn(memorised, features, **DM_HP, direction="descend")
    up = dm.unlearn(memorised, features, **DM_HP, direction="ascend")
    k0, k_down, k_up = kl_to_uniform(memorised, features), kl_to_uniform(down, features), kl_to_uniform(up, features)
    assert k_down < 0.5 * k0, (k0, k_down)
    assert k_up > k0, (k0, k_up)
    assert not state_equal(weights(up), weights(down))
    assert accuracy(down, features, features.retain) >= 0.9


def test_the_lr_decays_at_decay_epoch(features, memorised):
    """decay=1 is no decay: with the decay at epoch 0 and at the last epoch the runs differ,
    with it past the last epoch they equal the run without decay."""
    hp = dict(DM_HP, epochs=3, direction="descend")
    plain = weights(dm.unlearn(memorised, features, **dict(hp, decay=1.0)))
    assert state_equal(plain, weights(dm.unlearn(memorised, features, **dict(hp, decay_epoch=3))))
    assert not state_equal(plain, weights(dm.unlearn(memorised, features, **dict(hp, decay_epoch=2))))


def test_history_has_one_entry_per_epoch_and_changes_nothing(features, memorised):
    hp = dict(DM_HP, direction="descend")
    history = []
    seen = []

    def eval_fn(model):
        seen.append(model.training)
        return {"test_acc": 0.25}

    a = dm.unlearn(memorised, features, **hp, history=history, eval_fn=eval_fn)
    assert [h["epoch"] for h in history] == list(range(1, hp["epochs"] + 1))
    assert all(set(h) == {"epoch", "forget_acc", "retain_acc", "test_acc"} for h in history)
    assert seen == [False] * hp["epochs"], "eval_fn sees the model in eval mode"
    assert history[-1]["forget_acc"] == accuracy(a, features, features.forget)
    assert history[-1]["retain_acc"] == accuracy(a, features, features.retain)
    assert history[0]["forget_acc"] < 1.0, "the first epoch already forgets some of the memorised set"
    assert state_equal(weights(a), weights(dm.unlearn(memorised, features, **hp))), "recording changes nothing"


# --- distillation ------------------------------------------------------------------------

DIST_HP = dict(epochs=10, lr=0.1, T=4.0)


def test_distillation_grids():
    assert all(g.get("forget_weight", 0.0) == 0.0 for g in distill.GRID)
    assert [dict(g, forget_weight=1.0) for g in distill.GRID] == distill.WEIGHTED_GRID


def test_per_sample_kl_and_forget_weights_by_hand():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    T = 2.0
    p_s, p_t = F.softmax(s / T, 1), F.softmax(t / T, 1)
    expected = T * T * (p_t * (p_t / p_s).log()).sum(1)
    assert torch.allclose(distill.per_sample_kl(s, t, T), expected, rtol=1e-5)
    assert torch.allclose(distill.per_sample_kl(t, t, T), torch.zeros(2), atol=1e-6)
    y = torch.tensor([0, 2])
    assert torch.allclose(distill.forget_weights(t, y), 1 - F.softmax(t, 1)[[0, 1], [0, 2]], rtol=1e-6)


def test_the_objective_by_hand():
    """Two rows, one retain and one forget: (KL_T(retain) + w * (1 - p_teacher(y)) * KL_T(forget)) / 2."""
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]], requires_grad=True)
    t = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    y, forget, T = torch.tensor([0, 2]), torch.tensor([False, True]), 2.0
    p_s, p_t = F.softmax(s.detach() / T, 1), F.softmax(t / T, 1)
    kl = T * T * (p_t * (p_t / p_s).log()).sum(1)
    p_y = F.softmax(t, 1)[1, 2]
    got = distill.objective(s, t, y, forget, 0.7, T)
    assert got.item() == pytest.approx(((kl[0] + 0.7 * (1 - p_y) * kl[1]) / 2).item(), rel=1e-5)
    assert distill.objective(s, t, y, forget, 0.0, T).item() == pytest.approx(kl[0].item() / 2, rel=1e-5)
    distill.objective(s, t, y, forget, 0.0, T).backward()
    assert s.grad[1].abs().max() == 0 and s.grad[0].abs().max() > 0, "a forget row with weight 0: no gradient"


def test_the_student_is_fresh_and_seeded(features, memorised):
    """No training: the student is `new_model` at the method's seed, not the teacher, and differs by seed."""
    a = distill.unlearn(memorised, features, epochs=0, lr=0.1, seed=0)
    assert state_equal(weights(a), weights(new_model(features, derive_seed(0, "distill"))))
    assert not state_equal(weights(a), weights(distill.unlearn(memorised, features, epochs=0, lr=0.1, seed=1)))
    assert not state_equal(weights(a), weights(memorised))


@pytest.mark.parametrize("forget_weight", [0.0, 1.0])
def test_distillation_is_deterministic(features, memorised, forget_weight):
    a = check_deterministic(distill, memorised, features, dict(DIST_HP, forget_weight=forget_weight))
    assert accuracy(a, features, features.retain) >= 0.9, "the student learns the teacher's retain-set outputs"


def test_the_student_learns_from_a_forget_sample_only_through_the_forget_term(features, memorised):
    """Replacing the forget rows' inputs changes nothing, bitwise, when the term is off; and something
    when it is on. Checked directly too: a spy on the student's forward sees no forget row when it is off."""
    noise = replace(features, images=features.images.clone().index_fill_(0, features.forget, 3.0))

    def run(task, w):
        return weights(distill.unlearn(memorised, task, **dict(DIST_HP, epochs=3), forget_weight=w))

    assert state_equal(run(features, 0.0), run(noise, 0.0))
    assert not state_equal(run(features, 1.0), run(noise, 1.0))

    seen = []
    original_linear = torch.nn.Linear.forward

    def spy(self, x):
        if self.weight.requires_grad:  # the student, not the frozen teacher copy
            seen.append(x.detach().clone())
        return original_linear(self, x)

    torch.nn.Linear.forward = spy
    try:
        distill.unlearn(memorised, noise, **dict(DIST_HP, epochs=2))
        off = torch.cat(seen)
        seen.clear()
        distill.unlearn(memorised, noise, **dict(DIST_HP, epochs=2), forget_weight=1.0)
        on = torch.cat(seen)
    finally:
        torch.nn.Linear.forward = original_linear
    is_noise = lambda x: (x == 3.0).all(1)  # noqa: E731
    assert len(off) == 2 * len(features.retain) and not is_noise(off).any()
    assert len(on) == 2 * N and int(is_noise(on).sum()) == 2 * NF


def test_memorised_forget_samples_get_almost_no_weight(features, memorised):
    """The teacher's loss on its memorised forget set is ~0, so the forget term's weight there is ~0."""
    t = logits_of(memorised, features.images[features.forget])
    assert distill.forget_weights(t, features.labels[features.forget]).max() < 0.2
    fresh = logits_of(new_model(features, 5), features.images[features.forget])
    assert distill.forget_weights(fresh, features.labels[features.forget]).mean() > 0.5


# --- both regimes: a ResNet-18 on uint8 images --------------------------------------------

@pytest.fixture(scope="module")
def images() -> Task:
    d = load_digits()
    n = 24
    rows = torch.arange(n)
    return Task(d.train.images[:n].clone(), d.train.labels[:n].clone(), rows[8:], rows[:8], 10, crop_pad=1, flip=True,
                batch_size=8, seed=2, head=lambda: build_model("resnet18", 1, 10, 8))  # width 8: a tiny ResNet-18


@pytest.mark.parametrize("method,hp", [
    (dm, dict(epochs=2, lr=0.01, beta=0.5, decay_epoch=1, direction="ascend")),
    (dm, dict(epochs=2, lr=0.01, beta=0.5, decay_epoch=1, direction="descend")),
    (distill, dict(epochs=1, lr=0.01, T=4.0)),
    (distill, dict(epochs=1, lr=0.01, T=4.0, forget_weight=1.0)),
])
def test_a_resnet_on_images(images, method, hp):
    original = new_model(images, 2).eval()
    before = weights(original)
    history = [] if method is dm else None
    kw = dict(history=history) if method is dm else {}
    a = method.unlearn(original, images, **hp, seed=0, **kw)
    assert state_equal(weights(original), before), "the original is not modified"
    assert not a.training
    assert state_equal(weights(a), weights(method.unlearn(original, images, **hp, seed=0)))
    assert not state_equal(weights(a), weights(method.unlearn(original, images, **hp, seed=1)))
    if method is dm:
        assert len(history) == 2
