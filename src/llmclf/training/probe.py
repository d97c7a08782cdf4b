"""The linear-probe head: a logistic regression on the frozen model's features, copied into the head."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmclf import runtime
from llmclf.inference.lexical import sklearn_class_weight
from llmclf.model.anatomy import trainable_head
from llmclf.training import fsdp

PROBE_CS = [1e-4, 1e-3, 1e-2, 1e-1]
"""Inverse regularisation strengths the probe's cross-validation chooses from (on standardised features)."""
MAX_TEMPERATURE = 100.0


@dataclass
class ProbeHead:
    """What the probe head starts from: its training accuracy, the cross-validated log loss of its
    regularisation (None where no class had enough rows to fold) and the temperature its logits were
    divided by so that its training loss is no lower than that (1.0: left as fitted)."""

    train_accuracy: float
    cv_log_loss: float | None = None
    temperature: float = 1.0


def init_head_from_probe(
    model: Any,
    features: np.ndarray,
    label_ids: list[int],
    class_weights: list[float] | None,
    seed: int,
    *,
    soften: bool = True,
) -> ProbeHead:
    """Fit a logistic regression on the frozen features (n, hidden) and copy it into the head.

    The head is the linear layer that outputs the logits (`anatomy.trainable_head`) and `features` are
    its input. A decoder's `score` has no bias, so the probe is fitted without an intercept; an encoder's
    `classifier` has one, and the probe's intercept goes there. The probe's softmax logits are exactly
    the head's, divided by a temperature where `soften`: a probe that separates its training texts
    (many classes, few texts each) leaves fine-tuning almost no loss to learn from, so its logits are
    scaled down until its training loss equals its cross-validated loss (the predicted classes stay).
    """
    y = np.asarray(label_ids)
    head = trainable_head(model)
    intercept = head.bias is not None
    # A decoder's hidden states have a few dimensions far larger than the rest (60x in SmolLM2's pooled
    # features): unscaled, L-BFGS crawls. The probe is fitted on features divided by their standard
    # deviation (and, with an intercept, centred), and that is folded back into the head:
    # W (x - m) / s + b = (W / s) x + (b - (W / s) m).
    scaled, scale, shift = standardised(features, intercept)
    probe = _fit(scaled, y, class_weights, intercept, seed)
    fitted = ProbeHead(float((probe.predict(scaled) == y).mean()), cv_log_loss(probe))  # score(): its scoring
    if soften and fitted.cv_log_loss is not None:
        fitted.temperature = matching_temperature(
            probe.decision_function(scaled), y, probe, fitted.cv_log_loss
        )
    num_labels, hidden = head.weight.shape
    unscaled = probe.coef_ / scale / fitted.temperature  # (classes or 1, hidden): weights on the raw features
    bias = (probe.intercept_ if intercept else np.zeros(len(unscaled))) / fitted.temperature
    offset = bias - unscaled @ shift
    coef, bias = np.zeros((num_labels, hidden)), np.zeros(num_labels)
    if unscaled.shape[0] == 1:  # binary: sklearn keeps one vector w for p(class 1) = sigmoid(w.x + b)
        first, second = probe.classes_
        coef[first], coef[second] = -unscaled[0] / 2, unscaled[0] / 2
        bias[first], bias[second] = -offset[0] / 2, offset[0] / 2
    else:
        coef[probe.classes_], bias[probe.classes_] = unscaled, offset
    fsdp.assign(head.weight, torch.as_tensor(coef))  # under FSDP the weight is a shard
    if intercept:
        fsdp.assign(head.bias, torch.as_tensor(bias))
    return fitted


def standardised(features: np.ndarray, centre: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (n, hidden) divided by their standard deviation and, with `centre` (a head with an
    intercept), less their mean; and that scale and shift (hidden,), to fold back into the head."""
    scale = features.std(axis=0).astype(np.float64) + 1e-6
    shift = features.mean(axis=0).astype(np.float64) if centre else np.zeros_like(scale)
    return (features - shift) / scale, scale, shift


def cv_log_loss(probe: Any) -> float | None:
    """The cross-validated log loss at the chosen regularisation (folds' mean), where it was scored."""
    scores = getattr(probe, "scores_", None)
    if not scores:
        return None
    per_c = np.mean(next(iter(scores.values())), axis=0)  # (Cs,): neg_log_loss, the same for every class
    return float(-per_c[list(probe.Cs_).index(probe.C_[0])])


def matching_temperature(decision: np.ndarray, y: np.ndarray, probe: Any, target: float) -> float:
    """The temperature T >= 1 at which the mean training log loss of softmax(logits / T) reaches
    `target` (bisection on log T: the loss grows with T while most texts are predicted right)."""
    logits = np.stack([-decision / 2, decision / 2], axis=1) if decision.ndim == 1 else decision
    rows = np.searchsorted(probe.classes_, y)

    def loss(t: float) -> float:
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), rows]))

    if loss(1.0) >= target:
        return 1.0
    if loss(MAX_TEMPERATURE) <= target:
        return MAX_TEMPERATURE
    low, high = 0.0, float(np.log(MAX_TEMPERATURE))
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if loss(float(np.exp(middle))) < target else (low, middle)
    return float(np.exp((low + high) / 2))


