"""DeltaGrad: rapid retraining by replaying a cached training trajectory.

Wu, Dobriban and Davidson, "DeltaGrad: Rapid retraining of machine learning models", ICML 2020,
Algorithm 1 (full-batch GD) and its mini-batch SGD form (the paper's appendix). Training caches,
for every iteration t, the parameters w_t and the gradient g_t of the full (or mini-batch)
objective at w_t. To delete a set R of r samples, DeltaGrad re-runs the iterations from w_0:

- at iterations t <= j0 (burn-in) and every T0-th after it, ((t - j0) mod T0 == 0), it computes
  the exact gradient on the retained data, takes that exact GD step, and records the L-BFGS pair
  (Δw = w^I_t - w_t, Δg = ∇F(w^I_t) - ∇F(w_t)) on the objective the cached g_t belongs to;
- otherwise it approximates ∇F(w^I_t) ≈ g_t + B (w^I_t - w_t), with B the compact-form L-BFGS
  matrix of the last m pairs, and takes the "leave-r-out" step
      w^I_{t+1} = w^I_t - lr * [n (g_t + B (w^I_t - w_t)) - Σ_{i in R} ∇f_i(w^I_t)] / (n - r),
  which needs gradients of the r removed samples only.

Caching is what makes this feasible only for small models: see `resnet18_trajectory_bytes`.

Models: L2-regularised multinomial logistic regression, and an MLP with one ReLU hidden layer
(300 units in the paper), on flattened uint8 images scaled to [0, 1], or on any float feature
matrix (N, d) as given (e.g. a frozen trunk's features). Each sample's objective is
f_i(w) = CE_i(w) + l2/2 ||w||^2, so F = mean f_i and the leave-r-out formula holds as written.

Step sizes: a constant `lr`, or a per-epoch schedule (`lr_schedule`, e.g. the authors' MNIST
setting: 0.1 for 10 epochs, then 0.05). Training, retraining and the replay take iteration t's step
with the same step size; the leave-r-out step above uses it too.

Cost of the replay in mini-batch mode: an approximate iteration touches only the removed rows of
its batch (gathered once, up front) and the cached w_t, g_t; only exact iterations gather their
kept rows, into one reused buffer. Gathering every batch's kept rows (about 16k x 784 float64 for
the authors' batch of 16,384) on approximate iterations too made the replay barely faster than
retraining (1.17x where the authors' code gets 2.27x). A fresh 100 MB gather also costs about
twice a gather into a reused buffer (page faults), so retraining gathers into the buffer too.

Precision: parameters, gradients and the cache are float64 by default, as in the authors' code.
The L-BFGS pairs are differences of nearby iterates (||Δw|| is about 2% of ||w|| for a 1% deletion
from logistic regression), and float64 keeps rounding out of them in every setting. It is not what
limits accuracy here: on 2,000 MNIST images, float32 logistic regression gave the same
DeltaGrad-to-retrain distance to three digits. `dtype="float32"` halves the cache (use it for the
MLP where memory matters); the MLP's initial draws depend on the dtype.

Deviation from the paper, a safeguard for the non-convex MLP: a pair whose curvature
Δw^T Δg / Δw^T Δw is below l2/2 is not added to the history (a convex L2-regularised objective
always has at least l2, so logistic regression never triggers it; Δw = 0 at t = 0 is skipped too),
and the iterations after such a pair stay exact until a usable pair arrives. Without it, a 5%
deletion from the MLP early in training, where the trajectories part along a direction of
negative curvature, made the replay diverge (parameter error 4,000x the deletion's own effect).
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from sisa.partition import derive_seed

CLASSES = 10


@dataclass
class DeltaGradConfig:
    model: str = "logreg"  # "logreg" | "mlp"
    hidden: int = 300  # MLP hidden units (the paper's MNIST DNN)
    # Full-batch GD on [0, 1] MNIST pixels starts to oscillate near lr = 0.2, and DeltaGrad's
    # error then grows 20-70x (measured on 2,000 images); its analysis assumes a stable step.
    lr: float = 0.1  # step size (until the first epoch of lr_schedule)
    # (epoch, lr) pairs: from that epoch on (counted from 0), the step size is lr. The authors'
    # MNIST setting, 0.1 for the first 10 epochs then 0.05, is lr=0.1, lr_schedule=((10, 0.05),).
    # With full-batch GD an epoch is one iteration. Empty: lr throughout.
    lr_schedule: tuple[tuple[int, float], ...] = ()
    epochs: int = 200  # passes over the data; with batch_size=None one pass is one GD iteration
    batch_size: int | None = None  # None: full-batch GD, the paper's main setting
    l2: float = 5e-3  # L2 coefficient: f_i = CE_i + l2/2 ||w||^2
    T0: int = 5  # period of exact gradient computations after burn-in
    # Burn-in: iterations 0..j0 are all exact. 10 suits logistic regression; the MLP needs far more
    # (the authors' DNN runs used 80 of ~150): on 2,000 images, 200 GD steps, 300 units, j0 = 10
    # left DeltaGrad 0.21x the deletion's effect from retraining (2.7x faster), j0 = 80 with
    # lr 0.05 and l2 1e-3 left 0.04x (1.6x faster).
    j0: int = 10
    m: int = 2  # L-BFGS history size
    seed: int = 0
    dtype: str = "float64"  # of parameters, gradients and the cache; see the module docstring
    classes: int = CLASSES  # outputs of the model

    def __post_init__(self):
        self.lr_schedule = tuple((int(e), float(lr)) for e, lr in self.lr_schedule)
        epochs = [e for e, _ in self.lr_schedule]
        if any(e < 0 for e in epochs) or epochs != sorted(set(epochs)):
            raise ValueError(f"lr_schedule epochs must be distinct, increasing and >= 0: {self.lr_schedule}")
        if self.lr <= 0 or any(lr <= 0 for _, lr in self.lr_schedule):
            raise ValueError(f"step sizes must be positive: lr={self.lr}, lr_schedule={self.lr_schedule}")

    def epoch_lr(self, epoch: int) -> float:
        """The step size of every iteration of `epoch`."""
        lr = self.lr
        for start, value in self.lr_schedule:
            if epoch >= start:
                lr = value
        return lr

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float64": torch.float64, "float32": torch.float32}[self.dtype]


@dataclass
class Trajectory:
    """What training caches: w_t and g_t (gradient at w_t of the iteration's batch objective,
    regulariser included) for t = 0..T-1, as rows of two (T, p) tensors."""

    params: torch.Tensor
    grads: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.params.numel() * self.params.element_size() + self.grads.numel() * self.grads.element_size()


@dataclass
class Stats:
    """Cost of one run. exact_gradients counts gradients over a whole retained batch (the full
    retained set in GD); sample_gradients counts per-sample gradients of every kind."""

    iterations: int = 0
    exact_gradients: int = 0
    sample_gradients: int = 0
    seconds: float = 0.0
    history_rejected: int = 0  # L-BFGS pairs dropped for too little curvature (DeltaGrad only)
    unscheduled_exact: int = 0  # exact iterations off Algorithm 1's schedule, after a dropped pair


# ---------------------------------------------------------------- models on a flat parameter vector

def features(images: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """uint8 images (N, C, H, W) to (N, C*H*W) in [0, 1]: a fixed scaling, because statistics of
    the training set would carry a trace of the deleted samples. Float input, images or a feature
    matrix (N, d) such as a frozen trunk's outputs, is flattened and cast to `dtype`, not rescaled
    (no copy when it already is a contiguous (N, d) matrix of that dtype)."""
    x = images.reshape(len(images), -1)
    if x.dtype == torch.uint8:
        return x.to(dtype) / 255.0
    if not x.is_floating_point():
        raise TypeError(f"features: expected uint8 images or a float matrix, got {x.dtype}")
    return x.to(dtype)


def n_params(cfg: DeltaGradConfig, dim: int) -> int:
    c = cfg.classes
    if cfg.model == "logreg":
        return dim * c + c
    if cfg.model == "mlp":
        return dim * cfg.hidden + cfg.hidden + cfg.hidden * c + c
    raise ValueError(f"unknown model {cfg.model!r}: use 'logreg' or 'mlp'")


def logits(w: torch.Tensor, X: torch.Tensor, cfg: DeltaGradConfig) -> torch.Tensor:
    d, c = X.shape[1], cfg.classes
    if cfg.model == "logreg":
        return F.linear(X, _out_in(w[:d * c], d, c), w[d * c:])
    h, o = cfg.hidden, d * cfg.hidden
    hidden = torch.relu(F.linear(X, _out_in(w[:o], d, h), w[o:o + h]))
    return F.linear(hidden, _out_in(w[o + h:o + h + h * c], h, c), w[o + h + h * c:])


def _out_in(w: torch.Tensor, fan_in: int, fan_out: int) -> torch.Tensor:
    """A weight stored (in, out) in the flat vector, as a contiguous (out, in) matrix, the layout
    of nn.Linear. The forward is the same X @ W, but autograd then forms the weight's gradient as
    G^T X, (out x batch) @ (batch x in), instead of X^T G, (in x batch) @ (batch x out): with
    MKL in float64 on a 16k x 784 batch and 10 classes, X^T G took 3x as long as G^T X and 4-5x
    the forward pass (2 threads, median of 5). The copy is of the weights only."""
    return w.view(fan_in, fan_out).T.contiguous()


def init_params(cfg: DeltaGradConfig, dim: int) -> torch.Tensor:
    """Logistic regression starts at zero (its optimum is unique). The MLP uses torch.nn.Linear's
    default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from a generator seeded by cfg.seed."""
    w = torch.zeros(n_params(cfg, dim), dtype=cfg.torch_dtype)
    if cfg.model == "mlp":
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "deltagrad", "init"))
        h, o = cfg.hidden, dim * cfg.hidden
        for lo, hi, fan_in in ((0, o + h, dim), (o + h, len(w), h)):
            bound = 1.0 / math.sqrt(fan_in)
            w[lo:hi] = (torch.rand(hi - lo, generator=gen, dtype=w.dtype) * 2 - 1) * bound
    return w


def loss_grad_sum(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor, cfg: DeltaGradConfig) -> torch.Tensor:
    """Gradient of the summed cross-entropy over the rows given (no regulariser)."""
    if len(X) == 0:
        return torch.zeros_like(w)
    w = w.detach().requires_grad_(True)
    loss = F.cross_entropy(logits(w, X, cfg), y, reduction="sum")
    return torch.autograd.grad(loss, w)[0]


@torch.no_grad()
def accuracy(params: torch.Tensor, X: torch.Tensor, y: torch.Tensor, cfg: DeltaGradConfig) -> float:
    X = features(X, cfg.torch_dtype)
    if len(X) == 0:
        return float("nan")
    return (logits(params, X, cfg).argmax(1) == y).double().mean().item()


# ---------------------------------------------------------------- batch schedule

def schedule(n: int, cfg: DeltaGradConfig) -> list[torch.Tensor | None]:
    """Row indices of each iteration's batch over the *original* training set (None = all rows).
    The order depends only on cfg.seed and the epoch, so retraining and DeltaGrad see the same
    batches, minus the removed samples, as in the paper's SGD setting."""
    if cfg.batch_size is None:
        return [None] * cfg.epochs
    out = []
    for epoch in range(cfg.epochs):
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "deltagrad", "epoch", epoch))
        out.extend(torch.randperm(n, generator=gen).split(cfg.batch_size))
    return out


