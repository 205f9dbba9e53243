"""Certified removal for a convex head: Guo et al., Sekhari et al., Descent-to-Delete (issue 18).

All three unlearn one model: an L2-regularised logistic-regression head on frozen features, multiclass
as ONE-VS-REST (as Guo et al. do): K binary classifiers w_k, loss sum_k log(1 + exp(-y_k w_k.x)) with
y_k = +1 for the label and -1 otherwise. The K blocks are independent, so the Hessian is block
diagonal (K matrices d x d: factorised in milliseconds, where a multinomial head's Kd x Kd Hessian is
not), and every certificate below is stated for the joint parameter W = (w_1..w_K) as ONE vector in
R^{dK}: the Gaussian noise is drawn in R^{dK} and the norms are joint (Frobenius) norms, so the whole
head is (eps, delta)-certified, not each class separately (no K-fold composition).

Features. `prepare` maps a feature vector f to x = [clip(f / C), 1] / sqrt(2): clip to norm 1 after
dividing by C, append a constant for the bias (regularised like every weight), so ||x|| <= 1 for
every row (the bounds need a norm bound; R = 1 below). C is fixed from PUBLIC data only
(`clip_constant`: the largest public feature norm), so the clipping never depends on a deletable row.

Constants for this loss on ||x|| <= 1 (l(z) = log(1 + e^-z), l''(z) = s(z)s(-z), s the sigmoid):
  - GAMMA = max |l'''| = 1/(6 sqrt 3) ~ 0.0962: the Lipschitz constant of l'' (l''' = l''(1 - 2s) peaks
    at s = (3 - sqrt 3)/6). Guo et al. use the looser 1/4; any valid constant keeps the bounds true.
  - |l'| <= 1 and ||x|| <= 1, so the data loss of one example has gradient norm <= sqrt(K) in R^{dK}
    (L_DATA below); l'' <= 1/4, so the data loss is 1/4-smooth (BETA_DATA).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

GAMMA = 1.0 / (6.0 * math.sqrt(3.0))
BETA_DATA = 0.25


def clip_constant(public: torch.Tensor) -> float:
    """C: the largest feature norm of the PUBLIC rows, so that public features are never clipped."""
    return float(public.double().norm(dim=1).max())


def prepare(features: torch.Tensor, c: float) -> torch.Tensor:
    """(n, d) features -> (n, d + 1) float64 rows of norm <= 1 (see the module docstring)."""
    x = features.double() / c
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1.0)
    return torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1) / math.sqrt(2.0)


def signs(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """One-vs-rest targets: (n, K) float64 in {-1, +1}."""
    y = -torch.ones(len(labels), classes, dtype=torch.float64)
    y[torch.arange(len(labels)), labels] = 1.0
    return y


# --- the objective, in Guo et al.'s sum form: L(W) = sum_i l_i(W) + (lam n / 2)||W||^2 + <B, W> ---------

def gradient(X, Y, W, lam, B=None, weight=None):
    """dL/dW (d, K). `weight`: 0/1 per row (rows removed so far have 0), n = its sum."""
    z = X @ W
    a = -Y * torch.sigmoid(-Y * z)  # dl/dz per (row, class)
    if weight is not None:
        a = a * weight[:, None]
    n = len(X) if weight is None else float(weight.sum())
    g = (a.T @ X).T + lam * n * W  # a.T @ X: torch's X.T @ a takes a slow path on CPU (measured 10x)
    return g if B is None else g + B


def hessians(X, W, lam, weight=None):
    """The K diagonal blocks (K, d, d) of the Hessian at W, regulariser included (float64)."""
    z = X @ W
    s = torch.sigmoid(z) * torch.sigmoid(-z)
    if weight is not None:
        s = s * weight[:, None]
    n = len(X) if weight is None else float(weight.sum())
    eye = torch.eye(X.shape[1], dtype=X.dtype)
    out = []
    for k in range(W.shape[1]):
        xs = X * s[:, k:k + 1].sqrt()
        out.append(xs.T @ xs + lam * n * eye)
    return torch.stack(out)


def solve(chol, G):
    """H^-1 G per class: chol (K, d, d) Cholesky factors, G (d, K) -> (d, K)."""
    return torch.cholesky_solve(G.T.unsqueeze(-1), chol).squeeze(-1).T


def fit(X, Y, lam, B=None, W=None, chol=None, weight=None, tol=1e-9, max_iter=200):
    """The unique minimiser of L (to gradient norm `tol` * n): Newton-type steps W -= H^-1 grad.
    With `chol` (factors of a Hessian near the optimum, e.g. the noise-free model's) the same factors
    are reused every step (each step then costs one gradient); without, the Hessian is recomputed
    every step (quadratic convergence, ~8 s a step at n = 50,000, d = 513, K = 10 on one core).
    Returns (W, residual gradient norm): callers add the residual to their certificate's budget."""
    n = len(X) if weight is None else float(weight.sum())
    W = torch.zeros(X.shape[1], Y.shape[1], dtype=torch.float64) if W is None else W.clone()
    for _ in range(max_iter):
        g = gradient(X, Y, W, lam, B, weight)
        if g.norm() <= tol * n:
            break
        factors = chol if chol is not None else torch.linalg.cholesky(hessians(X, W, lam, weight))
        W = W - solve(factors, g)
    return W, float(gradient(X, Y, W, lam, B, weight).norm())


# --- Guo, Goldstein, Hannun, van der Maaten (ICML 2020): certified data removal -----------------------

def guo_c(delta: float) -> float:
    """c of Guo et al.'s Theorem 3: b ~ N(0, (c eps'/eps)^2 I) certifies (eps, delta) with
    delta = 1.5 exp(-c^2 / 2), i.e. c = sqrt(2 ln(1.5 / delta))."""
    return math.sqrt(2.0 * math.log(1.5 / delta))


def guo_budget(sigma: float, eps: float, delta: float) -> float:
    """The gradient-residual norm eps' that noise sigma certifies at (eps, delta): sigma eps / c."""
    return sigma * eps / guo_c(delta)


@dataclass
class Guo:
    """One head under Guo et al.'s mechanism, removing one row at a time.

    Training: the exact minimiser of L_b = L + <b, W>, b ~ N(0, sigma^2 I_{dK}) (objective perturbation).
    Removal of row j: W <- W + H^-1 D, D = grad l_j(W) + lam W (the removed point's gradient, its share of
    the regulariser included), H the Hessian of the remaining rows' loss at a reference point W_ref.

    Factorise once, update per removal: H is computed once (at training, ~8 s) at W_ref = the trained
    model; a removal subtracts the removed row's term l''_j(W_ref) x_j x_j^T + lam I from each block and
    re-factorises the K blocks (K Cholesky of 513 x 513: ~40 ms), so H stays EXACTLY the Hessian of the
    remaining rows at W_ref. Guo et al. take the Hessian at the current W; ours is at W_ref, and the
    bound pays for the difference (the drift term):

    Bound (Guo et al.'s Corollary 2, extended to W_ref != W): with u = H^-1 D, the new gradient residual
    is r + (H_eta - H) u where H_eta = int_0^1 Hess(W + s u) ds. Per class, the i-th row's coefficient in
    H_eta - H is |int l''(x_i.(w + s u)) ds - l''(x_i.w_ref)| <= GAMMA (||w - w_ref|| + ||u||) for
    ||x_i|| <= 1, so ||(H_eta - H) u|| <= GAMMA ||X|| (||w - w_ref|| + ||u||) ||X u||, X the remaining
    rows (||X|| <= the norm at training time, since removing rows cannot increase it; ||X u||^2 =
    u^T G u with G = X^T X kept up to date). The joint bound is the root sum of squares over classes.
    Bounds add up over removals (triangle inequality on r); the training residual starts the sum.
    When the sum would exceed guo_budget(sigma, eps, delta), the head is retrained from scratch on the
    remaining rows with a fresh b (and a fresh H at the new model), and the sum restarts.
    """
    X: torch.Tensor
    Y: torch.Tensor
    lam: float
    sigma: float
    budget: float
    seed: int = 0
    W: torch.Tensor = None  # optional warm start for training (e.g. the noise-free model)
    chol: torch.Tensor = None  # optional preconditioner for training (e.g. the noise-free model's factors)
    retrains: int = field(init=False, default=0)

    def __post_init__(self):
        self.gen = torch.Generator().manual_seed(self.seed)
        self.weight = torch.ones(len(self.X), dtype=torch.float64)
        self.G = self.X.T @ self.X
        self.norm_x = float(torch.linalg.eigvalsh(self.G)[-1].clamp_min(0).sqrt())
        self._train(self.chol)

    def _noise(self):
        return self.sigma * torch.randn(self.X.shape[1], self.Y.shape[1], dtype=torch.float64, generator=self.gen)

    def _train(self, chol):
        self.B = self._noise()
        self.W, residual = fit(self.X, self.Y, self.lam, self.B, self.W, chol, self.weight)
        if chol is not None:  # the reused factors were a preconditioner only: finish with exact Newton
            self.W, residual = fit(self.X, self.Y, self.lam, self.B, self.W, None, self.weight, max_iter=3)
        self.W_ref = self.W.clone()
        self.H = hessians(self.X, self.W_ref, self.lam, self.weight)
        self.chol = torch.linalg.cholesky(self.H)
        self.beta = residual

    def remove(self, row: int) -> dict:
        """Remove one row; returns the step's bound, whether it retrained, and the seconds it took."""
        start = time.perf_counter()
        x, y = self.X[row], self.Y[row]
        z = x @ self.W
        D = x[:, None] * (-y * torch.sigmoid(-y * z))[None, :] + self.lam * self.W
        zr = x @ self.W_ref
        s = torch.sigmoid(zr) * torch.sigmoid(-zr)
        xx = torch.outer(x, x)
        self.H -= s[:, None, None] * xx + self.lam * torch.eye(len(x), dtype=torch.float64)
        self.G -= xx
        self.weight[row] = 0.0
        self.chol = torch.linalg.cholesky(self.H)
        u = solve(self.chol, D)
        drift = (self.W - self.W_ref).norm(dim=0)
        xu = torch.einsum("dk,de,ek->k", u, self.G, u).clamp_min(0).sqrt()
        bound = float((GAMMA * self.norm_x * (drift + u.norm(dim=0)) * xu).norm())
        retrained = self.beta + bound > self.budget
        if retrained:
            self.retrains += 1
            self._train(self.chol)
        else:
            self.W = self.W + u
            self.beta += bound
        return {"bound": bound, "retrained": retrained, "seconds": time.perf_counter() - start}

    def residual(self) -> float:
        """The measured ||grad L_b(W; remaining rows)||, which `beta` bounds."""
        return float(gradient(self.X, self.Y, self.W, self.lam, self.B, self.weight).norm())


# --- Sekhari, Acharya, Kamath, Suresh (NeurIPS 2021): Hessian plus Gaussian noise --------------------------

def sekhari_constants(classes: int, lam: float) -> tuple[float, float]:
    """(M, L) for f(W, z) = sum_k l(y_k w_k.x) + (lam/2)||W||^2 with ||x|| <= 1 (mean form, F = mean f).

    M, the Lipschitz constant of the Hessian of f: the Hessian is block diagonal with blocks
    l''(w_k.x) x x^T + lam I, so ||Hess f(W) - Hess f(W')|| = max_k |l''(w_k.x) - l''(w'_k.x)| ||x||^2
    <= GAMMA |(w_k - w'_k).x| ||x||^2 <= GAMMA ||W - W'|| (||x|| <= 1): M = GAMMA.
    L, the Lipschitz constant of f where it matters: the data part's gradient has norm <= sqrt(K)
    (|l'| <= 1, ||x|| <= 1), and every empirical minimiser satisfies lam W = -mean(data gradients), so
    ||W|| <= sqrt(K)/lam; on that ball the regulariser's gradient adds at most lam sqrt(K)/lam, so
    ||grad f|| <= 2 sqrt(K): L = 2 sqrt(K). (The analysis only evaluates gradients at minimisers of the
    full and the reduced objective, both in the ball.)"""
    return GAMMA, 2.0 * math.sqrt(classes)


def sekhari_sigma(eps: float, delta: float, m: int, n: int, lam: float, classes: int) -> float:
    """The tutorial's Algorithm 1: gamma = 2 M m^2 L^2 / (lam^3 n^2), sigma = (gamma/eps) sqrt(2 ln(1.25/delta))."""
    M, L = sekhari_constants(classes, lam)
    gamma = 2.0 * M * m ** 2 * L ** 2 / (lam ** 3 * n ** 2)
    return gamma / eps * math.sqrt(2.0 * math.log(1.25 / delta))


@dataclass
class Sekhari:
    """Sekhari et al.'s unlearning with a deletion capacity m: train the noise-free minimiser w_hat
    (mean form: F = mean f, lam-strongly convex) and keep its Hessian; after deletions U (|U| <= m),
    publish w_bar + nu with H_hat = (n Hess F(w_hat) - sum_U Hess f(w_hat, z)) / (n - m'),
    w_bar = w_hat + H_hat^-1 sum_U grad f(w_hat, z) / (n - m') (the same step in sum form here:
    (H_sum - H_U)^-1 G_U), nu ~ N(0, sigma^2 I), sigma = sekhari_sigma(eps, delta, m, n, ...). Every
    published model gets noise of the same sigma: the reference is w_hat(D \\ U) + nu. When |U| reaches
    m the head is retrained on the remaining rows (a new w_hat, a new Hessian) and U restarts."""
    X: torch.Tensor
    Y: torch.Tensor
    lam: float
    capacity: int
    eps: float
    delta: float
    seed: int = 0
    W: torch.Tensor = None  # optional warm start (e.g. a shared noise-free model)
    retrains: int = field(init=False, default=0)

    def __post_init__(self):
        self.gen = torch.Generator().manual_seed(self.seed)
        self.weight = torch.ones(len(self.X), dtype=torch.float64)
        self._train(None)

    def _train(self, chol):
        self.w_hat, _ = fit(self.X, self.Y, self.lam, None, self.W, chol, self.weight)
        self.H = hessians(self.X, self.w_hat, self.lam, self.weight)  # sum form at w_hat
        self.n0 = int(self.weight.sum())
        self.G_U = torch.zeros_like(self.w_hat)
        self.m = 0
        self.publish(self.w_hat)

    def sigma(self, eps: float | None = None) -> float:
        return sekhari_sigma(eps or self.eps, self.delta, self.capacity, self.n0, self.lam, self.Y.shape[1])

    def publish(self, mean):
        """The released model is mean + sigma nu; `released(eps)` gives it at another eps, same draw."""
        self.mean = mean
        self.nu = torch.randn(mean.shape, dtype=torch.float64, generator=self.gen)
        self.W = self.released()

    def released(self, eps: float | None = None):
        return self.mean + self.sigma(eps) * self.nu

    def remove(self, row: int) -> dict:
        """Delete one row; a deletion beyond the capacity retrains on the remaining rows instead."""
        start = time.perf_counter()
        x, y = self.X[row], self.Y[row]
        z = x @ self.w_hat
        s = torch.sigmoid(z) * torch.sigmoid(-z)
        self.H -= s[:, None, None] * torch.outer(x, x) + self.lam * torch.eye(len(x), dtype=torch.float64)
        self.G_U += x[:, None] * (-y * torch.sigmoid(-y * z))[None, :] + self.lam * self.w_hat
        self.weight[row] = 0.0
        self.m += 1
        retrained = self.m > self.capacity
        chol = torch.linalg.cholesky(self.H)
        if retrained:
            self.retrains += 1
            self.W = self.w_hat  # warm start
            self._train(chol)
        else:
            self.publish(self.w_hat + solve(chol, self.G_U))
        return {"retrained": retrained, "seconds": time.perf_counter() - start}


# --- Neel, Roth, Sharifi-Malvajerdi (ALT 2021): Descent-to-Delete ---------------------------------------

@dataclass(frozen=True)
class D2DConstants:
    """Mean-form objective f = mean l + (lam/2)||W||^2 on the ball ||W|| <= radius = sqrt(K)/lam (it
    holds every minimiser, see sekhari_constants): strong convexity m = lam, smoothness
    beta = 1/4 + lam (l'' <= 1/4, ||x|| <= 1), Lipschitz L = 2 sqrt(K) on the ball, step
    eta = 2/(beta + m), contraction gamma = (beta - m)/(beta + m) per projected step."""
    lam: float
    classes: int

    @property
    def radius(self):
        return math.sqrt(self.classes) / self.lam

    @property
    def lipschitz(self):
        return 2.0 * math.sqrt(self.classes)

    @property
    def beta(self):
        return BETA_DATA + self.lam

    @property
    def eta(self):
        return 2.0 / (self.beta + self.lam)

    @property
    def gamma(self):
        return (self.beta - self.lam) / (self.beta + self.lam)

    def train_steps(self, T: int, n: int) -> int:
        """Neel et al.'s I = T + log(D m n / (2L)) / log(1/gamma), D = 2 radius the ball's diameter:
        enough steps from anywhere in the ball that the trained model is as close to the optimum
        as T steps make an updated one."""
        return T + max(0, math.ceil(math.log(2 * self.radius * self.lam * n / (2 * self.lipschitz))
                                    / math.log(1 / self.gamma)))

    def sigma(self, T: int, n: int, eps: float, delta: float) -> float:
        """Neel et al.'s Theorem (perturbed GD, strongly convex): with
        Delta = 8 L gamma^T / (m n (1 - gamma^T)) (the distance between the updated and the retrained
        secret state it guarantees, twice), sigma = Delta / (sqrt 2 (sqrt(ln(1/delta) + eps) - sqrt(ln(1/delta))))."""
        g = self.gamma ** T
        big_delta = 8.0 * self.lipschitz * g / (self.lam * n * (1.0 - g))
        return big_delta / (math.sqrt(2.0) * (math.sqrt(math.log(1 / delta) + eps) - math.sqrt(math.log(1 / delta))))


def project(W, radius):
    norm = W.norm()
    return W * (radius / norm) if norm > radius else W


def pgd(X, Y, W, weight, k: D2DConstants, steps: int, trace: list | None = None):
    """`steps` projected gradient steps on the mean-form objective of the rows with weight 1."""
    n = float(weight.sum())
    for _ in range(steps):
        W = project(W - k.eta * gradient(X, Y, W, k.lam, None, weight) / n, k.radius)
        if trace is not None:
            trace.append(float(W.norm()))
    return W


@dataclass
class D2D:
    """Descent-to-Delete, the secret-state variant: the unnoised iterate theta is kept, every published
    model is theta + N(0, sigma^2 I). Training: I projected GD steps from 0; each deletion: T steps
    from the current theta on the remaining rows. It never retrains; its noise is fixed by (T, lam)."""
    X: torch.Tensor
    Y: torch.Tensor
    lam: float
    T: int
    eps: float
    delta: float
    seed: int = 0
    theta: torch.Tensor = None  # optional: a secret state already trained (shared across eps / seeds)
    retrains: int = field(init=False, default=0)

    def __post_init__(self):
        self.k = D2DConstants(self.lam, self.Y.shape[1])
        self.gen = torch.Generator().manual_seed(self.seed)
        self.weight = torch.ones(len(self.X), dtype=torch.float64)
        if self.theta is None:
            zero = torch.zeros(self.X.shape[1], self.Y.shape[1], dtype=torch.float64)
            self.theta = pgd(self.X, self.Y, zero, self.weight, self.k, self.k.train_steps(self.T, len(self.X)))
        self.publish()

    def sigma(self, eps: float | None = None) -> float:
        return self.k.sigma(self.T, int(self.weight.sum()), eps or self.eps, self.delta)

    def publish(self):
        self.nu = torch.randn(self.theta.shape, dtype=torch.float64, generator=self.gen)
        self.W = self.released()

    def released(self, eps: float | None = None):
        """theta + sigma(eps) nu: the published model at another eps, same draw."""
        return self.theta + self.sigma(eps) * self.nu

    def remove(self, row: int) -> dict:
        start = time.perf_counter()
        self.weight[row] = 0.0
        self.theta = pgd(self.X, self.Y, self.theta, self.weight, self.k, self.T)
        self.publish()
        return {"retrained": False, "seconds": time.perf_counter() - start}


# --- least squares: where one Newton step is exact -----------------------------------------------------

def ridge(X, y, lam):
    """argmin ||X w - y||^2 / 2 + lam n ||w||^2 / 2 (sum form, as Guo et al.)."""
    return torch.linalg.solve(X.T @ X + lam * len(X) * torch.eye(X.shape[1], dtype=X.dtype), X.T @ y)


def ridge_remove(X, y, lam, w, row):
    """Guo et al.'s Newton removal on the quadratic loss: exact, the Hessian being constant."""
    keep = torch.ones(len(X), dtype=torch.bool)
    keep[row] = False
    Xk = X[keep]
    H = Xk.T @ Xk + lam * len(Xk) * torch.eye(X.shape[1], dtype=X.dtype)
    D = X[row] * (X[row] @ w - y[row]) + lam * w
    return w + torch.linalg.solve(H, D)
