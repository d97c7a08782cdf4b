"""The metrics reported for a labelled split: accuracy, balanced accuracy, macro F1, per class, confusion."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)


def compute_metrics(
    y_true: np.ndarray | list[int], y_pred: np.ndarray | list[int], labels: list[str]
) -> dict:
    """accuracy, balanced_accuracy, macro_f1, per_class {label: precision/recall/f1/support},
    confusion_matrix (rows = true label, columns = predicted, in `labels` order)."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    ids = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, zero_division=0
    )
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "labels": list(labels),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    }


def regression_metrics(y_true: np.ndarray | list[float], y_pred: np.ndarray | list[float]) -> dict:
    """n, mse, mae, pearson, spearman of predicted numbers against the true ones, in the column's units;
    a correlation is None where either side is constant (it is undefined there)."""
    from scipy.stats import pearsonr, spearmanr

    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    varies = len(y_true) > 1 and np.ptp(y_true) > 0 and np.ptp(y_pred) > 0
    return {
        "n": int(len(y_true)),
        "mse": float(np.mean((y_true - y_pred) ** 2)) if len(y_true) else 0.0,
        "mae": float(np.mean(np.abs(y_true - y_pred))) if len(y_true) else 0.0,
        "pearson": float(pearsonr(y_true, y_pred)[0]) if varies else None,
        "spearman": float(spearmanr(y_true, y_pred)[0]) if varies else None,
    }


def multilabel_metrics(truth: np.ndarray, predicted: np.ndarray, labels: list[str]) -> dict:
    """n, micro_f1, macro_f1, subset_accuracy (every label of a text right), hamming_loss (the share of
    wrong label decisions), per_label {label: precision/recall/f1/support}, labels: of multi-hot
    decisions (n, labels) against the true ones."""
    truth = np.asarray(truth, dtype=int).reshape(-1, len(labels))
    predicted = np.asarray(predicted, dtype=int).reshape(-1, len(labels))
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, zero_division=0)
    n = len(truth)
    return {
        "n": int(n),
        "micro_f1": float(f1_score(truth, predicted, average="micro", zero_division=0)) if n else 0.0,
        "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)) if n else 0.0,
        "subset_accuracy": float((truth == predicted).all(axis=1).mean()) if n else 0.0,
        "hamming_loss": float((truth != predicted).mean()) if n else 0.0,
        "per_label": {
            label: {
                "precision": float(precision[i]) if n else 0.0,
                "recall": float(recall[i]) if n else 0.0,
                "f1": float(f1[i]) if n else 0.0,
                "support": int(support[i]) if n else 0,
            }
            for i, label in enumerate(labels)
        },
        "labels": list(labels),
    }