def step_sizes(n: int, cfg: DeltaGradConfig) -> list[float]:
    """The step size of each iteration of `schedule(n, cfg)`."""
    per_epoch = 1 if cfg.batch_size is None else math.ceil(n / cfg.batch_size)
    return [cfg.epoch_lr(epoch) for epoch in range(cfg.epochs) for _ in range(per_epoch)]


class _Batches:
    """Each iteration's batch, split into the rows kept and the rows removed. retrain() and
    DeltaGrad share this, so the rows they see are identical, in the same order.

    The removed rows are few and are gathered up front, batch by batch (`removed[t]`). The kept
    rows are gathered only when an iteration asks for them (`kept(t)`), into one buffer reused
    by every call: the tensors it returns are valid until the next call. Full-batch GD gathers the
    kept rows once (or not at all when nothing is removed)."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, removed: torch.Tensor, cfg: DeltaGradConfig):
        self.X, self.y = X, y
        plan = schedule(len(X), cfg)
        self.lrs = step_sizes(len(X), cfg)
        self.sizes: list[int] = []  # rows in each batch before removal
        self.removed: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._plan: list[tuple[torch.Tensor, torch.Tensor | None] | None] = []  # (batch, rows hit)
        if cfg.batch_size is None:
            keep, gone = (~removed).nonzero().squeeze(1), removed.nonzero().squeeze(1)
            self._all = (X, y) if not len(gone) else (X[keep], y[keep])
            self.sizes = [len(X)] * len(plan)
            self.removed = [(X[gone], y[gone])] * len(plan)
            self._plan = [None] * len(plan)
            return
        for batch in plan:
            hit = removed[batch]
            gone = batch[hit]
            self.sizes.append(len(batch))
            self.removed.append((X[gone], y[gone]))
            self._plan.append((batch, hit if len(gone) else None))
        self._buffer = torch.empty(max(self.sizes, default=0), X.shape[1], dtype=X.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    def n_kept(self, t: int) -> int:
        return self.sizes[t] - len(self.removed[t][0])

    def kept(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(X, y) of iteration t's kept rows; X is a view of the shared buffer."""
        if self._plan[t] is None:
            return self._all
        batch, hit = self._plan[t]
        idx = batch if hit is None else batch[~hit]
        # Into a reused buffer: a fresh (16k, 784) float64 gather costs about twice as much,
        # most of it page faults on the new allocation.
        xk = torch.index_select(self.X, 0, idx, out=self._buffer[:len(idx)])
        return xk, self.y[idx]


