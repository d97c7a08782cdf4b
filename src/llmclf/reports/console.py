"""Plain-text tables for the terminal: class balance (or a regression target's summary), before/after
metrics, per class (a multi-label run's: per label, with its threshold), confusion.

Labels, texts and config values come from data and run folders that people share: every cell is shown
through `printable`, so an escape sequence in a label is displayed (as `\x1b[2J`), never obeyed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

# C0 and C1 controls, DEL, and the bidirectional overrides and isolates (which reorder what is shown)
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(char: str) -> str:
    code = ord(char)
    return _SHORT.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(text: str) -> str:
    """`text` with every control character (ESC, BEL, CR, C1, bidi overrides...) as a visible escape."""
    return CONTROL.sub(lambda match: _visible(match.group()), text)


def one_line(text: str) -> str:
    """`text` on one line: line breaks and runs of white space become one space, other controls visible."""
    return printable(" ".join(text.split()))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> str:
    """Aligned columns; the first column left-aligned, the others right-aligned."""
    cells = [[printable(str(h)) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]
    return "\n".join(([printable(title)] if title else []) + out)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return printable(str(value))


def number_cell(value: object) -> float | str | None:
    """A measured quantity for a table: a float (shown to 4 decimals) where 4 decimals show it, else
    4 significant digits (an MSE of 0.00004 or 3.2e9 in the target's units); None when it is no finite
    number (a Pearson r of constant predictions is null)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return None
    value = float(value)
    return value if value == 0 or 1e-3 <= abs(value) < 1e7 else f"{value:.4g}"


def signed_change(value: float) -> str:
    """A change with its sign, as `number_cell` would show the number: +0.1234, -4.2e-05."""
    cell = number_cell(value)
    return f"{value:+.4f}" if isinstance(cell, float) else f"{value:+.4g}"


def class_balance(
    counts: dict[str, dict[str, int]],
    labels: list[str],
    weights: list[float] | None,
    texts: dict[str, int] | None = None,
) -> str:
    """Rows per split and class, with the class weights used in the loss. `texts`: a multi-label run's
    texts per split (its counts are texts carrying each label, and its weights the positive weights)."""
    headers = ["label" if texts else "class", "train", "val", "test"] + (["weight"] if weights else [])
    rows = []
    for i, label in enumerate(labels):
        row: list[object] = [label] + [counts[s].get(label, 0) for s in ("train", "val", "test")]
        rows.append(row + ([weights[i]] if weights else []))
    if texts:
        rows.append(["texts"] + [texts[s] for s in ("train", "val", "test")] + ([""] if weights else []))
        return table(headers, rows, title="Texts carrying each label")
    totals: list[object] = ["total"] + [sum(counts[s].values()) for s in ("train", "val", "test")]
    rows.append(totals + ([sum(weights)] if weights else []))
    return table(headers, rows, title="Class balance")


HEADLINE = (("accuracy", "accuracy"), ("balanced accuracy", "balanced_accuracy"), ("macro F1", "macro_f1"))
REGRESSION_HEADLINE = (("MSE", "mse"), ("MAE", "mae"), ("Pearson", "pearson"), ("Spearman", "spearman"))
MULTILABEL_HEADLINE = (
    ("micro F1", "micro_f1"),
    ("macro F1", "macro_f1"),
    ("subset accuracy", "subset_accuracy"),
    ("Hamming loss (lower is better)", "hamming_loss"),
)


def is_regression(metrics: dict | None) -> bool:
    """Are these a regression run's metrics (mse, mae, pearson, spearman) rather than a classifier's?"""
    return isinstance(metrics, dict) and "mse" in metrics


def is_multilabel(metrics: dict | None) -> bool:
    """Are these a multi-label run's metrics (micro F1, subset accuracy, Hamming loss, per label)?"""
    return isinstance(metrics, dict) and "micro_f1" in metrics


def compare(before: dict | None, after: dict, title: str = "Test metrics") -> str:
    """Headline metrics before and after training, with the change: accuracy, balanced accuracy and
    macro F1; for a multi-label run micro F1, macro F1, subset accuracy and Hamming loss (lower is
    better); for a regression run MSE, MAE, Pearson and Spearman (lower errors, higher correlations
    are better; a correlation of constant predictions is n/a)."""
    if is_regression(after):
        return _compare_regression(before, after, title)
    if is_multilabel(after):
        return _compare_numbers(before, after, MULTILABEL_HEADLINE, title)
    if before is None:
        return table(["metric", "value"], [[name, after[key]] for name, key in HEADLINE], title=title)
    rows = [[name, before[key], after[key], f"{after[key] - before[key]:+.4f}"] for name, key in HEADLINE]
    return table(["metric", "before", "after", "change"], rows, title=title)


def _compare_regression(before: dict | None, after: dict, title: str) -> str:
    return _compare_numbers(before, after, REGRESSION_HEADLINE, title)


def _compare_numbers(
    before: dict | None, after: dict, headline: tuple[tuple[str, str], ...], title: str
) -> str:
    """The `headline` metrics before and after, with the change; n/a where a metric is no number."""

    def shown(value: object) -> object:
        cell = number_cell(value)
        return "n/a" if cell is None else cell

    if before is None:
        rows = [[name, shown(after.get(key))] for name, key in headline]
        return table(["metric", "value"], rows, title=title)
    rows = []
    for name, key in headline:
        old, new = before.get(key), after.get(key)
        both = number_cell(old) is not None and number_cell(new) is not None
        change = signed_change(float(new) - float(old)) if both else ""  # type: ignore[arg-type]
        rows.append([name, shown(before.get(key)), shown(after.get(key)), change])
    return table(["metric", "before", "after", "change"], rows, title=title)


def target_summary(targets: dict) -> str:
    """The regression target per split (mean, standard deviation, smallest and largest value), the
    table printed instead of the class balance; a split without rows shows empty cells."""
    rows = []
    for split in ("train", "val", "test"):
        values = targets.get(split)
        if not isinstance(values, dict):  # null: the split has no rows
            rows.append([f"{split} (empty)", "", "", "", ""])
            continue
        cells = [number_cell(values.get(k)) for k in ("mean", "std", "min", "max")]
        rows.append([split, *("" if c is None else c for c in cells)])
    return table(["split", "mean", "std", "min", "max"], rows, title="Target per split")


def per_class(metrics: dict, title: str = "Per class") -> str:
    rows = [
        [label, m["precision"], m["recall"], m["f1"], m["support"]]
        for label, m in metrics["per_class"].items()
    ]
    return table(["class", "precision", "recall", "F1", "support"], rows, title=title)


def confusion(metrics: dict, title: str = "Confusion matrix (rows: true, columns: predicted)") -> str:
    labels = metrics["labels"]
    rows = [[label, *counts] for label, counts in zip(labels, metrics["confusion_matrix"])]
    return table(["true \\ predicted", *labels], rows, title=title)


def per_label(metrics: dict, thresholds: dict | None = None, title: str = "Per label") -> str:
    """A multi-label run's precision, recall, F1 and support per label, and each label's decision
    threshold where `thresholds` (run_info.json's) gives one."""
    limits = thresholds if isinstance(thresholds, dict) else {}
    rows = []
    for label, m in (metrics.get("per_label") or {}).items():
        m = m if isinstance(m, dict) else {}
        row = [label, *[m.get(k, "") for k in ("precision", "recall", "f1", "support")]]
        limit = number_cell(limits.get(label))
        rows.append(row + (["" if limit is None else limit] if limits else []))
    headers = ["label", "precision", "recall", "F1", "support"] + (["threshold"] if limits else [])
    return table(headers, rows, title=title)


def full_report(before: dict | None, after: dict, thresholds: dict | None = None) -> str:
    """The before/after table, then a classifier's per class and the confusion matrix, or a multi-label
    run's per label (with each label's decision threshold, run_info.json's `thresholds`, where given)."""
    if is_regression(after):
        return compare(before, after)
    if is_multilabel(after):
        return "\n\n".join([compare(before, after), per_label(after, thresholds, title="Per label (after)")])
    parts = [compare(before, after), per_class(after, title="Per class (after)"), confusion(after)]
    return "\n\n".join(parts)


def probe_line(probe: dict | None) -> str:
    """The linear-probe head's result as one readable line, e.g. 'Head initialised from a linear probe
    on the frozen model's features: training accuracy 0.9875, test accuracy 0.9500.' (a multi-label
    run's probes per label: training and test micro F1)."""
    if not isinstance(probe, dict):
        return "Head: randomly initialised (no linear probe)."
    measure = "micro F1" if "train_micro_f1" in probe or "test_micro_f1" in probe else "accuracy"
    key = measure.replace(" ", "_").lower()
    parts = []
    for stage, name in (("train", "training"), ("test", "test")):
        value = probe.get(f"{stage}_{key}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            parts.append(f"{name} {measure} {value:.4f}")
        elif stage == "test":
            parts.append(f"test {measure} not measured (only where it comes nearly free)")
    return "Head initialised from a linear probe on the frozen model's features: " + ", ".join(parts) + "."
