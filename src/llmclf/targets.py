"""Regression targets: one number per text. Read from the label column, split at random by fractions
(there are no classes to stratify by), summarised per split, and scaled for training.

The model learns the targets divided by their standard deviation on the training split (`TargetScale`),
so that the loss and the head start at the same scale whatever the column's units; the scale is folded
into the head's weights before the run is saved, so a saved or exported model outputs the column's own
units. The targets are not centred: a decoder's head has no bias to put the mean back into, and the
features carry a constant part (a few dimensions that hardly vary between texts) that stands in for one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from llmclf.errors import LlmclfError

SCORE = "score"
"""The one output of a regression model: its label name, and the predictions' column."""


def parse_targets(
    values: list[Any],
    rows: list[int],
    source: str,
    column: str,
    label_flag: str,
    where: Callable[[list[int]], str],
) -> list[float]:
    """The label column's values as finite floats, or an error naming the (1-based data) rows that are
    not numbers."""
    numbers = [_number(value) for value in values]
    bad = [row for row, number in zip(rows, numbers) if number is None]
    if bad:
        shown = ", ".join([repr(v) for v, n in zip(values, numbers) if n is None][:3])
        raise LlmclfError(
            f"{source}: --task regression needs a number in every row of column '{column}', but {len(bad)} "
            f"value(s) are not finite numbers (e.g. {shown}) at {where(bad)}. Fix those rows (a decimal "
            f"point, not a comma), choose the column of numbers with {label_flag}, or train a classifier on "
            "these labels with --task single-label."
        )
    return numbers


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, np.generic):
        value = value.item()
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def fraction_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Validation and test sizes of n rows: at least one each where asked for and there are 3 rows."""
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 and n >= 3 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 and n >= 3 else 0
    return n_val, n_test


def split_targets(
    pool: pd.DataFrame, *, val_fraction: float, test_fraction: float, rng: np.random.Generator
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Train, validation and test at random, by fractions of the rows (`test_fraction` 0 where the test
    split comes from elsewhere)."""
    n = len(pool)
    n_val, n_test = fraction_sizes(n, val_fraction, test_fraction)
    order = pool.iloc[rng.permutation(n)].reset_index(drop=True)
    val, test, train = order.iloc[:n_val], order.iloc[n_val : n_val + n_test], order.iloc[n_val + n_test :]
    return train.reset_index(drop=True), val.reset_index(drop=True), test.reset_index(drop=True)


def check_train_targets(train: pd.DataFrame, source: str) -> None:
    """A model of one number needs at least two training texts whose numbers differ."""
    values = train["label"].to_numpy(dtype=np.float64)
    if len(values) < 2 or float(values.std()) == 0.0:
        raise LlmclfError(
            f"{source}: the training split has {len(values)} text(s) and "
            f"{len(np.unique(values))} distinct target value(s); regression needs at least two different "
            "values to learn from. Check --label-column, or give more rows."
        )


def summary(frame: pd.DataFrame) -> dict[str, float] | None:
    """mean, std, min, max of a split's targets (None for an empty split)."""
    if not len(frame):
        return None
    values = frame["label"].to_numpy(dtype=np.float64)
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


@dataclass(frozen=True)
class TargetScale:
    """Targets are trained divided by `scale` (the training split's standard deviation)."""

    scale: float = 1.0

    @classmethod
    def of(cls, train_values: list[float]) -> TargetScale:
        return cls(float(np.std(np.asarray(train_values, dtype=np.float64))))

    def scaled(self, values: list[float]) -> list[float]:
        return [v / self.scale for v in values]

    def original(self, outputs: np.ndarray) -> np.ndarray:
        """(n, 1) model outputs in training units as (n,) numbers in the column's units."""
        return np.asarray(outputs, dtype=np.float64).reshape(-1) * self.scale