# ---------------------------------------------------------------- training, retraining

def _descend(X, y, cfg, removed: torch.Tensor | None, cache: bool):
    """Plain GD/SGD on the rows not in `removed`; train() and retrain() share it so the
    original and the retrained model differ only in their data."""
    start = time.perf_counter()
    X = features(X, cfg.torch_dtype)
    removed = torch.zeros(len(X), dtype=torch.bool) if removed is None else removed
    batches = _Batches(X, y, removed, cfg)
    w = init_params(cfg, X.shape[1])
    T = len(batches)
    traj = Trajectory(torch.empty(T, len(w), dtype=w.dtype), torch.empty(T, len(w), dtype=w.dtype)) if cache else None
    stats = Stats()
    for t in range(T):
        stats.iterations += 1
        if batches.n_kept(t) == 0:  # every sample of this batch was removed: nothing to step on
            continue
        xb, yb = batches.kept(t)
        g = loss_grad_sum(w, xb, yb, cfg) / len(xb) + cfg.l2 * w
        stats.exact_gradients += 1
        stats.sample_gradients += len(xb)
        if cache:
            traj.params[t], traj.grads[t] = w, g
        w = w - batches.lrs[t] * g
    stats.seconds = time.perf_counter() - start
    return w, traj, stats


def train(X: torch.Tensor, y: torch.Tensor, cfg: DeltaGradConfig) -> tuple[torch.Tensor, Trajectory, Stats]:
    """Train on all rows, caching the trajectory. Returns (final params, trajectory, stats)."""
    return _descend(X, y, cfg, None, cache=True)


