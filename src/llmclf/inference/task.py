"""What a classifier's head outputs mean, decided once from the run's task: class probabilities
(single-label: softmax over the labels) or one number (regression)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from llmclf.config import REGRESSION, SINGLE_LABEL
from llmclf.inference.metrics import compute_metrics, regression_metrics
from llmclf.targets import TargetScale

PROBLEM_TYPES = {SINGLE_LABEL: "single_label_classification", REGRESSION: "regression"}
"""transformers' `config.problem_type` per task: what plain transformers and `pipeline()` apply to the
logits (softmax; nothing)."""


@dataclass(frozen=True)
class Task:
    """The run's task, its label names ([SCORE] for regression) and, while training, the scale the
    targets are divided by (1 once folded into a saved model's head)."""

    name: str
    labels: list[str]
    scale: TargetScale = field(default_factory=TargetScale)

    @property
    def regression(self) -> bool:
        return self.name == REGRESSION

    @property
    def problem_type(self) -> str:
        return PROBLEM_TYPES[self.name]

    def targets(self, values: Sequence) -> list:
        """What the model is trained on for a split's labels: class ids, or the scaled numbers."""
        if self.regression:
            return self.scale.scaled([float(v) for v in values])
        index = {label: i for i, label in enumerate(self.labels)}
        return [index[v] for v in values]

    def predicted(self, outputs: np.ndarray) -> list:
        """Predictions from the head's outputs (n, labels): label names, or numbers in the column's units."""
        if self.regression:
            return self.scale.original(outputs).tolist()
        return [self.labels[i] for i in np.asarray(outputs).argmax(axis=1)]

    def metrics(self, targets: Sequence, outputs: np.ndarray) -> dict:
        """The task's metrics of outputs (n, labels) against `targets` (as `targets()` gives them)."""
        if self.regression:
            truth = np.asarray(targets, dtype=np.float64) * self.scale.scale
            return regression_metrics(truth, self.scale.original(outputs))
        return compute_metrics(targets, np.asarray(outputs).argmax(axis=1), self.labels)

    @staticmethod
    def headline(metrics: dict) -> tuple[str, float | None]:
        """The metric a run is summed up by: accuracy, or for regression the MSE."""
        key = "mse" if "mse" in metrics else "accuracy"
        return key, metrics.get(key)
