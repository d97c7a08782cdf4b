"""The linear-probe head: a logistic regression on the frozen model's features, copied into the head."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from llmclf.inference.lexical import sklearn_class_weight
from llmclf.model.anatomy import trainable_head
from llmclf.training import fsdp

PROBE_CS = [1e-4, 1e-3, 1e-2, 1e-1]
"""Inverse regularisation strengths the probe's cross-validation chooses from (on standardised features)."""


def init_head_from_probe(
    model: Any, features: np.ndarray, label_ids: list[int], class_weights: list[float] | None, seed: int
) -> float:
    """Fit a logistic regression on the frozen features (n, hidden) and copy it into the head.

    The head is the linear layer that outputs the logits (`anatomy.trainable_head`) and `features` are
    its input. A decoder's `score` has no bias, so the probe is fitted without an intercept; an encoder's
    `classifier` has one, and the probe's intercept goes there. Either way the probe's softmax logits
    are exactly the head's. Returns the probe's training accuracy.
    """
    y = np.asarray(label_ids)
    head = trainable_head(model)
    intercept = head.bias is not None
    # A decoder's hidden states have a few dimensions far larger than the rest (60x in SmolLM2's pooled
    # features): unscaled, L-BFGS crawls. The probe is fitted on features divided by their standard
    # deviation (and, with an intercept, centred), and that is folded back into the head:
    # W (x - m) / s + b = (W / s) x + (b - (W / s) m).
    scale = features.std(axis=0).astype(np.float64) + 1e-6  # (hidden,)
    shift = features.mean(axis=0).astype(np.float64) if intercept else np.zeros_like(scale)
    scaled = (features - shift) / scale
    probe = _fit(scaled, y, class_weights, intercept, seed)
    num_labels, hidden = head.weight.shape
    unscaled = probe.coef_ / scale  # (classes or 1, hidden): weights on the raw features
    offset = (probe.intercept_ if intercept else np.zeros(len(unscaled))) - unscaled @ shift
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
    return float(probe.score(scaled, y))


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
            max_iter=2000,
            fit_intercept=intercept,
            class_weight=weight,
            random_state=seed,
        )
    else:
        probe = LogisticRegression(C=1e-3, max_iter=2000, fit_intercept=intercept, class_weight=weight)
    with warnings.catch_warnings():  # scikit-learn 1.9 announces changes to these classes' defaults
        warnings.simplefilter("ignore", FutureWarning)
        return probe.fit(x, y)
