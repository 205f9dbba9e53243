"""Unlearnable examples (issue 19): the noise's bound, the min-min loop, p = 0, determinism."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from benchmarks import unlearnable as ub
from benchmarks.methods.common import Task, new_model, train
from benchmarks.methods.unlearnable import (NoiseConfig, error_minimizing_noise, minimise_noise, pixel_bound,
                                            to_uint8)
from sisa.data import load_digits
from sisa.model import to_input


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return d.train.images[:96], d.train.labels[:96]


def cnn(seed=0):
    torch.manual_seed(seed)
    return ub.small_cnn(1, 10, 4, (8, 8))


TINY = NoiseConfig(max_rounds=4, pgd_steps=5, batch_size=48, seed=0)


def test_to_uint8_keeps_the_bound_after_rounding():
    clean = torch.tensor([0, 1, 7, 8, 100, 247, 248, 254, 255], dtype=torch.uint8).view(1, 1, 3, 3)
    eps = 8 / 255
    assert pixel_bound(eps) == 8
    for d in (eps, -eps, eps + 1e-6, -eps - 1e-6, 0.49 / 255 + eps, 0.5 / 255 + eps, 3 * eps):
        out = to_uint8(clean, torch.full(clean.shape, d), eps)
        assert out.dtype == torch.uint8
        assert (out.int() - clean.int()).abs().max() <= 8
    # within the box, rounding is to the nearest pixel value
    assert to_uint8(clean, torch.full(clean.shape, 2.6 / 255), eps).int().tolist() == \
        (clean.int() + 3).clamp(max=255).tolist()


def test_noise_respects_the_linf_bound_after_rounding(digits):
    x, y = digits
    res = error_minimizing_noise(cnn(), x, y, TINY)
    assert res.images.dtype == torch.uint8 and res.images.shape == x.shape
    diff = (res.images.int() - x.int()).abs()
    assert diff.max().item() <= 8
    assert diff.max().item() == 8  # the noise is not trivially small: it reaches the bound
    assert (diff > 0).float().mean() > 0.2


def test_min_min_lowers_the_source_models_loss(digits):
    x, y = digits
    model = cnn()
    x01 = x.float() / 255
    with torch.no_grad():
        before = F.cross_entropy(model(to_input(x01)), y).item()
    delta = minimise_noise(model, x, y, torch.zeros(x.shape), replace(TINY, pgd_steps=20))
    assert delta.abs().max() <= TINY.epsilon + 1e-7
    with torch.no_grad():
        per_sample = F.cross_entropy(model(to_input((x01 + delta).clamp(0, 1))), y, reduction="none")
        per_before = F.cross_entropy(model(to_input(x01)), y, reduction="none")
    assert per_sample.mean().item() < before  # descent, not ascent (an error-maximizing sign fails here)
    assert (per_sample < per_before).float().mean() > 0.9
    # the whole loop: loss on the perturbed samples falls round after round, down to the stop error
    res = error_minimizing_noise(cnn(), x, y, replace(TINY, max_rounds=30, pgd_steps=10))
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert res.converged and res.final_error <= TINY.stop_error


def test_noise_is_deterministic_given_the_seed(digits):
    x, y = digits
    a = error_minimizing_noise(cnn(), x, y, TINY)
    b = error_minimizing_noise(cnn(), x, y, TINY)
    c = error_minimizing_noise(cnn(), x, y, replace(TINY, seed=1))
    assert torch.equal(a.images, b.images) and a.history[-1]["loss"] == b.history[-1]["loss"]
    assert not torch.equal(a.images, c.images)


def micro(arch="cnn"):
    r = ub.smoke(ub.REGIMES["mnist-cnn" if arch == "cnn" else "fashion-mnist-backbone"])
    return replace(r, n_train=200, n_test=100, shares=(0.0, 0.3), ref_share=0.3, models=3, score_examples=20,
                   sisa_requests=1, noise=replace(r.noise, max_rounds=2))


def test_share_zero_is_plain_training_bit_for_bit():
    r = micro()
    data = ub.load(r, "unused")
    st = ub.Setting(r, data)
    none = ub.deletable(len(data.train_y), 0.0, r.seed)
    images, noise = ub.with_noise(st, none)
    assert len(none) == 0 and noise["seconds"] == 0 and torch.equal(images, data.train)
    task = st.task(images, none)
    got = ub.fit(task, torch.arange(len(data.train_y)), r, 0)
    plain = Task(data.train, data.train_y, torch.arange(len(data.train_y)), torch.zeros(0, dtype=torch.long), 10,
                 batch_size=r.batch_size, head=lambda: ub.small_cnn(1, 10, r.width, (8, 8)))
    want = train(new_model(plain, 0), plain, torch.arange(len(data.train_y)), r.epochs, r.lr, seed=0)
    for (k, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), k
    # and the experiment itself checks it, against its own p = 0 population
    res = ub.run(r, data, log=lambda *_: None)
    assert res["shares"][0]["identical_to_plain_training"] is True


def strip_times(obj):
    if isinstance(obj, dict):
        return {k: strip_times(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [strip_times(v) for v in obj]
    return "nan" if isinstance(obj, float) and obj != obj else obj  # accuracy on an empty Du


def test_experiment_is_deterministic_given_the_seed():
    r = micro()
    data = ub.load(r, "unused")
    a = ub.plain(ub.run(r, data, log=lambda *_: None))
    b = ub.plain(ub.run(r, data, log=lambda *_: None))
    assert strip_times(a) == strip_times(b)
    row = a["shares"][1]
    assert row["n_du"] == 60 and row["noise"]["linf_uint8"] <= 8
    for key in ("score_noisy", "score_clean", "score_original", "score_ceiling"):
        assert 0 <= row[key]["forget_quality"] <= 1
    assert "sisa" in a and a["sisa"]["batch_forget_shards_hit"] == 2
    md = ub.render({**a, "mode": "smoke", "environment": {"torch_threads": 1}})
    assert "| 30% | 60 |" in md


def test_backbone_noise_leaves_the_frozen_trunk_alone():
    r = micro("backbone")
    data = ub.load(r, "unused")
    st = ub.Setting(r, data)
    before = {k: v.clone() for k, v in st.trunk.state_dict().items()}
    model, params = st.source_model(0)
    assert {id(p) for p in params} == {id(p) for p in model.head.parameters()}
    res = error_minimizing_noise(model, data.train[:40], data.train_y[:40], replace(TINY, max_rounds=2), params=params)
    assert (res.images.int() - data.train[:40].int()).abs().max() <= 8
    for k, v in st.trunk.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not st.trunk.training


def test_stages_are_listed_and_parse(capsys):
    ub.main(["--list-stages"])
    out = capsys.readouterr().out
    for stage in ("mnist-cnn", "fashion-mnist-resnet18", "fashion-mnist-backbone"):
        assert stage in out


def test_all_noisy_check_runs_each_variant():
    r = micro()
    data = ub.load(r, "unused")
    variants = {"ref": r.noise, "wide": replace(r.noise, epsilon=32 / 255, step_size=3.2 / 255)}
    out = ub.all_noisy_check(r, data, variants, log=lambda *_: None)
    assert set(out["variants"]) == {"ref", "wide"}
    assert out["variants"]["ref"]["noise"]["linf_uint8"] <= 8 < out["variants"]["wide"]["noise"]["linf_uint8"] <= 32
