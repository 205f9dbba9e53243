"""DeltaGrad (benchmarks/methods/deltagrad.py) against real retraining on 2,000 MNIST images, or,
on a machine without the shared MNIST copy, on scikit-learn's digits (every machine has them):
the same checks, on 1,437 8x8 images."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from benchmarks.methods.deltagrad import (LBFGS, DeltaGradConfig, _Batches, accuracy, deltagrad_forget, features,
                                          resnet18_trajectory_bytes, retrain, schedule, step_sizes, train,
                                          trajectory_bytes)
from sisa.data import load_dataset

DATA = Path(os.environ.get("SISA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
DATASET, N_TRAIN, N_TEST = ("mnist", 2000, 2000) if (DATA / "MNIST" / "raw").is_dir() else ("digits", 1437, 360)

# Full-batch GD, the paper's main setting. lr sits below 1/L for logistic regression on [0, 1]
# pixels (L is about 4 here); at lr >= 0.2 GD oscillates and the replay's error grows 20-70x. The
# MLP is narrower than the paper's 300 units to keep the suite fast, and like the paper's DNN runs
# it needs a long burn-in (j0 = 40 of 100 iterations): early on, the trajectories with and without
# the deleted samples part quickly and the L-BFGS pairs go stale within T0 iterations.
CONFIGS = {
    "logreg": DeltaGradConfig(model="logreg", lr=0.1, epochs=150, l2=5e-3, T0=5, j0=10, m=2, seed=0),
    "mlp": DeltaGradConfig(model="mlp", hidden=100, lr=0.05, epochs=100, l2=1e-3, T0=5, j0=40, m=2, seed=0),
}
# ||w_deltagrad - w_retrain|| / ||w_original - w_retrain|| must stay below these. Observed on this
# subset (1% / 5% removed): logreg 0.0037 / 0.0037, MLP 0.092 / 0.072; test accuracies of DeltaGrad
# and retraining agreed to 0.05 points.
MAX_RATIO = {"logreg": 0.02, "mlp": 0.2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These matrices (2,000 x 784) are too small for intra-op threads to pay: on the shared 2-core
    machine this module took 200 s of CPU with 2 threads and 30 s with one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def mnist():
    d = load_dataset(DATASET, DATA)
    return (features(d.train.images[:N_TRAIN]), d.train.labels[:N_TRAIN],
            features(d.test.images[:N_TEST]), d.test.labels[:N_TEST])


@pytest.fixture(scope="module")
def trained(mnist):
    """One cached training run per model, shared by the tests of this module."""
    X, y, _, _ = mnist
    return {name: train(X, y, cfg) for name, cfg in CONFIGS.items()}


def forget_set(fraction: float, n: int = N_TRAIN, seed: int = 1) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:round(fraction * n)]


@pytest.fixture(scope="module")
def retrained(mnist):
    """Retraining is the expensive part: each (model, fraction) is retrained once per module."""
    X, y, _, _ = mnist
    cache = {}

    def get(model: str, fraction: float):
        if (model, fraction) not in cache:
            cache[model, fraction] = retrain(X, y, forget_set(fraction), CONFIGS[model])
        return cache[model, fraction]
    return get


def exact_iterations(cfg: DeltaGradConfig, T: int) -> int:
    return sum(1 for t in range(T) if t <= cfg.j0 or (t - cfg.j0) % cfg.T0 == 0)


@pytest.mark.parametrize("fraction", [0.01, 0.05])
@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_deltagrad_lands_near_retraining(mnist, trained, retrained, model, fraction):
    X, y, Xt, yt = mnist
    cfg = CONFIGS[model]
    w0, traj, _ = trained[model]
    w_rt, rt = retrained(model, fraction)
    w_dg, dg = deltagrad_forget(X, y, forget_set(fraction), traj, cfg)

    moved = (w0 - w_rt).norm().item()  # how far deletion moves the exact answer
    error = (w_dg - w_rt).norm().item()
    assert moved > 0
    assert error < MAX_RATIO[model] * moved, (error, moved)
    assert abs(accuracy(w_dg, Xt, yt, cfg) - accuracy(w_rt, Xt, yt, cfg)) <= 0.005

    # Fewer full-gradient passes than retraining: the burn-in, every T0-th iteration after it, and
    # the iterations kept exact after a pair was dropped for negative curvature (MLP only).
    assert rt.exact_gradients == cfg.epochs
    assert dg.exact_gradients == exact_iterations(cfg, cfg.epochs) + dg.unscheduled_exact
    assert dg.exact_gradients < rt.exact_gradients


def test_exact_gradient_every_iteration_is_retraining(mnist, trained, retrained):
    """T0 = 1 takes the exact branch everywhere, so DeltaGrad must reproduce retraining: a check
    of the replayed batches, step sizes and regulariser, not of the approximation."""
    X, y, _, _ = mnist
    cfg = CONFIGS["logreg"]
    _, traj, _ = trained["logreg"]
    w_rt, _ = retrained("logreg", 0.05)
    w_dg, dg = deltagrad_forget(X, y, forget_set(0.05), traj, DeltaGradConfig(**{**cfg.__dict__, "T0": 1}))
    assert dg.exact_gradients == cfg.epochs
    torch.testing.assert_close(w_dg, w_rt, rtol=0, atol=1e-10)


def test_minibatch_sgd_replays_the_same_batches(mnist):
    """SGD: retraining sees the original batch order minus the removed rows, and DeltaGrad with
    mini-batch L-BFGS pairs still lands much closer to it than the original model."""
    X, y, Xt, yt = mnist
    cfg = DeltaGradConfig(model="logreg", lr=0.1, epochs=10, batch_size=512, l2=5e-3, T0=5, j0=10, m=2, seed=3)
    w0, traj, _ = train(X, y, cfg)
    assert len(traj.params) == cfg.epochs * math.ceil(N_TRAIN / 512)  # the last batch of an epoch is short
    gone = forget_set(0.01)
    w_rt, rt = retrain(X, y, gone, cfg)
    w_exact, _ = deltagrad_forget(X, y, gone, traj, DeltaGradConfig(**{**cfg.__dict__, "T0": 1}))
    torch.testing.assert_close(w_exact, w_rt, rtol=0, atol=1e-10)
    w_dg, dg = deltagrad_forget(X, y, gone, traj, cfg)
    assert (w_dg - w_rt).norm() < 0.1 * (w0 - w_rt).norm()
    assert dg.exact_gradients < rt.exact_gradients


def test_batches_removed_entirely_are_skipped_by_both(mnist):
    """With batches of 4 and half the rows removed, some batches lose every sample: retraining
    takes no step there, and DeltaGrad must not divide by the empty batch's size."""
    X, y, _, _ = mnist
    X, y = X[:64], y[:64]
    cfg = DeltaGradConfig(model="logreg", lr=0.1, epochs=3, batch_size=4, l2=5e-3, T0=3, j0=2, m=2, seed=0)
    w0, traj, _ = train(X, y, cfg)
    gone = forget_set(0.5, n=64)
    w_rt, rt = retrain(X, y, gone, cfg)
    assert rt.exact_gradients < rt.iterations  # some batches were empty
    w_dg, dg = deltagrad_forget(X, y, gone, traj, cfg)
    assert torch.isfinite(w_dg).all() and dg.iterations == rt.iterations
    w_exact, _ = deltagrad_forget(X, y, gone, traj, DeltaGradConfig(**{**cfg.__dict__, "T0": 1}))
    torch.testing.assert_close(w_exact, w_rt, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="iterations"):
        deltagrad_forget(X, y, gone, traj, DeltaGradConfig(**{**cfg.__dict__, "epochs": 2}))


