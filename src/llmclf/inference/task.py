"""What a classifier's head outputs mean, decided once from the run's task: class probabilities
(single-label: softmax over the labels), each label's own probability (multi-label: sigmoid, decided by a
threshold per label) or one number (regression)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from llmclf.config import MULTI_LABEL, REGRESSION, SINGLE_LABEL
from llmclf.inference.metrics import compute_metrics, multilabel_metrics, regression_metrics
from llmclf.labelsets import multi_hot
from llmclf.targets import TargetScale

PROBLEM_TYPES = {
    SINGLE_LABEL: "single_label_classification",
    MULTI_LABEL: "multi_label_classification",
    REGRESSION: "regression",
}
"""transformers' `config.problem_type` per task: what plain transformers and `pipeline()` apply to the
logits (softmax; sigmoid; nothing)."""
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class Task:
    """The run's task, its label names ([SCORE] for regression) and, while training, the scale the
    targets are divided by (1 once folded into a saved model's head); for multi-label, each label's
    decision threshold on its probability (0.5 until tuned on the validation split)."""

    name: str
    labels: list[str]
    scale: TargetScale = field(default_factory=TargetScale)
    thresholds: tuple[float, ...] | None = None

    @property
    def multi_label(self) -> bool:
        return self.name == MULTI_LABEL

    def threshold_map(self) -> dict[str, float]:
        """Each label's decision threshold (DEFAULT_THRESHOLD until tuned), by label."""
        return dict(zip(self.labels, self.thresholds or [DEFAULT_THRESHOLD] * len(self.labels)))

    def decisions(self, outputs: np.ndarray) -> np.ndarray:
        """Multi-label: which labels each text gets (n, labels) booleans, each probability against its
        label's threshold."""
        limits = np.asarray(list(self.threshold_map().values()))
        return np.asarray(outputs) >= limits

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
        if self.multi_label:  # label sets as multi-hot rows
            return multi_hot(values, self.labels)
        index = {label: i for i, label in enumerate(self.labels)}
        return [index[v] for v in values]

    def predicted(self, outputs: np.ndarray) -> list:
        """Predictions from the head's outputs (n, labels): label names, label sets (tuples), or numbers
        in the column's units."""
        if self.regression:
            return self.scale.original(outputs).tolist()
        if self.multi_label:
            return [tuple(np.asarray(self.labels)[row].tolist()) for row in self.decisions(outputs)]
        return [self.labels[i] for i in np.asarray(outputs).argmax(axis=1)]

    def metrics(self, targets: Sequence, outputs: np.ndarray) -> dict:
        """The task's metrics of outputs (n, labels) against `targets` (as `targets()` gives them)."""
        if self.regression:
            truth = np.asarray(targets, dtype=np.float64) * self.scale.scale
            return regression_metrics(truth, self.scale.original(outputs))
        if self.multi_label:
            return multilabel_metrics(np.asarray(targets), self.decisions(outputs), self.labels)
        return compute_metrics(targets, np.asarray(outputs).argmax(axis=1), self.labels)