def removed_mask(n: int, removed_idx) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.as_tensor(removed_idx, dtype=torch.long)] = True
    return mask


def retrain(X: torch.Tensor, y: torch.Tensor, removed_idx, cfg: DeltaGradConfig) -> tuple[torch.Tensor, Stats]:
    """The baseline: training from the same initialisation over the same batch sequence, with the
    removed rows left out of every batch."""
    w, _, stats = _descend(X, y, cfg, removed_mask(len(X), removed_idx), cache=False)
    return w, stats


# ---------------------------------------------------------------- L-BFGS, compact form

class LBFGS:
    """B = σI - [Y σS] M^{-1} [Y^T; σS^T], M = [[-D, L^T], [L, σ S^T S]] (Byrd, Nocedal and
    Schnabel 1994, as in DeltaGrad's appendix A.2), over the last m pairs (s = Δw, y = Δg);
    σ = y^T s / s^T s of the newest pair, as in the DeltaGrad code."""

    def __init__(self, m: int, min_curvature: float = 0.0):
        self.pairs: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=m)
        self.min_curvature = min_curvature
        self._ready = False

    def add(self, s: torch.Tensor, y: torch.Tensor) -> bool:
        """Keep the pair if its curvature s^T y / s^T s exceeds min_curvature (and s != 0)."""
        ss = torch.dot(s, s)
        if ss == 0 or torch.dot(s, y) <= self.min_curvature * ss:
            return False
        self.pairs.append((s, y))
        self._ready = False
        return True

    def _prepare(self):
        S = torch.stack([s for s, _ in self.pairs])  # (k, p)
        Y = torch.stack([y for _, y in self.pairs])
        SY, SS = S @ Y.T, S @ S.T  # SY[i, j] = s_i^T y_j
        L = torch.tril(SY, diagonal=-1)
        s, y = self.pairs[-1]
        self.sigma = torch.dot(y, s) / torch.dot(s, s)
        M = torch.cat([torch.cat([-torch.diag(torch.diag(SY)), L.T], 1),
                       torch.cat([L, self.sigma * SS], 1)], 0)
        self.S, self.Y, self.M_inv = S, Y, torch.linalg.inv(M)  # M is at most 2m x 2m
        self._ready = True

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        if not self._ready:
            self._prepare()
        k = len(self.pairs)
        p = self.M_inv @ torch.cat([self.Y @ v, self.sigma * (self.S @ v)])
        return self.sigma * v - self.Y.T @ p[:k] - self.sigma * (self.S.T @ p[k:])