def _fit(x: np.ndarray, y: np.ndarray, class_weights: list[float] | None, intercept: bool, seed: int) -> Any:
    """The logistic regression, its regularisation chosen by cross-validation: the features are nearly
    separable on small data, so the regularisation decides how well the head generalises. C=1e-3 when a
    class has too few rows to fold."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    weight = sklearn_class_weight(class_weights)
    folds = min(5, int(np.bincount(y).min()))
    if folds >= 2:
        probe = LogisticRegressionCV(
            Cs=PROBE_CS,
            cv=folds,
            scoring="neg_log_loss",  # a proper score: its value at the chosen C is the held-out loss
            max_iter=2000,
            fit_intercept=intercept,
            class_weight=weight,
            random_state=seed,
        )
    else:
        probe = LogisticRegression(C=1e-3, max_iter=2000, fit_intercept=intercept, class_weight=weight)
    with warnings.catch_warnings(), runtime.one_blas_thread():  # 1.9 announces changes to their defaults
        warnings.simplefilter("ignore", FutureWarning)
        return probe.fit(x, y)


RIDGE_ALPHAS = tuple(10.0**k for k in range(-1, 6))
"""Ridge penalties the regression probe's leave-one-out error chooses from (on standardised features)."""


@dataclass
class RidgeHead:
    """What a regression head starts from: the ridge fit's R² on the training split, its leave-one-out
    mean squared error (in the scaled units trained on) and its penalty."""

    train_r2: float
    cv_mse: float
    alpha: float


def init_head_from_ridge(model: Any, features: np.ndarray, targets: list[float]) -> RidgeHead:
    """Fit a ridge regression of the (scaled) targets on the frozen features (n, hidden), its penalty
    chosen by leave-one-out error, and copy it into the one-output head: the regression counterpart of
    `init_head_from_probe`, with the same feature scaling folded back into the weights and the intercept
    only where the head has a bias (an encoder's)."""
    from sklearn.linear_model import RidgeCV

    y = np.asarray(targets, dtype=np.float64)
    head = trainable_head(model)
    intercept = head.bias is not None
    scaled, scale, shift = standardised(features, intercept)
    ridge = RidgeCV(alphas=RIDGE_ALPHAS, fit_intercept=intercept, scoring="neg_mean_squared_error")
    ridge.fit(scaled, y)
    coef = ridge.coef_.reshape(1, -1) / scale  # (1, hidden): weights on the raw features
    bias = (float(ridge.intercept_) if intercept else 0.0) - coef @ shift
    fsdp.assign(head.weight, torch.as_tensor(coef))
    if intercept:
        fsdp.assign(head.bias, torch.as_tensor(bias))
    return RidgeHead(float(ridge.score(scaled, y)), float(-ridge.best_score_), float(ridge.alpha_))


def init_head_from_label_probes(
    model: Any, features: np.ndarray, targets: list[list[float]], seed: int
) -> dict:
    """Multi-label: one logistic regression per label (its positives against the rest, balanced, the
    regularisation by cross-validated log loss where the label has the texts to fold) on the frozen
    features, copied into that label's row of the head, with the feature scaling folded back as in
    `init_head_from_probe`. Returns the probes' micro-F1 on the training split."""
    from sklearn.metrics import f1_score

    y = np.asarray(targets, dtype=int)  # (n, labels) multi-hot
    head = trainable_head(model)
    intercept = head.bias is not None
    scaled, scale, shift = standardised(features, intercept)
    coef, bias = np.zeros(head.weight.shape), np.zeros(y.shape[1])
    predicted = np.zeros_like(y)
    for j in range(y.shape[1]):
        if y[:, j].min() == y[:, j].max():  # every text or none: the head only needs its sign
            bias[j] = 1.0 if y[0, j] else -1.0
            predicted[:, j] = y[0, j]
            continue
        inverse = len(y) / np.bincount(y[:, j], minlength=2)  # negatives, positives: balanced
        probe = _fit(scaled, y[:, j], (inverse / inverse.sum()).tolist(), intercept, seed)
        predicted[:, j] = probe.predict(scaled)
        unscaled = probe.coef_[0] / scale
        coef[j], bias[j] = unscaled, (probe.intercept_[0] if intercept else 0.0) - unscaled @ shift
    fsdp.assign(head.weight, torch.as_tensor(coef))
    if intercept:
        fsdp.assign(head.bias, torch.as_tensor(bias))
    return {"train_micro_f1": float(f1_score(y, predicted, average="micro", zero_division=0))}
