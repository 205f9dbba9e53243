"""Metrics of BENCHMARKS.md, computed from per-sample logits (or ensemble probabilities).

- accuracy on the forget, retain and test sets (UA = 100 - forget accuracy, SalUn's convention);
- MIA, NeurIPS'23-kit form: a logistic regression separating forget-set losses (label 1) from
  test-set losses (label 0), class-balanced, mean accuracy over a 10-split StratifiedShuffleSplit.
  A model that forgot gives ~50%;
- MIA-efficacy, SalUn form: an SVC (rbf, C=3) on the true-class probability, fit to tell retain
  (member) from test (non-member) samples, applied to the forget set; efficacy is the fraction of
  forget samples it calls non-members (higher = more forgotten; Retrain's value is the target);
- gap to retrain: mean absolute difference to Retrain over forget, retain, test accuracy and
  MIA-efficacy, in points.
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
    cv = StratifiedShuffleSplit(n_splits=10, test_size=0.3, random_state=seed)
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
