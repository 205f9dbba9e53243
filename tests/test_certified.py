"""Certified removal (benchmarks.methods.certified) on tiny problems, and the benchmark's smoke mode."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.methods import certified as cr

ROOT = Path(__file__).resolve().parents[1]


def problem(n=120, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(classes, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    feats = centres[y] + torch.randn(n, d, generator=g)
    c = cr.clip_constant(feats[: n // 4])  # stands in for the public rows
    return cr.prepare(feats, c), cr.signs(y, classes), y


def test_prepare_bounds_norms_with_a_public_constant():
    X, Y, _ = problem()
    assert X.dtype == torch.float64 and (X.norm(dim=1) <= 1 + 1e-12).all()
    assert torch.allclose(X[:, -1], torch.full((len(X),), 1 / math.sqrt(2), dtype=torch.float64))


def test_newton_removal_is_exact_for_least_squares():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(50, 5, generator=g, dtype=torch.float64)
    y = torch.randn(50, generator=g, dtype=torch.float64)
    lam = 0.01
    w = cr.ridge(X, y, lam)
    for row in (0, 17, 49):
        keep = torch.arange(50) != row
        retrained = torch.linalg.solve(X[keep].T @ X[keep] + lam * 49 * torch.eye(5, dtype=torch.float64),
                                       X[keep].T @ y[keep])
        assert (cr.ridge_remove(X, y, lam, w, row) - retrained).abs().max() < 1e-8


def test_guo_residual_never_exceeds_the_tracked_bound_and_the_budget_forces_a_retrain():
    X, Y, _ = problem()
    lam = 0.05
    head = cr.Guo(X, Y, lam, sigma=0.5, budget=1e9, seed=0)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(2))[:30].tolist()
    bounds = []
    for row in order:
        step = head.remove(row)
        assert not step["retrained"]
        assert head.residual() <= head.beta + 1e-10  # measured gradient residual <= accumulated bound
        bounds.append(step["bound"])
    assert head.beta > 0
    # a budget that the next removal's bound crosses: the head retrains, and the residual restarts near 0
    tight = cr.Guo(X, Y, lam, sigma=0.5, budget=sum(bounds[:3]) * 1.01 + 1e-9, seed=0)
    steps = [tight.remove(r) for r in order[:10]]
    assert any(s["retrained"] for s in steps) and tight.retrains >= 1
    assert tight.beta <= tight.budget and tight.residual() <= tight.beta + 1e-10
    assert float(tight.weight.sum()) == len(X) - 10


def test_noise_scales_match_a_hand_computation():
    # Guo: c = sqrt(2 ln(1.5 / 1e-5)) = sqrt(23.83678) = 4.882293; budget = sigma eps / c
    assert cr.guo_c(1e-5) == pytest.approx(math.sqrt(2 * math.log(1.5e5)))
    assert cr.guo_budget(2.0, 1.0, 1e-5) == pytest.approx(2.0 / 4.882293, rel=1e-6)
    # Sekhari: M = 1/(6 sqrt 3) = 0.096225, L = 2 sqrt(10) = 6.324555, m = 1, n = 1000, lam = 0.1:
    # gamma = 2 * 0.096225 * 40 / (1e-3 * 1e6) = 0.0076980; sigma = gamma / 1 * sqrt(2 ln(125000)) = 0.0076980 * 4.84481
    assert cr.sekhari_sigma(1.0, 1e-5, 1, 1000, 0.1, 10) == pytest.approx(0.0076980 * 4.844809, rel=1e-5)
    # D2D, lam = 0.1, K = 10: beta = 0.35, gamma = 0.25/0.45 = 5/9, eta = 2/0.45, L = 6.324555;
    # T = 2: Delta = 8 L (25/81) / (0.1 * 1000 * (56/81)) = 8 * 6.324555 * 25 / 5600 = 0.225877;
    # sigma = Delta / (sqrt 2 (sqrt(ln 1e5 + 1) - sqrt(ln 1e5)))
    k = cr.D2DConstants(0.1, 10)
    assert k.gamma == pytest.approx(5 / 9) and k.eta == pytest.approx(2 / 0.45) and k.radius == pytest.approx(math.sqrt(10) / 0.1)
    denom = math.sqrt(2) * (math.sqrt(math.log(1e5) + 1) - math.sqrt(math.log(1e5)))
    assert k.sigma(2, 1000, 1.0, 1e-5) == pytest.approx(0.225877 / denom, rel=1e-5)
    # I = T + ceil(log(D m n / (2L)) / log(1/gamma)), D = 2 radius = 63.2456: log(63.2456 * 0.1 * 1000 / 12.649) / log(1.8)
    assert k.train_steps(2, 1000) == 2 + math.ceil(math.log(63.2456 * 0.1 * 1000 / 12.64911) / math.log(1.8))


def test_d2d_iterates_stay_in_the_projection_ball():
    X, Y, _ = problem()
    k = cr.D2DConstants(0.01, Y.shape[1])  # radius sqrt(3)/0.01 = 173: a step from far outside must project
    trace: list = []
    W = cr.pgd(X, Y, torch.full((X.shape[1], Y.shape[1]), 1e3, dtype=torch.float64), torch.ones(len(X), dtype=torch.float64),
               k, 20, trace)
    assert max(trace) <= k.radius * (1 + 1e-12) and float(W.norm()) <= k.radius * (1 + 1e-12)
    head = cr.D2D(X, Y, 0.5, T=2, eps=1.0, delta=1e-5, seed=0)
    for row in range(5):
        head.remove(row)
        assert float(head.theta.norm()) <= head.k.radius * (1 + 1e-12)


def test_every_method_is_deterministic_given_its_seed():
    X, Y, _ = problem()

    def run(make):
        head = make()
        for row in (3, 8, 40):
            head.remove(row)
        return head.W

    makers = [lambda s: cr.Guo(X, Y, 0.05, sigma=0.5, budget=1e9, seed=s),
              lambda s: cr.Sekhari(X, Y, 0.05, capacity=2, eps=1.0, delta=1e-5, seed=s),
              lambda s: cr.D2D(X, Y, 0.5, T=2, eps=1.0, delta=1e-5, seed=s)]
    for make in makers:
        assert torch.equal(run(lambda: make(0)), run(lambda: make(0)))
        assert not torch.equal(run(lambda: make(0)), run(lambda: make(1)))


def test_sekhari_without_noise_matches_the_batch_newton_step_and_retrains_past_capacity():
    X, Y, _ = problem()
    head = cr.Sekhari(X, Y, 0.05, capacity=2, eps=1.0, delta=1e-5, seed=0)
    head.remove(0)
    head.remove(1)
    keep = torch.ones(len(X), dtype=torch.float64)
    keep[:2] = 0
    w_star, _ = cr.fit(X, Y, 0.05, weight=keep)
    assert (head.mean - w_star).norm() < 0.05 * (head.w_hat - w_star).norm()  # the step lands near retraining
    head.remove(2)  # the third deletion exceeds the capacity: retrain on the remaining rows
    assert head.retrains == 1 and head.m == 0 and head.n0 == len(X) - 3


def test_smoke_benchmark(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.certified_removal", "--smoke", "--work", str(tmp_path / "work"),
                           "--results-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "certified_removal_smoke.json").read_text())
    rows = res["table"]
    names = [r["method"] for r in rows]
    for m in ("Retrain (monolithic)", "SISA S=2", "Guo et al.", "Sekhari et al.", "Descent-to-Delete"):
        assert m in names
    for r in rows:
        assert 0 <= r["test_acc"] <= 100 and 0 <= r["score"]["forget_quality"] <= 1, r["method"]
        assert r["certified_epsilon"] <= (r["epsilon"] or 0) + 1e-9, r["method"]
    for name, s in res["stream"].items():
        assert [p["K"] for p in s["points"]] == sorted(p["K"] for p in s["points"]), name
        work = [p["cumulative_seconds"] for p in s["points"]]
        assert work == sorted(work), name
    assert (tmp_path / "certified_removal_smoke.md").read_text().count("| Guo et al. |") == 3
