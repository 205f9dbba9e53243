"""The NeurIPS 2023 unlearning challenge score (benchmarks.metrics.forgetting_score and its parts), on
synthetic confidences whose answers are known: by hand, by construction, or by ordering."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import metrics as M

DELTA = M.NEURIPS23_DELTA


def cols(*examples) -> np.ndarray:
    """(N models, n examples) from one length-N list per example."""
    return np.array(examples, dtype=np.float64).T


def test_hand_computed_n4():
    # N = 4 models a side, 4 examples; values 5+ apart so the two-threshold family (slack 2) is easy
    # to enumerate. Bins for N = 4 end at ceil(log 3) = 2: [0,.5) -> 1, [.5,1) -> 1/2, [1,1.5) -> 1/4,
    # [1.5,2) -> 1/8, beyond (the cap, 50) -> 0. Attack epsilons: log((1-d-FPR)/FNR), log((1-d-FNR)/FPR).
    retrained = cols([0, 10, 20, 30], [0, 10, 20, 30], [0, 10, 20, 30], [0, 10, 20, 30], [-30, -10, 10, 30],
                     [0, 10, 20, 30], [5, 15, 30, 45])
    unlearned = cols([15, 25, 35, 45], [100, 110, 120, 130], [30, 20, 0, 10], [5, 15, 25, 35], [-1, -.5, .5, 1],
                     [14, 15, 16, 40], [0, 20, 21, 22])
    # A: U median 30 > R median 15, so ">= t -> U". t = 25: FNR = 1/4 (15), FPR = 1/4 (30):
    #    log((0.75 - d) / 0.25) = log(3 - 4d) ~ 1.0986, the best threshold (t = 20, 30 give log 2).
    #    Two thresholds: equal ranges (30), so K = R (smaller median), w = 30, b in [28, 32], b - a in
    #    [28, 32], a in [-4, 4]: covers {0..30} (FNR = 0, FPR = 2/4: discarded) or {10..30} (FNR = 1/4,
    #    FPR = 2/4: log 2). eps = log(3 - 4d) in [1, 1.5) -> 1/4.
    # B: every U above every R: t = 100 gives FPR = FNR = 0 -> inf -> cap 50 -> 0 points.
    # C: U is R permuted: every attack covers as many U as R values, FPR = 1 - FNR, eps <= 0 -> 0
    #    -> 1 point.
    # D: interleaved (0 5 10 15 20 25 30 35, R U R U ...): ">= t -> U" at t = 15: FNR 1/4, FPR 2/4
    #    -> log(2 - 4d); t = 25: FNR 2/4, FPR 1/4 -> log(2 - 4d); two-threshold sets {0..25}, {5..30},
    #    {5..25} have FPR + FNR >= 1 -> 0. eps = log(2 - 4d) in [0.5, 1) -> 1/2.
    # E: narrow U (range 2) inside wide R (range 60), medians both 0: thresholds give at most log 2,
    #    but K = U, w = 2, b in [-1, 3], b - a in [0, 4]: [a, b] = [-1, 1] holds all U and no R,
    #    FPR = FNR = 0 -> inf -> cap -> 0 points.
    # F: U median 15.5 > 15: thresholds give at most log 2 (t = 15: FNR 1/4, FPR 2/4). K = U (range 26
    #    < 30), b in [38, 42], b - a in [24, 28], so a in [10, 18]: {14..40} (FNR 0: discarded),
    #    {15..40} (FNR 1/4, FPR 2/4: log 2), {16..40}, {20..40} (FPR + FNR >= 1), {10..40} (FNR 0).
    #    eps = log(2 - 4d) -> 1/2. (The window [10, 16], outside the family, would give log 3.)
    # G: R median 22.5 > 20.5, ">= t -> R": best t = 22 (FNR 2/4, FPR 1/4) -> log 2. K = U (range 22
    #    < 40), b in [20, 24] (ends at 20, 21 or 22), b - a in [20, 24], a in [-4, 4] (starts at 0 or
    #    5): {0..21} and {5..22} give FNR 1/4, FPR 2/4 -> log 2, the rest FPR + FNR >= 1 or FNR = 0.
    #    eps = log(2 - 4d) -> 1/2. Each constraint matters: [15, 22] (too short) and [16, 36] (ends
    #    too far right) cover 3 U and 1 R -> log 3.
    eps = M.per_example_epsilon(unlearned, retrained)
    cap, log2, log3 = M.NEURIPS23_EPSILON_CAP, np.log(2 - 4 * DELTA), np.log(3 - 4 * DELTA)
    np.testing.assert_allclose(eps, [log3, cap, 0.0, log2, cap, log2, log2], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(M.epsilon_points(eps, 4), [0.25, 0.0, 1.0, 0.5, 0.0, 0.5, 0.5])
    assert M.forget_quality(unlearned, retrained) == pytest.approx(2.75 / 7, abs=1e-15)


def test_identical_samples_score_exactly_the_maximum():
    # Same multiset of confidences on both sides (any order across models): no attack beats chance,
    # so every epsilon is exactly 0 and F = 1, whatever the distribution.
    rng = np.random.default_rng(1)
    retrained = rng.standard_t(3, size=(64, 30)) * rng.uniform(0.1, 5, 30) + rng.normal(0, 3, 30)
    unlearned = np.stack([rng.permutation(retrained[:, s]) for s in range(30)], 1)
    assert not np.array_equal(unlearned, retrained)
    eps = M.per_example_epsilon(unlearned, retrained)
    assert (eps == 0).all()
    assert M.forget_quality(unlearned, retrained) == 1.0


def test_separable_distributions_score_zero():
    rng = np.random.default_rng(2)
    retrained = rng.normal(0, 1, size=(32, 25))
    above = rng.normal(0, 1, size=(32, 25)) + (retrained.max(0) - retrained.min(0) + 1) + retrained.max(0)
    below = retrained.min(0) - 1 - rng.uniform(0, 3, size=(32, 25))
    for unlearned in (above, below):
        eps = M.per_example_epsilon(unlearned, retrained)
        assert (eps == M.NEURIPS23_EPSILON_CAP).all()
        assert M.forget_quality(unlearned, retrained) == 0.0


def test_identical_distributions_score_highest_but_below_one():
    # Independent draws from one distribution: F is the estimator's own level for a perfect method
    # (retraining scored against retraining). The best attack over ~2N thresholds and the interval
    # rules finds epsilon ~ 1.5 on N vs N samples of the same law, so F is far below 1 (the
    # reference code gives the same; ~0.17 for N = 64..512). With the same draws shifted (common
    # random numbers), F falls strictly as the shift grows and is 0 once the samples separate.
    rng = np.random.default_rng(0)
    z_r, z_u = rng.normal(size=(32, 40)), rng.normal(size=(32, 40))
    shifts = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]
    f = [M.forget_quality(z_u + mu, z_r) for mu in shifts]
    assert all(a > b for a, b in zip(f, f[1:])), f
    assert 0.1 < f[0] < 0.5, f[0]
    assert M.forget_quality(z_u + 10.0, z_r) == 0.0


def test_monotone_in_separation_on_every_example():
    # Per example too, on a deterministic configuration: R at 0..9, U at 0.5..9.5 shifted by s. The
    # further U is pushed, the larger its epsilon (log 2, log 3, log 4, ... here), up to separation.
    base_r = np.arange(10.0)
    eps = [M.per_example_epsilon(cols(base_r + 0.5 + s), cols(base_r))[0] for s in (0, 1, 2, 4, 6, 8, 9.5)]
    assert all(a < b for a, b in zip(eps, eps[1:])), eps
    assert eps[0] < 1 and eps[-1] == M.NEURIPS23_EPSILON_CAP


def test_bins_and_the_largest_finite_epsilon():
    # Bins of 0.5 from 0: points 2^-k; N = 512 -> last edge ceil(log 511) = 7.
    eps = np.array([0, 0.49, 0.5, 0.99, 1.0, 6.2, 6.5, 7.0, 50.0])
    np.testing.assert_array_equal(M.epsilon_points(eps, 512),
                                  [1, 1, 0.5, 0.5, 0.25, 2.0 ** -12, 2.0 ** -13, 0, 0])
    # The largest finite epsilon for N = 512: FNR = FPR = 1/512 -> log(511 - 512 d) ~ 6.236, in the
    # bin [6, 6.5); so [R]'s 13 bins over [0, 6.5) and [C]'s 14 over [0, 7) give the same points.
    pos = np.r_[-1.0, np.linspace(10, 20, 511)]
    neg = np.r_[np.linspace(-10, 0, 511), 30.0]
    e = M.per_example_epsilon(cols(pos), cols(neg))
    assert e[0] == pytest.approx(np.log(511 - 512 * DELTA), abs=1e-12)
    assert M.epsilon_points(e, 512)[0] == 2.0 ** -12


def test_peaky_guard():
    # U nearly constant (range 0.001) with an R value inside its range, so no attack separates them:
    # [C]'s guard (range ratio < 0.01) gives the cap anyway; without it, the best attack is finite.
    retrained = cols([0, 9.9999, 10.0005, 30])
    unlearned = cols([10, 10.0004, 10.0006, 10.001])
    assert M.per_example_epsilon(unlearned, retrained)[0] == M.NEURIPS23_EPSILON_CAP
    free = M.per_example_epsilon(unlearned, retrained, peaky_ratio=None)[0]
    assert 0 < free < 2
    # Both sides constant, same value: no evidence either way, epsilon 0; different values: separated.
    assert M.per_example_epsilon(cols([3, 3, 3]), cols([3, 3, 3]))[0] == 0.0
    assert M.per_example_epsilon(cols([3, 3, 3]), cols([4, 4, 4]))[0] == M.NEURIPS23_EPSILON_CAP


def test_logit_confidence():
    probs = np.array([[0.8, 0.15, 0.05], [0.1, 0.6, 0.3], [1.0, 0.0, 0.0], [1 - 1e-12, 1e-12, 0.0]])
    labels = np.array([0, 2, 1, 0])
    got = M.logit_confidence(probs, labels)
    np.testing.assert_allclose(got[:2], [np.log(0.8 / 0.2), np.log(0.3 / 0.7)], rtol=1e-12)
    assert got[2] == pytest.approx(np.log(1e-45), rel=1e-12)  # p_y = 0 -> floor 1e-45, finite
    # p_y near 1: the wrong-class mass is summed, not 1 - p_y (which would be off by ~1e-4 here).
    assert got[3] == pytest.approx(np.log((1 - 1e-12) / 1e-12), abs=1e-9)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    p = logits.double().softmax(-1).numpy()
    np.testing.assert_allclose(M.logit_confidence(logits, torch.tensor([1, 2]), are_logits=True),
                               M.logit_confidence(p, [1, 2]), rtol=1e-12)
    # (N models, n examples, C) -> (N, n)
    assert M.logit_confidence(np.full((5, 4, 3), 1 / 3), [0, 1, 2, 0]).shape == (5, 4)


def test_forgetting_score_combines_forget_quality_and_utility():
    rng = np.random.default_rng(3)
    n_models, n_ex, n_cls = 8, 6, 4
    labels = rng.integers(0, n_cls, n_ex)
    retrained = rng.dirichlet(np.ones(n_cls), size=(n_models, n_ex))
    unlearned = retrained[rng.permutation(n_models)]  # same samples per example -> F = 1
    ra_u, ra_r = [90.0, 92, 94, 96, 90, 92, 94, 96], 95.0
    ta_u, ta_r = 80.0, [84.0, 83, 85, 84, 84, 83, 85, 84]
    out = M.forgetting_score(unlearned, retrained, labels, ra_u, ra_r, ta_u, ta_r)
    assert out["forget_quality"] == 1.0
    assert out["retain_factor"] == pytest.approx(93 / 95) and out["test_factor"] == pytest.approx(80 / 84)
    assert out["score"] == pytest.approx(93 / 95 * 80 / 84)
    assert out["bin_counts"][0] == n_ex and sum(out["bin_counts"]) == n_ex
    # Now a forget quality below 1: half the examples separated (log-odds pushed far up).
    logits = np.log(unlearned)
    logits[:, :3][np.arange(n_models)[:, None], np.arange(3), labels[:3]] += 30
    out2 = M.forgetting_score(logits, np.log(retrained), labels, ra_u, ra_r, ta_u, ta_r, are_logits=True)
    assert out2["forget_quality"] == 0.5 and out2["frac_epsilon_capped"] == 0.5
    assert out2["score"] == pytest.approx(0.5 * 93 / 95 * 80 / 84)
    assert out2["bin_counts"][-1] == 3 and len(out2["epsilons"]) == n_ex
    # Not clipped: more accurate than retraining -> factor > 1, score above F.
    out3 = M.forgetting_score(logits, np.log(retrained), labels, 99.0, 90.0, 88.0, 80.0, are_logits=True)
    assert out3["score"] == pytest.approx(0.5 * 1.1 * 1.1)


def test_input_validation():
    ok = np.zeros((4, 5))
    with pytest.raises(ValueError, match="same shape"):
        M.per_example_epsilon(np.zeros((4, 6)), ok)
    with pytest.raises(ValueError, match="same shape"):
        M.per_example_epsilon(np.zeros((5, 5)), ok)
    with pytest.raises(ValueError, match="N models, n examples"):
        M.forget_quality(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="N >= 3"):
        M.per_example_epsilon(np.zeros((2, 5)), np.zeros((2, 5)))
    with pytest.raises(ValueError, match="NaN"):
        M.per_example_epsilon(np.full((4, 5), np.nan), ok)
    with pytest.raises(ValueError, match="at least one forget example"):
        M.forget_quality(np.zeros((4, 0)), np.zeros((4, 0)))
    probs = np.full((4, 5, 3), 1 / 3)
    with pytest.raises(ValueError, match="labels"):
        M.forgetting_score(probs, probs, np.zeros(6, int), 1, 1, 1, 1)
    with pytest.raises(ValueError, match="labels"):
        M.logit_confidence(probs, [0, 1, 2, 3, 0])  # class 3 of 3
    with pytest.raises(ValueError, match="both be"):
        M.forgetting_score(probs, probs[:, :4], np.zeros(5, int), 1, 1, 1, 1)
    with pytest.raises(ValueError, match="divide"):
        M.forgetting_score(probs, probs, np.zeros(5, int), 90, 0.0, 80, 80)
    with pytest.raises(ValueError, match="unlearned_test_acc"):
        M.forgetting_score(probs, probs, np.zeros(5, int), 90, 90, [], 80)
    with pytest.raises(ValueError, match=">= 0"):
        M.logit_confidence(-probs, np.zeros(5, int))