# ---------------------------------------------------------------- DeltaGrad

def deltagrad_forget(X: torch.Tensor, y: torch.Tensor, removed_idx, traj: Trajectory,
                     cfg: DeltaGradConfig) -> tuple[torch.Tensor, Stats]:
    """Parameters of the model trained without `removed_idx`, replayed from the cached
    trajectory (Algorithm 1). cfg must be the configuration the trajectory was trained with."""
    start = time.perf_counter()
    X = features(X, cfg.torch_dtype)
    batches = _Batches(X, y, removed_mask(len(X), removed_idx), cfg)
    if len(batches) != len(traj.params):
        raise ValueError(f"trajectory has {len(traj.params)} iterations, the configuration {len(batches)}")
    w = traj.params[0].clone()  # w^I_0 = w_0
    # A convex objective with L2 coefficient l2 has curvature s^T y / s^T s >= l2 along every pair;
    # less than half of that means the loss curves down along s (the MLP can), which no positive
    # definite B represents. Such pairs are dropped, and the iterations after a dropped pair stay
    # exact until a usable pair arrives, rather than extrapolate with stale curvature.
    history = LBFGS(cfg.m, min_curvature=cfg.l2 / 2)
    fresh = False  # did the latest exact iteration add a pair?
    stats = Stats()
    for t in range(len(batches)):
        xr, yr = batches.removed[t]  # only the removed rows: an approximate iteration needs no more
        nb, rb_count, n_kept = batches.sizes[t], len(xr), batches.n_kept(t)
        stats.iterations += 1
        if n_kept == 0:  # the whole batch was removed: retraining takes no step here either
            continue
        scheduled = t <= cfg.j0 or (t - cfg.j0) % cfg.T0 == 0  # Algorithm 1, line 5
        removed_sum = loss_grad_sum(w, xr, yr, cfg)  # Σ_{i in R ∩ batch} ∇CE_i(w^I_t)
        stats.sample_gradients += rb_count
        if scheduled or not fresh:
            xk, yk = batches.kept(t)  # the same rows, in the same order, as retrain() steps on
            kept_sum = loss_grad_sum(w, xk, yk, cfg)
            stats.exact_gradients += 1
            stats.sample_gradients += n_kept
            g = kept_sum / n_kept + cfg.l2 * w  # exactly what retrain() computes
            full = (kept_sum + removed_sum) / nb + cfg.l2 * w  # ∇F(w^I_t), the cached objective
            fresh = history.add(w - traj.params[t], full - traj.grads[t])
            stats.history_rejected += not fresh and t > 0  # at t = 0, Δw = 0 by construction
            stats.unscheduled_exact += not scheduled
        else:
            approx_full = traj.grads[t] + history.hvp(w - traj.params[t])
            g = (nb * approx_full - (removed_sum + rb_count * cfg.l2 * w)) / n_kept
        w = w - batches.lrs[t] * g  # iteration t's step size, as in training and retraining
    stats.seconds = time.perf_counter() - start
    return w, stats