def test_lbfgs_compact_form_satisfies_the_secant_equation():
    """BFGS matrices satisfy B s = y for the newest pair (y = H s on a quadratic), and pairs that
    carry no positive curvature are refused."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(50, 50, generator=gen, dtype=torch.float64)
    H = A @ A.T / 50 + 0.1 * torch.eye(50, dtype=torch.float64)
    lbfgs = LBFGS(m=3)
    zero = torch.zeros(50, dtype=torch.float64)
    assert not lbfgs.add(zero, zero)
    assert not lbfgs.add(zero + 1, zero - 1)  # s^T y < 0
    steps = [torch.randn(50, generator=gen, dtype=torch.float64) for _ in range(4)]
    for s in steps:
        assert lbfgs.add(s, H @ s)
    assert len(lbfgs.pairs) == 3  # the oldest pair fell out
    torch.testing.assert_close(lbfgs.hvp(steps[-1]), H @ steps[-1])


def test_cache_size_and_resnet18_infeasibility(trained):
    w0, traj, _ = trained["logreg"]
    assert traj.nbytes == trajectory_bytes(len(w0), CONFIGS["logreg"].epochs, dtype_bytes=8)

    iterations = 30 * math.ceil(50_000 / 128)
    r = resnet18_trajectory_bytes(iterations, channels=3, classes=10)
    assert r["params"] > 10_000_000  # counted from sisa.model.build_model, not assumed
    assert r["bytes"] == 2 * r["params"] * 4 * iterations
    assert r["bytes"] > 1e12 * 0.9  # about a terabyte in fp32: not feasible to cache


# ---------------------------------------------------------------- mini-batch cost, step-size schedule, features

# The authors' MNIST setting, scaled down: mini-batches, T0 5, j0 20 (iterations, not epochs), m 2,
# and their step-size schedule (0.1, then 0.05 from half-way).
SGD = DeltaGradConfig(model="logreg", lr=0.1, lr_schedule=((5, 0.05),), epochs=10, batch_size=256,
                      l2=1e-4, T0=5, j0=20, m=2, seed=2)


def naive_sgd(X, y, removed_idx, cfg: DeltaGradConfig) -> torch.Tensor:
    """Retraining written out independently of the module's batching and model code: the same
    batch order, the removed rows dropped by fancy indexing, autograd through X @ W + b, and the
    step size looked up per epoch."""
    X = features(X)
    keep = torch.ones(len(X), dtype=torch.bool)
    keep[removed_idx] = False
    d = X.shape[1]
    w = torch.zeros(d * 10 + 10, dtype=torch.float64)
    per_epoch = math.ceil(len(X) / cfg.batch_size)
    for t, batch in enumerate(schedule(len(X), cfg)):
        lr = cfg.lr
        for start, value in cfg.lr_schedule:
            if t // per_epoch >= start:
                lr = value
        rows = batch[keep[batch]]
        if not len(rows):
            continue
        v = w.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(X[rows] @ v[:d * 10].view(d, 10) + v[d * 10:], y[rows], reduction="sum")
        g = torch.autograd.grad(loss, v)[0] / len(rows) + cfg.l2 * w
        w = w - lr * g
    return w


def test_step_sizes_follow_the_schedule():
    assert step_sizes(1000, SGD) == [0.1] * 20 + [0.05] * 20  # 4 batches of 256 per epoch
    assert step_sizes(1000, DeltaGradConfig(epochs=3)) == [0.1] * 3  # full batch: one iteration an epoch
    gd = DeltaGradConfig(epochs=4, lr=0.2, lr_schedule=((1, 0.1), (3, 0.01)))
    assert step_sizes(1000, gd) == [0.2, 0.1, 0.1, 0.01]
    for bad in (((3, 0.1), (2, 0.05)), ((1, 0.1), (1, 0.05)), ((-1, 0.1),), ((2, 0.0),)):
        with pytest.raises(ValueError):
            DeltaGradConfig(lr_schedule=bad)
    assert DeltaGradConfig(lr_schedule=[[10, 0.05]]).lr_schedule == ((10, 0.05),)  # from JSON


def test_minibatch_retrain_is_plain_sgd_with_the_schedule(mnist):
    """retrain() (lazy gathers into a reused buffer, the weights' (out, in) copy) computes what a
    naive SGD loop computes, to float64 rounding; and the schedule's step sizes are used."""
    X, y, _, _ = mnist
    X, y = X[:1000], y[:1000]
    gone = forget_set(0.05, n=1000)
    w_rt, _ = retrain(X, y, gone, SGD)
    torch.testing.assert_close(w_rt, naive_sgd(X, y, gone, SGD), rtol=0, atol=1e-12)
    constant = DeltaGradConfig(**{**SGD.__dict__, "lr_schedule": ()})
    assert (retrain(X, y, gone, constant)[0] - w_rt).norm() > 1e-3 * w_rt.norm()


def test_scheduled_replay_is_exact_at_T0_1_and_close_otherwise(mnist):
    """With the schedule, DeltaGrad's exact branch steps like retraining (same rows, same step
    sizes), and its approximate steps, taken with iteration t's step size, land near it."""
    X, y, Xt, yt = mnist
    gone = forget_set(0.01)
    w0, traj, _ = train(X, y, SGD)
    w_rt, rt = retrain(X, y, gone, SGD)
    w_exact, ex = deltagrad_forget(X, y, gone, traj, DeltaGradConfig(**{**SGD.__dict__, "T0": 1}))
    assert ex.exact_gradients == rt.exact_gradients
    torch.testing.assert_close(w_exact, w_rt, rtol=0, atol=1e-12)
    w_dg, dg = deltagrad_forget(X, y, gone, traj, SGD)
    assert dg.exact_gradients == exact_iterations(SGD, len(traj.params)) < rt.exact_gradients
    assert (w_dg - w_rt).norm() < 0.1 * (w0 - w_rt).norm()  # observed 0.047 (8 small batches an epoch)
    assert abs(accuracy(w_dg, Xt, yt, SGD) - accuracy(w_rt, Xt, yt, SGD)) <= 0.005


def test_approximate_iterations_gather_no_kept_rows(mnist, monkeypatch):
    """The defect: every iteration gathered its batch's kept rows (16k x 784 float64 at the
    authors' batch size), approximate ones included. Only exact iterations may now."""
    X, y, _, _ = mnist
    gone = forget_set(0.01)
    _, traj, _ = train(X, y, SGD)
    calls = []
    original = _Batches.kept
    monkeypatch.setattr(_Batches, "kept", lambda self, t: calls.append(t) or original(self, t))
    _, dg = deltagrad_forget(X, y, gone, traj, SGD)
    exact = [t for t in range(len(traj.params)) if t <= SGD.j0 or (t - SGD.j0) % SGD.T0 == 0]
    assert calls == exact and dg.exact_gradients == len(exact) < len(traj.params) / 2


def test_features_scale_uint8_images_and_pass_float_matrices_through():
    images = torch.tensor([[[[0, 51], [255, 102]]]], dtype=torch.uint8)  # (1, 1, 2, 2)
    x = features(images)
    assert x.dtype == torch.float64 and x.shape == (1, 4)
    torch.testing.assert_close(x, torch.tensor([[0.0, 0.2, 1.0, 0.4]], dtype=torch.float64), rtol=0, atol=1e-15)
    assert features(images, torch.float32).dtype == torch.float32
    trunk = torch.tensor([[3.5, -2.0, 700.0]], dtype=torch.float32)  # e.g. a frozen trunk's outputs
    out = features(trunk)
    assert out.dtype == torch.float64 and torch.equal(out, trunk.double())  # cast, not divided by 255
    as_is = torch.randn(5, 3, dtype=torch.float64)
    assert features(as_is).data_ptr() == as_is.data_ptr()  # already the right matrix: no copy
    with pytest.raises(TypeError):
        features(torch.ones(2, 3, dtype=torch.long))


def test_deltagrad_on_float_feature_matrix(mnist):
    """DeltaGrad's own convex setting on a frozen trunk's features: multinomial logistic
    regression on a float (N, 128) matrix (here a fixed random ReLU projection of the pixels, given
    as float32 and not rescaled), with a class count other than 10."""
    X, y, _, _ = mnist
    gen = torch.Generator().manual_seed(0)
    proj = torch.randn(X.shape[1], 128, generator=gen, dtype=torch.float64) / math.sqrt(X.shape[1])
    Z = torch.relu(X @ proj).float()
    y5 = y % 5
    cfg = DeltaGradConfig(model="logreg", classes=5, lr=0.2, lr_schedule=((30, 0.1),), epochs=60, l2=1e-3,
                          T0=5, j0=10, m=2, seed=0)
    gone = forget_set(0.02)
    w0, traj, _ = train(Z, y5, cfg)
    assert traj.params.shape[1] == 128 * 5 + 5
    w_rt, _ = retrain(Z, y5, gone, cfg)
    w_dg, dg = deltagrad_forget(Z, y5, gone, traj, cfg)
    assert (w_dg - w_rt).norm() < 0.02 * (w0 - w_rt).norm()  # observed 0.0045
    assert accuracy(w_dg, Z, y5, cfg) > 0.5  # it learnt something from the features
