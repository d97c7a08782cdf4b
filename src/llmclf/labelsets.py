"""Multi-label data: any number of labels per text. Read from the label column (names joined by a
separator, or lists in JSONL / Parquet), split at random by fractions with every label kept in every
split where it has the texts for it, and weighed per label for the binary cross-entropy.

A text's labels are held as a tuple of names (sorted, each once); the model sees them as a multi-hot
row in the run's label order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from llmclf.errors import LlmclfError
from llmclf.targets import fraction_sizes

_INTEGRAL_FLOAT = re.compile(r"[+-]?\d+\.0+")
MAX_POS_WEIGHT = 100.0
"""Cap on a label's positive weight (negatives over positives): a label on one text in a thousand would
otherwise dominate the loss."""


def normalise_label(value: Any, names: list[str] | None = None) -> str:
    """One label name per class, whatever the file's types: 1, 1.0 and "1" all become "1"."""
    if isinstance(value, np.generic):
        value = value.item()
    if names is not None and isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    # "1.0" (a CSV column that pandas once wrote as floats) is the class "1", like the number 1.0 above.
    if _INTEGRAL_FLOAT.fullmatch(text):
        return str(int(text.split(".")[0]))
    return text


def parse_label_sets(
    values: list[Any],
    rows: list[int],
    source: str,
    column: str,
    separator: str,
    words: dict[str, str],
    where: Callable[[list[int]], str],
) -> list[tuple[str, ...]]:
    """Each row's labels as a sorted tuple of names, or an error naming the rows whose list is empty or
    holds an empty name; an error too where no row has more than one label (not multi-label data)."""
    sets, empty = [], []
    for row, value in zip(rows, values):
        if isinstance(value, list | tuple | np.ndarray):
            parts = [normalise_label(v) for v in value]
        else:
            parts = [p.strip() for p in str(value).split(separator)]
        if not parts or any(p == "" for p in parts):
            empty.append(row)
        sets.append(tuple(sorted(set(parts))))
    if empty:
        raise LlmclfError(
            f"{source}: {len(empty)} row(s) of column '{column}' have an empty label list or an empty "
            f"label between separators ({separator!r}) at {where(empty)}. Give every text at least one "
            f"label (write each name between separators once), or pass {words['drop']} after emptying "
            "those cells to leave them out."
        )
    if sets and max(len(s) for s in sets) < 2:
        raise LlmclfError(
            f"{source}: no row of column '{column}' holds more than one label (joined by {separator!r}, or "
            f"as a list). With one label per text, train with --task single-label; if the labels are "
            f"joined by another character, give it with --label-separator."
        )
    return sets


def all_labels(sets: Sequence[tuple[str, ...]]) -> set[str]:
    return {label for labels in sets for label in labels}


def counts(frame: pd.DataFrame, labels: list[str]) -> dict[str, int]:
    """Texts carrying each label."""
    present = pd.Series([label for labels in frame["label"] for label in labels]).value_counts()
    return {label: int(present.get(label, 0)) for label in labels}


def multi_hot(sets: Sequence[tuple[str, ...]], labels: list[str]) -> list[list[float]]:
    index = {label: i for i, label in enumerate(labels)}
    rows = []
    for names in sets:
        row = [0.0] * len(labels)
        for name in names:
            row[index[name]] = 1.0
        rows.append(row)
    return rows


def split_label_sets(
    pool: pd.DataFrame,
    labels: list[str],
    *,
    val_fraction: float,
    test_fraction: float,
    rng: np.random.Generator,
    notes: list[str],
    source: str,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Train, validation and test at random by fractions; then each label missing from validation or
    test gets one of its training texts moved there (rarest labels first) while training keeps at least
    one. A label with too few texts to be everywhere is named in a note."""
    n = len(pool)
    order = rng.permutation(n)
    n_val, n_test = fraction_sizes(n, val_fraction, test_fraction)
    split = np.zeros(n, dtype=int)  # 0 train, 1 validation, 2 test; by position in `pool`
    split[order[:n_val]], split[order[n_val : n_val + n_test]] = 1, 2
    carriers = {label: [i for i in order if label in pool["label"].iloc[i]] for label in labels}
    rare = []
    for label in sorted(labels, key=lambda lab: len(carriers[lab])):
        for target, size in ((1, n_val), (2, n_test)):
            if size == 0 or any(split[i] == target for i in carriers[label]):
                continue
            in_train = [i for i in carriers[label] if split[i] == 0]
            if len(in_train) < 2:
                rare.append(label)
                continue
            split[in_train[-1]] = target
    if rare:
        notes.append(
            f"{source}: label(s) {sorted(set(rare))} have too few texts to be in every split (training keeps "
            "at least one); their validation or test figures rest on no text."
        )
    parts = [pool.iloc[[i for i in order if split[i] == k]].reset_index(drop=True) for k in (0, 1, 2)]
    return parts[0], parts[1], parts[2]


def pos_weights(train: pd.DataFrame, labels: list[str], source: str) -> list[float]:
    """Each label's positive weight in the binary cross-entropy: its negatives over its positives in the
    training split (the multi-label counterpart of inverse class frequency), capped at MAX_POS_WEIGHT."""
    present = counts(train, labels)
    missing = [label for label in labels if present[label] == 0]
    if missing:
        raise LlmclfError(
            f"{source}: no training text carries label(s) {missing}: the model cannot learn them. Add "
            "training texts with them, or remove them from the data."
        )
    n = len(train)
    return [min(MAX_POS_WEIGHT, (n - present[label]) / present[label]) or 1.0 for label in labels]


def tune_thresholds(probs: np.ndarray, truth: np.ndarray, default: float = 0.5) -> list[float]:
    """Per label, the decision threshold on its probability that gives the best F1 on the validation
    split (probs, truth: (n, labels)); `default` for a label without a positive there."""
    thresholds = []
    for j in range(probs.shape[1]):
        positives = truth[:, j] > 0.5
        if not positives.any():
            thresholds.append(default)
            continue
        best, best_f1 = default, -1.0
        for t in np.unique(np.concatenate([np.linspace(0.05, 0.95, 19), probs[:, j]])):
            predicted = probs[:, j] >= t
            tp = float((predicted & positives).sum())
            f1 = 2 * tp / (predicted.sum() + positives.sum()) if tp else 0.0
            if f1 > best_f1 + 1e-12 or (math.isclose(f1, best_f1) and abs(t - 0.5) < abs(best - 0.5)):
                best, best_f1 = float(t), f1
        thresholds.append(best)
    return thresholds
