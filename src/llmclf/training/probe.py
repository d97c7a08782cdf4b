"""The linear-probe head: a logistic regression on the frozen model's features, copied into the head."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from llmclf.model.anatomy import trainable_head
from llmclf.training import fsdp

PROBE_CS = [1e-4, 1e-3, 1e-2, 1e-1]
"""Inverse regularisation strengths the probe's cross-validation chooses from (on standardised features)."""


def init_head_from_probe(
    model: Any, features: np.ndarray, label_ids: list[int], class_weights: list[float] | None, seed: int
) -> float:
    """Fit a logistic regression on the frozen features (n, hidden) and copy it into the head.

    The head is a bias-free linear layer (num_labels, hidden), so the probe is fitted without an
    intercept; its softmax logits are then exactly the head's. Returns the probe's training accuracy.
    """
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    y = np.asarray(label_ids)
    weight = None if class_weights is None else {i: w for i, w in enumerate(class_weights)}
    # A decoder's hidden states have a few dimensions far larger than the rest (60x in SmolLM2's pooled
    # features): unscaled, L-BFGS crawls. The probe is fitted on features divided by their standard
    # deviation, and the scale is folded back into the head (W x = (W / s)(s x)), so no bias is needed.
    scale = features.std(axis=0).astype(np.float64) + 1e-6  # (hidden,)
    scaled = features / scale
    # The features are nearly separable on small data, so the regularisation decides how well the head
    # generalises: choose it by cross-validation, falling back to C=1e-3 when a class has too few rows
    # to fold.
    folds = min(5, int(np.bincount(y).min()))
    if folds >= 2:
        probe = LogisticRegressionCV(
            Cs=PROBE_CS, cv=folds, max_iter=2000, fit_intercept=False, class_weight=weight, random_state=seed
        )
    else:
        probe = LogisticRegression(C=1e-3, max_iter=2000, fit_intercept=False, class_weight=weight)
    probe.fit(scaled, y)
    head = trainable_head(model)
    num_labels, hidden = head.weight.shape
    coef = np.zeros((num_labels, hidden))
    unscaled = probe.coef_ / scale  # (classes or 1, hidden): weights on the raw features
    if unscaled.shape[0] == 1:  # binary: sklearn keeps one vector w for p(class 1) = sigmoid(w.x)
        coef[probe.classes_[0]], coef[probe.classes_[1]] = -unscaled[0] / 2, unscaled[0] / 2
    else:
        coef[probe.classes_] = unscaled
    fsdp.assign(head.weight, torch.as_tensor(coef))  # under FSDP the weight is a shard
    return float(probe.score(scaled, y))