# ---------------------------------------------------------------- memory of a cached trajectory

def trajectory_bytes(n_params: int, iterations: int, dtype_bytes: int = 4) -> int:
    """Parameters and gradients of every iteration."""
    return 2 * n_params * iterations * dtype_bytes


def resnet18_trajectory_bytes(iterations: int, channels: int = 3, classes: int = 10,
                              dtype_bytes: int = 4) -> dict:
    """What DeltaGrad's cache would take for this project's ResNet-18, e.g. iterations =
    30 * ceil(50000 / 128) for a 30-epoch CIFAR-10-size run."""
    from sisa.model import build_model

    params = sum(p.numel() for p in build_model("resnet18", channels, classes).parameters())
    total = trajectory_bytes(params, iterations, dtype_bytes)
    return {"params": params, "iterations": iterations, "dtype_bytes": dtype_bytes,
            "bytes_per_iteration": 2 * params * dtype_bytes, "bytes": total}


# ---------------------------------------------------------------- one benchmark cell

def benchmark(X_train, y_train, X_test, y_test, cfg: DeltaGradConfig, removed_idx) -> dict:
    """Train with the cache, then retrain and DeltaGrad in the same call (same process, same
    threads) on the same deletion. Accuracies are fractions; times are seconds."""
    X_train, X_test = features(X_train, cfg.torch_dtype), features(X_test, cfg.torch_dtype)
    removed = removed_mask(len(X_train), removed_idx)
    keep = (~removed).nonzero().squeeze(1)
    gone = removed.nonzero().squeeze(1)

    w0, traj, train_stats = train(X_train, y_train, cfg)
    w_rt, rt_stats = retrain(X_train, y_train, gone, cfg)
    w_dg, dg_stats = deltagrad_forget(X_train, y_train, gone, traj, cfg)

    def accs(w):
        return {"retain": accuracy(w, X_train[keep], y_train[keep], cfg),
                "forget": accuracy(w, X_train[gone], y_train[gone], cfg),
                "test": accuracy(w, X_test, y_test, cfg)}

    return {
        "config": asdict(cfg),
        "n_train": len(X_train), "removed": len(gone), "n_params": traj.params.shape[1],
        "accuracy": {"original": accs(w0), "retrain": accs(w_rt), "deltagrad": accs(w_dg)},
        "seconds": {"train_with_cache": train_stats.seconds, "retrain": rt_stats.seconds,
                    "deltagrad": dg_stats.seconds},
        "speedup": rt_stats.seconds / dg_stats.seconds,
        "exact_gradients": {"retrain": rt_stats.exact_gradients, "deltagrad": dg_stats.exact_gradients},
        "sample_gradients": {"retrain": rt_stats.sample_gradients, "deltagrad": dg_stats.sample_gradients},
        "lbfgs_pairs_rejected": dg_stats.history_rejected,
        "unscheduled_exact": dg_stats.unscheduled_exact,
        # DeltaGrad's distance to the retrained model, relative to how far deletion moves it
        "distance_ratio": ((w_dg - w_rt).norm() / (w0 - w_rt).norm()).item(),
        "distance": {"deltagrad_retrain": (w_dg - w_rt).norm().item(),
                     "original_retrain": (w0 - w_rt).norm().item(),
                     "retrain_norm": w_rt.norm().item()},
        "cache": {"dtype": cfg.dtype, "iterations": len(traj.params), "bytes": traj.nbytes},
    }
