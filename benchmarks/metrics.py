"""Metrics of BENCHMARKS.md, computed from per-sample logits (or ensemble probabilities).

- accuracy on the forget, retain and test sets (UA = 100 - forget accuracy, SalUn's convention);
- MIA, NeurIPS'23-kit form: a logistic regression separating forget-set losses (label 1) from
  test-set losses (label 0), class-balanced, mean accuracy over a 10-split StratifiedShuffleSplit
  with the kit's defaults (scikit-learn's: 10% held out per split; results committed before issue
  11 held out 30%). A model that forgot gives ~50%;
- MIA-efficacy, SalUn form: an SVC (rbf, C=3) on the true-class probability, fit to tell retain
  (member) from test (non-member) samples, applied to the forget set; efficacy is the fraction of
  forget samples it calls non-members (higher = more forgotten; Retrain's value is the target);
- gap to retrain: mean absolute difference to Retrain over forget, retain, test accuracy and
  MIA-efficacy, in points;
- the NeurIPS 2023 unlearning challenge score (Triantafillou et al.; `forgetting_score`): from N
  unlearned and N retrained models, a per-forget-example epsilon (threshold attacks on the logit-scaled
  confidences), bucketed into points 1, 1/2, 1/4, ..., averaged into the forget quality F, times the
  retain- and test-accuracy ratios of unlearned to retrained models. Definitions and sources at
  `per_example_epsilon` and below.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedShuffleSplit, cross_val_score
from sklearn.svm import SVC


def _balanced(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = min(len(a), len(b))
    return rng.choice(a, n, replace=False), rng.choice(b, n, replace=False)


def mia_kit(forget_losses: np.ndarray, test_losses: np.ndarray, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    f, t = _balanced(forget_losses, test_losses, rng)
    x = np.concatenate([f, t])[:, None]
    y = np.concatenate([np.ones(len(f)), np.zeros(len(t))])
    cv = StratifiedShuffleSplit(n_splits=10, random_state=seed)  # the starting kit's: test_size 0.1
    return float(cross_val_score(LogisticRegression(), x, y, cv=cv, scoring="accuracy").mean())


def mia_efficacy(retain_p: np.ndarray, test_p: np.ndarray, forget_p: np.ndarray, seed: int = 0,
                 max_fit: int = 5000) -> float:
    rng = np.random.default_rng(seed)
    r, t = _balanced(retain_p, test_p, rng)
    r, t = r[:max_fit], t[:max_fit]  # an rbf SVC is quadratic in its training set
    clf = SVC(C=3, kernel="rbf", gamma="auto")
    clf.fit(np.concatenate([r, t])[:, None], np.concatenate([np.ones(len(r)), np.zeros(len(t))]))
    return float((clf.predict(forget_p[:, None]) == 0).mean())


def evaluate(proba_or_logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
             are_logits: bool = True) -> dict[str, float]:
    """`proba_or_logits` and `labels` keyed by "forget", "retain", "test"."""
    out = {}
    probs, losses = {}, {}
    for k in ("forget", "retain", "test"):
        z, y = proba_or_logits[k].float(), labels[k]
        p = z.softmax(-1) if are_logits else z
        pred = z.argmax(-1)
        out[f"{k}_acc"] = 100 * (pred == y).float().mean().item()
        true_p = p.gather(1, y[:, None]).squeeze(1).clamp_min(1e-12)
        probs[k], losses[k] = true_p.numpy(), (-true_p.log()).numpy()
    out["mia_kit"] = 100 * mia_kit(losses["forget"], losses["test"])
    out["mia_efficacy"] = 100 * mia_efficacy(probs["retain"], probs["test"], probs["forget"])
    return out


def gap(method: dict[str, float], retrain: dict[str, float]) -> float:
    keys = ("forget_acc", "retain_acc", "test_acc", "mia_efficacy")
    return float(np.mean([abs(method[k] - retrain[k]) for k in keys]))


# --- NeurIPS 2023 unlearning challenge score (Triantafillou et al.) ---------------------------------
#
# Sources, read for this implementation (our code, written from them, not a copy):
#  [R] the organisers' evaluation write-up, "Evaluation for the NeurIPS Machine Unlearning Competition"
#      (Aug 2023), https://unlearning-challenge.github.io/assets/data/Machine_Unlearning_Metric.pdf:
#      Eq. 1 (epsilon from FPR/FNR at fixed delta), Algorithm 1 (per-example epsilon over m attacks),
#      H(s) = 2 / 2^n(s) with bins of width 0.5 over [0, 6.5) for N = 512, F = mean_s H(s), and the
#      final score F * (RA_U / RA_R) * (TA_U / TA_R);
#  [C] the scoring code, github.com/google-deepmind/unlearning_evaluation, metric.py (the transform f,
#      the decision rules, delta, the cap, the bins) and main.py (the utility adjustment);
#  Triantafillou et al., "Are we making progress in unlearning? Findings from the first NeurIPS
#  unlearning competition", arXiv:2406.09073 (2024), which reports on this metric.

NEURIPS23_DELTA = 1e-5  # [C] DELTA; [R] fixes delta but does not give its value
NEURIPS23_EPSILON_CAP = 50.0  # [C] EPSILON_CAP: perfect separation (epsilon = inf) and "peaky" cases
NEURIPS23_BIN_WIDTH = 0.5  # [R], [C]
NEURIPS23_PEAKY_RATIO = 0.01  # [C] only: range ratio below which an example gets the cap
NEURIPS23_BUFFER = 2.0  # [C] only: slack, in logit units, of the two-threshold rule family
_CONF_FLOOR = 1e-45  # [C]: added to both probabilities before the log


def logit_confidence(probs, labels, are_logits: bool = False) -> np.ndarray:
    """Logit-scaled confidence of the true class, phi = log(p_y) - log(sum_{c != y} p_c), the f of [R].

    `probs`: (..., n, C) class probabilities (or logits when `are_logits`), e.g. (N models, n examples,
    C); `labels`: (n,) ints. Returns (..., n) float64. As in [C] (after LiRA's score.py): logits are
    turned into probabilities by a max-shifted softmax (in float64 throughout; [C] exponentiates the
    model's float32 logits and then casts, a rounding-level difference); the wrong-class mass is the sum of
    the other probabilities, not 1 - p_y (exact when p_y is near 1); 1e-45 is added to both before the
    log, so a probability that is exactly 0 gives log(1e-45) ~ -103.6 and phi stays finite, in about
    [-103.6, 103.6]. Rows are renormalised to sum to 1 (a no-op for softmax outputs)."""
    x = np.asarray(probs.detach().cpu() if isinstance(probs, torch.Tensor) else probs, dtype=np.float64)
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if x.ndim < 2:
        raise ValueError(f"probs must be (..., n, C), got shape {x.shape}")
    if y.ndim != 1 or len(y) != x.shape[-2]:
        raise ValueError(f"labels must be (n,) with n = {x.shape[-2]} (probs {x.shape}), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and (y.min() < 0 or y.max() >= x.shape[-1])):
        raise ValueError(f"labels must be ints in [0, {x.shape[-1]})")
    if not np.isfinite(x).all():
        raise ValueError("probs contain NaN or inf")
    if are_logits:
        x = np.exp(x - x.max(-1, keepdims=True))
    elif (x < 0).any():
        raise ValueError("probabilities must be >= 0 (pass are_logits=True for logits)")
    if not (x.sum(-1) > 0).all():
        raise ValueError("every row of probabilities must have a positive sum")
    x = x / x.sum(-1, keepdims=True)
    onehot = np.arange(x.shape[-1]) == y[:, None]  # (n, C)
    right = np.where(onehot, x, 0.0).sum(-1)
    wrong = np.where(onehot, 0.0, x).sum(-1)
    return np.log(right + _CONF_FLOOR) - np.log(wrong + _CONF_FLOOR)


def _check_confs(unlearned_conf, retrained_conf) -> tuple[np.ndarray, np.ndarray]:
    u, r = np.asarray(unlearned_conf, dtype=np.float64), np.asarray(retrained_conf, dtype=np.float64)
    if u.ndim != 2 or r.ndim != 2:
        raise ValueError(f"confidences must be (N models, n examples), got {u.shape} and {r.shape}")
    if u.shape != r.shape:
        raise ValueError(f"unlearned {u.shape} and retrained {r.shape} confidences must have the same "
                         "shape (N models, n examples): N vs N models on the same forget examples")
    if u.shape[0] < 3:
        raise ValueError(f"need N >= 3 models per side (bins end at ceil(log(N - 1))), got N = {u.shape[0]}")
    if u.shape[1] == 0:
        raise ValueError("need at least one forget example (n = 0)")
    if not (np.isfinite(u).all() and np.isfinite(r).all()):
        raise ValueError("confidences contain NaN or inf")
    return u, r


def _epsilon_of_rates(fpr: np.ndarray, fnr: np.ndarray, delta: float) -> np.ndarray:
    """Eq. 1 of [R] per attack, with Algorithm 1's special cases: inf when FPR = FNR = 0 (the attack
    separates the two samples), NaN (attack discarded) when exactly one of them is 0, else
    max(log(1 - delta - FPR) - log FNR, log(1 - delta - FNR) - log FPR) clipped at 0 ([C] clips; a
    term whose log argument is <= 0 counts as -inf)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(1 - delta - fpr > 0, np.log(np.maximum(1 - delta - fpr, 1e-300)), -np.inf) - np.log(fnr)
        b = np.where(1 - delta - fnr > 0, np.log(np.maximum(1 - delta - fnr, 1e-300)), -np.inf) - np.log(fpr)
        eps = np.maximum(np.maximum(a, b), 0.0)
    eps = np.where((fpr == 0) != (fnr == 0), np.nan, eps)
    return np.where((fpr == 0) & (fnr == 0), np.inf, eps)


def per_example_epsilon(unlearned_conf, retrained_conf, delta: float = NEURIPS23_DELTA,
                        cap: float = NEURIPS23_EPSILON_CAP, peaky_ratio: float | None = NEURIPS23_PEAKY_RATIO,
                        buffer: float = NEURIPS23_BUFFER, max_pairs: int = 1 << 20) -> np.ndarray:
    """Per-forget-example epsilon of the NeurIPS'23 challenge: (N, n) and (N, n) -> (n,), in [0, cap].

    For example s, U_s and R_s are the N unlearned and the N retrained confidences (a column each).
    An attack is a decision rule telling which sample a value came from; its FPR and FNR are plain
    empirical fractions over the N + N values (no confidence bounds: [R] sec. 3). Epsilon_s is the
    largest Eq.-1 epsilon over the attacks ([R] Algorithm 1, `_epsilon_of_rates`), clipped to [0, cap];
    inf (some attack separates the samples) therefore becomes `cap`, as in [C]. The two rule families
    are those of [C]:

    - one threshold t: values >= t are called the sample with the larger median (the retrained one
      when its median is strictly larger, else the unlearned one); every t in R;
    - two thresholds a <= b: values in [a, b] are called the "peakier" sample K, the one with the
      smaller range max - min (ties: the sample with the smaller median, as in [C]); with w the range
      of K, the family is b in [max K - buffer, max K + buffer], b - a in [w - buffer, w + buffer].

    Before that, if min(range U_s, range R_s) / max(...) < `peaky_ratio` (one sample nearly constant
    and the other not), epsilon_s = cap ([C]'s guard; pass None to turn it off). Two constant samples
    are not "peaky" (0/0 in [C]); if no attack survives (only possible when both samples take a
    single value, the same one), epsilon_s = 0 where [C] would fail an assertion.

    What differs from [C]: [C] evaluates both families on grids (100 thresholds per logit unit;
    400 x 400 pairs for the two-threshold rule). Rates only change where a threshold crosses a
    sample value, so we evaluate each family exactly: every threshold at a sample value, and every
    [a, b] whose set of covered values is reachable inside the continuous family above (a rectangle
    of (a, b) meets the band w - buffer <= b - a <= w + buffer). Our epsilon_s is the supremum over
    the family; [C]'s grid value is at most that, and equal unless two values from different samples
    lie closer than the grid step. Cost: O((2N)^2) per example for the two-threshold family
    (chunked so that at most `max_pairs` pairs are held at once; ~70 ms per example at N = 512 on one
    CPU core). Checked against [C] run on CPU (with its `assert thr_eps`, which as published raises
    on any array of 2+ surviving thresholds, changed to test the length) on 175 synthetic examples,
    N = 4, 16, 32: equal to float32 rounding on 171; on the other 4, two values from different
    samples were closer than [C]'s grid step, and ours is the larger."""
    u, r = _check_confs(unlearned_conf, retrained_conf)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    n_models, n_ex = u.shape
    # One threshold: orient each example so that "pos" is the sample with the larger median.
    retrain_pos = np.median(r, 0) > np.median(u, 0)
    pos, neg = np.where(retrain_pos, r, u), np.where(retrain_pos, u, r)
    vals = np.concatenate([pos, neg], 0)  # (M, n), M = 2N
    is_pos = np.concatenate([np.ones_like(pos, dtype=bool), np.zeros_like(neg, dtype=bool)], 0)
    order = np.argsort(vals, axis=0, kind="stable")
    v = np.take_along_axis(vals, order, 0)
    lab = np.take_along_axis(is_pos, order, 0)
    m = 2 * n_models
    cpos = np.concatenate([np.zeros((1, n_ex)), np.cumsum(lab, 0)], 0)  # pos values among the k smallest
    cneg = np.arange(m + 1)[:, None] - cpos
    first = np.ones((m, n_ex), dtype=bool)  # v[k] starts a run of equal values
    first[1:] = v[1:] != v[:-1]
    last = np.ones((m, n_ex), dtype=bool)  # v[k] ends one
    last[:-1] = v[:-1] != v[1:]
    # Threshold t = v[k] (k starting a run): values >= t called pos.
    fnr1 = cpos[:-1] / n_models
    fpr1 = (n_models - cneg[:-1]) / n_models
    eps1 = np.where(first, _epsilon_of_rates(fpr1, fnr1, delta), np.nan)
    best = np.nanmax(np.where(np.isnan(eps1), -np.inf, eps1), 0)
    # Two thresholds: K = the peakier sample.
    range_pos, range_neg = np.ptp(pos, 0), np.ptp(neg, 0)
    k_is_pos = range_pos < range_neg  # [C]: ties (>=) make the other (smaller-median) sample K
    w = np.minimum(range_pos, range_neg)
    k_max = np.where(k_is_pos, pos.max(0), neg.max(0))
    cK = np.where(k_is_pos, cpos, cneg)  # K values among the k smallest
    cW = np.where(k_is_pos, cneg, cpos)
    v_prev = np.concatenate([np.full((1, n_ex), -np.inf), v[:-1]], 0)
    v_next = np.concatenate([v[1:], np.full((1, n_ex), np.inf)], 0)
    ii, jj = np.triu_indices(m)  # covered values: sorted positions i..j, i <= j
    chunk = max(1, max_pairs // len(ii))
    for s0 in range(0, n_ex, chunk):
        e = slice(s0, min(n_ex, s0 + chunk))
        vi, vj, vp, vn = v[ii, e], v[jj, e], v_prev[ii, e], v_next[jj, e]
        lo_b, hi_b = k_max[e] - buffer, k_max[e] + buffer
        # a in (v[i-1], v[i]], b in [v[j], v[j+1]) cover exactly positions i..j; intersect with the family.
        b_lo, b_hi = np.maximum(vj, lo_b), np.minimum(vn, hi_b)
        ok = first[ii, e] & last[jj, e] & (vj <= hi_b) & (vn > lo_b)
        ok &= (b_lo - vi <= w[e] + buffer) & (b_hi - vp > w[e] - buffer)
        inside_k = cK[jj + 1, e] - cK[ii, e]
        inside_w = cW[jj + 1, e] - cW[ii, e]
        eps2 = _epsilon_of_rates(inside_w / n_models, (n_models - inside_k) / n_models, delta)
        eps2 = np.where(ok & ~np.isnan(eps2), eps2, -np.inf)
        best[e] = np.maximum(best[e], eps2.max(0))
    best = np.where(np.isneginf(best), 0.0, best)  # no surviving attack: both samples one same value
    if peaky_ratio is not None:
        small, large = np.minimum(range_pos, range_neg), np.maximum(range_pos, range_neg)
        with np.errstate(invalid="ignore", divide="ignore"):
            peaky = (large > 0) & (small / np.where(large > 0, large, 1.0) < peaky_ratio)
        best = np.where(peaky, cap, best)
    return np.clip(best, 0.0, cap)


def epsilon_points(epsilons, n_models: int, bin_width: float = NEURIPS23_BIN_WIDTH) -> np.ndarray:
    """H(s) of [R]: 2 / 2^n(s) = 2^-k for epsilon_s in [k * bin_width, (k + 1) * bin_width), so 1, 1/2,
    1/4, ... from epsilon = 0; 0 at and beyond ceil(log(N - 1)) ([C]'s last bin edge; 7 for N = 512).
    [R] states 13 bins over [0, 6.5) for N = 512 and [C] has 14 over [0, 7); they score alike, since
    a finite epsilon is below log(N (1 - delta) - 1) < log(N - 1) (FPR, FNR >= 1/N when not 0), i.e.
    below 6.24 for N = 512: only `cap` (separation, peaky) reaches the last edge and scores 0."""
    eps = np.asarray(epsilons, dtype=np.float64)
    if n_models < 3:
        raise ValueError(f"need N >= 3 models per side, got {n_models}")
    if np.isnan(eps).any() or (eps < 0).any():
        raise ValueError("epsilons must be >= 0 and not NaN")
    top = np.ceil(np.log(n_models - 1))
    k = np.floor(eps / bin_width)
    return np.where(eps < top, 0.5 ** np.minimum(k, 1e4), 0.0)


def forget_quality(unlearned_conf, retrained_conf, delta: float = NEURIPS23_DELTA, **kw) -> float:
    """F of [R]: the mean over forget examples of H(s), in [0, 1]; 1 iff every epsilon_s < bin_width.
    Inputs as for `per_example_epsilon`: (N models, n examples) confidences of each side."""
    eps = per_example_epsilon(unlearned_conf, retrained_conf, delta=delta, **kw)
    return float(epsilon_points(eps, np.shape(unlearned_conf)[0]).mean())


def _mean_accuracy(acc, name: str) -> float:
    a = np.asarray(acc, dtype=np.float64).ravel()
    if a.size == 0 or not np.isfinite(a).all() or (a < 0).any():
        raise ValueError(f"{name} must be one or more finite accuracies >= 0, got {acc!r}")
    return float(a.mean())


def forgetting_score(unlearned, retrained, labels, unlearned_retain_acc, retrained_retain_acc,
                     unlearned_test_acc, retrained_test_acc, are_logits: bool = False,
                     delta: float = NEURIPS23_DELTA, **kw) -> dict:
    """The NeurIPS 2023 unlearning challenge score of an unlearning method against retraining.

    `unlearned`, `retrained`: (N, n, C) probabilities (or logits, `are_logits`) of N unlearned and N
    retrained models (independent seeds) on the n forget examples, `labels`: (n,). Accuracies: per
    model (N,) or already averaged, in any one unit (percent or fraction) for all four; they are
    averaged over the models (RA_U, RA_R, TA_U, TA_R of [R]).

    score = F * (RA_U / RA_R) * (TA_U / TA_R) ([R] sec. 5, [C] main.py). Neither source clips the
    ratios, nor do we: a method more accurate than retraining gets a factor > 1 (the score can then
    exceed F, and 1). [R]'s efficiency cut-off (reject methods slower than ~20% of retraining) is not
    part of this score. Returns the components: forget_quality (F), retain_factor, test_factor,
    score, the epsilon summary (mean, median, max, fraction at the cap), bin_counts (examples per
    bin of width 0.5, then those scoring 0), epsilons (the (n,) array), n_models, n_examples, delta."""
    u = np.asarray(unlearned.detach().cpu() if isinstance(unlearned, torch.Tensor) else unlearned)
    r = np.asarray(retrained.detach().cpu() if isinstance(retrained, torch.Tensor) else retrained)
    if u.ndim != 3 or u.shape != r.shape:
        raise ValueError(f"unlearned {u.shape} and retrained {r.shape} must both be (N models, n examples, "
                         "C classes)")
    uc = logit_confidence(u, labels, are_logits=are_logits)
    rc = logit_confidence(r, labels, are_logits=are_logits)
    eps = per_example_epsilon(uc, rc, delta=delta, **kw)
    n_models = u.shape[0]
    pts = epsilon_points(eps, n_models)
    ra_u, ra_r = _mean_accuracy(unlearned_retain_acc, "unlearned_retain_acc"), _mean_accuracy(
        retrained_retain_acc, "retrained_retain_acc")
    ta_u, ta_r = _mean_accuracy(unlearned_test_acc, "unlearned_test_acc"), _mean_accuracy(
        retrained_test_acc, "retrained_test_acc")
    if ra_r == 0 or ta_r == 0:
        raise ValueError("retrained accuracies must be > 0 (they divide)")
    f = float(pts.mean())
    top = np.ceil(np.log(n_models - 1))
    n_bins = int(round(top / NEURIPS23_BIN_WIDTH))
    k = np.where(eps < top, np.floor(eps / NEURIPS23_BIN_WIDTH), n_bins).astype(int)
    cap = kw.get("cap", NEURIPS23_EPSILON_CAP)
    return {
        "forget_quality": f,
        "retain_factor": ra_u / ra_r,
        "test_factor": ta_u / ta_r,
        "score": f * (ra_u / ra_r) * (ta_u / ta_r),
        "epsilon_mean": float(eps.mean()),
        "epsilon_median": float(np.median(eps)),
        "epsilon_max": float(eps.max()),
        "frac_epsilon_capped": float((eps >= cap).mean()),
        "bin_counts": np.bincount(k, minlength=n_bins + 1).tolist(),
        "epsilons": eps,
        "n_models": n_models,
        "n_examples": u.shape[1],
        "delta": delta,
    }
