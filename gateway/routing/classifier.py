"""The classifier: L2-regularised logistic regression on soft labels, folded into one weight vector.

Soft targets y in [0, 1] are fit by the usual duplication trick: every row appears once as a positive
with weight y and once as a negative with weight 1 − y, which is exactly the cross-entropy against y.
Training standardises the statistics columns and scales the hashed block; both are folded back into
the weights afterwards, so scoring is ``sigmoid(w · x_raw + b)`` on the raw feature vector, in numpy, in
ONNX, or by hand. A Platt step (Platt, 1999) then maps the margin to the probability that the edge
answer loses, fit on out-of-fold margins so the training fit does not make it overconfident.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold


@dataclass(slots=True)
class LinearModel:
    """``p = sigmoid(weights · x + bias)`` over the raw feature vector; float32 weights, as saved."""

    weights: np.ndarray  # [num_features] float32
    bias: float

    def margins(self, x: sparse.csr_matrix) -> np.ndarray:
        return np.asarray(x @ self.weights.astype(np.float64)).ravel() + self.bias

    def predict(self, x: sparse.csr_matrix) -> np.ndarray:
        return sigmoid(self.margins(x))


def sigmoid(z: np.ndarray | float) -> np.ndarray | float:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


@dataclass(slots=True)
class LinearFitConfig:
    """Hyperparameters of :func:`fit_linear`."""

    c: float = 1.0  # inverse L2 strength, as in sklearn
    hash_scale: float = 1.0  # multiplies the hashed block before the fit: larger = n-grams regularised less
    max_iter: int = 1000
    tol: float = 1e-5

    def __post_init__(self) -> None:
        if self.c <= 0:
            raise ValueError(f"c must be > 0, got {self.c}")
        if self.hash_scale < 0:
            raise ValueError(f"hash_scale must be >= 0, got {self.hash_scale}")


def _fit_raw(
    x: sparse.csr_matrix, y: np.ndarray, w: np.ndarray, hash_dim: int, cfg: LinearFitConfig
) -> tuple[np.ndarray, float]:
    stats = x[:, hash_dim:].toarray()
    mean, std = stats.mean(axis=0), stats.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    hashed = x[:, :hash_dim] * cfg.hash_scale
    design = sparse.hstack([hashed, sparse.csr_matrix((stats - mean) / std)], format="csr")
    both = sparse.vstack([design, design], format="csr")
    target = np.concatenate([np.ones(len(y)), np.zeros(len(y))])
    weight = np.concatenate([y * w, (1.0 - y) * w])
    keep = weight > 0
    clf = LogisticRegression(C=cfg.c, max_iter=cfg.max_iter, tol=cfg.tol)
    clf.fit(both[keep], target[keep], sample_weight=weight[keep])
    coef = clf.coef_.ravel()
    weights = np.concatenate([coef[:hash_dim] * cfg.hash_scale, coef[hash_dim:] / std])
    bias = float(clf.intercept_[0] - np.sum(coef[hash_dim:] * mean / std))
    return weights, bias


def fit_linear(
    x: sparse.csr_matrix,
    y: np.ndarray,
    *,
    hash_dim: int,
    cfg: LinearFitConfig | None = None,
    sample_weight: np.ndarray | None = None,
    platt_target: np.ndarray | None = None,
    num_folds: int = 5,
    seed: int = 0,
    calibrate: bool = True,
) -> tuple[LinearModel, dict[str, float]]:
    """Fit on soft labels ``y``; calibrate to ``platt_target`` (defaults to ``y``) on out-of-fold margins.

    Returns the model and the Platt parameters ``{"a", "b"}`` already folded into it.
    """
    cfg = cfg or LinearFitConfig()
    y = np.clip(np.asarray(y, dtype=np.float64), 0.0, 1.0)
    w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    weights, bias = _fit_raw(x, y, w, hash_dim, cfg)
    target = y if platt_target is None else np.asarray(platt_target, dtype=np.float64)
    known = np.isfinite(target)
    a, b = 1.0, 0.0
    if calibrate and known.sum() >= 2 * num_folds and 0 < target[known].mean() < 1:
        oof = np.zeros(len(y))
        for train_idx, test_idx in KFold(num_folds, shuffle=True, random_state=seed).split(y):
            fw, fb = _fit_raw(x[train_idx], y[train_idx], w[train_idx], hash_dim, cfg)
            oof[test_idx] = np.asarray(x[test_idx] @ fw).ravel() + fb
        z = oof[known].reshape(-1, 1)
        t = target[known]
        platt = LogisticRegression(C=1e4, max_iter=1000)
        platt.fit(np.vstack([z, z]), np.r_[np.ones(len(t)), np.zeros(len(t))], sample_weight=np.r_[t, 1 - t])
        a, b = float(platt.coef_[0, 0]), float(platt.intercept_[0])
        if a <= 0:  # margins carry no signal for this target: keep the ranking, centre on the base rate
            a, b = 1e-3, float(np.log(t.mean() / (1 - t.mean())))
    model = LinearModel(weights=(weights * a).astype(np.float32), bias=float(bias * a + b))
    return model, {"a": a, "b": b}
