"""The report of a multi-label run (`task: multi-label`): what it scored, per label, which labels go
together, and the texts with the most wrong labels.

A multi-label run's folder has its label names in labels.json; metrics.json has n, micro_f1, macro_f1,
subset_accuracy, hamming_loss and per_label (precision, recall, F1, support) before and after training;
predictions_test.csv has the true labels of each text as `label` and the predicted ones as `predicted`,
each joined by data.label_separator (an empty cell: no label), and each label's sigmoid probability as
`prob_<label>`; data_summary.json counts the texts carrying each label per split (`counts`), the texts
per split (`rows`) and each label's positive weight in the loss (`pos_weights`); run_info.json has each
label's decision threshold, tuned on the validation split (`thresholds`). In place of a classifier's
confusion matrices, calibration and most confidently wrong texts, its report has the label
co-occurrence and the texts with the most label errors.

run_report reads the folder and calls the builders here, which take the folder's values (dicts and the
predictions' frame, any of them possibly malformed in a shared folder) and return the report's blocks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llmclf.config import MULTI_LABEL
from llmclf.errors import LlmclfError
from llmclf.reports import plots, stages
from llmclf.reports.blocks import HALF_MAX, Block, as_dict, metric_rows, or_na, shorten
from llmclf.reports.console import MULTILABEL_HEADLINE, is_multilabel, number_cell, one_line
from llmclf.runfolder import RunFolder

DEFAULT_SEPARATOR = ","
SECTIONS = (
    "Summary",
    "Data",
    "Metrics",
    "Per label",
    "Label co-occurrence",
    "Training curves",
    "Most wrong",
    "Configuration",
)
TRUE_PNG = "cooccurrence_true.png"
PREDICTED_PNG = "cooccurrence_predicted.png"
PAIRS = 10  # the label pairs listed under the co-occurrence heat maps
VALIDATION_KEYS = ("eval_micro_f1", "eval_macro_f1")
VALIDATION_HEADERS = ["step", "epoch", "validation loss", "validation micro F1", "validation macro F1"]


def _shown(value: Any) -> str:
    """A metric as text: 4 decimals (or 4 significant digits), n/a where it is no number."""
    cell = number_cell(value)
    return "n/a" if cell is None else (f"{cell:.4f}" if isinstance(cell, float) else cell)


# ------------------------------------------------------------------------------------ reading the run
def label_separator(config: dict, info: dict, source: Path) -> str:
    """What joins a text's labels in predictions_test.csv: config.yaml's data.label_separator, else
    run_info.json's label_separator, else a comma."""
    data = as_dict(config.get("data"))
    found = data.get("label_separator", info.get("label_separator", DEFAULT_SEPARATOR))
    if not isinstance(found, str) or not found.strip():
        raise LlmclfError(
            f"{source}: data.label_separator is {shorten(one_line(repr(found)), 60)}, not one or more "
            "characters that are not all spaces. Fix the file, or train the run again."
        )
    return found


def check_metrics(metrics: dict, source: Path) -> None:
    """A multi-label run's metrics.json must hold multi-label metrics (not a classifier's or regression's)."""
    if not is_multilabel(metrics["after"]) or not isinstance(metrics["after"].get("per_label"), dict):
        raise LlmclfError(
            f"{source} holds no multi-label metrics (micro_f1, macro_f1, subset_accuracy, hamming_loss, "
            f"per_label) although the run's task is {MULTI_LABEL}: the file does not belong to this run. "
            "Evaluate the run again."
        )


def _parse_sets(values: pd.Series, labels: list[str], separator: str, where: str) -> list[tuple[str, ...]]:
    """Each cell's labels (joined by `separator`; an empty cell: none) in labels.json's order; a name
    that is not one of the run's labels is an error naming its row."""
    known, sets = set(labels), []
    for row, value in enumerate(values):
        names = {part.strip() for part in str(value).split(separator)} - {""}
        unknown = sorted(names - known)
        if unknown:
            raise LlmclfError(
                f"{where}, row {row + 2}: {shorten(one_line(unknown[0]), 60)!r} is not one of the run's "
                f"labels (labels.json), joined by {separator!r}. Is this the run's predictions file? "
                "Evaluate the run again."
            )
        sets.append(tuple(label for label in labels if label in names))
    return sets


def label_sets(
    frame: pd.DataFrame | None, labels: list[str], separator: str, source: Path
) -> pd.DataFrame | None:
    """predictions_test.csv of a multi-label run with `label` (true) and `predicted` as tuples of
    label names in labels.json's order; an error where a column is missing or a name is unknown."""
    if frame is None:
        return None
    missing = [column for column in ("text", "label", "predicted") if column not in frame]
    if missing:
        raise LlmclfError(
            f"{source} has no column {', '.join(missing)}: a multi-label run's predictions hold text, label "
            "(the true labels) and predicted (the predicted ones). Evaluate the run again."
        )
    out = frame.copy()
    for column in ("label", "predicted"):
        out[column] = _parse_sets(frame[column], labels, separator, f"{source} ({column})")
    return out


def multi_hot(sets: Any, labels: list[str]) -> np.ndarray:
    """Label sets as rows of 0/1 in labels.json's order: (texts, labels) integers."""
    index = {label: i for i, label in enumerate(labels)}
    out = np.zeros((len(sets), len(labels)), dtype=int)
    for row, names in enumerate(sets):
        out[row, [index[name] for name in names]] = 1
    return out


def decisions(predictions: pd.DataFrame, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(true, predicted) multi-hot rows of the test texts."""
    return multi_hot(predictions["label"], labels), multi_hot(predictions["predicted"], labels)


def shown_set(names: tuple[str, ...], separator: str) -> str:
    """A label set as the report shows it: joined by the separator and a space; "(none)" when empty."""
    joiner = separator.strip() + " " if separator.strip() == DEFAULT_SEPARATOR else f" {separator.strip()} "
    return joiner.join(names) if names else "(none)"


# ------------------------------------------------------------------------------------ summary, verdict
def _decision_counts(predictions: pd.DataFrame | None, labels: list[str]) -> dict[str, Any] | None:
    """Texts with every label right, wrong label decisions, all decisions, and the Hamming loss of
    predicting no label at all (the share of decisions that are positive); None without rows."""
    if predictions is None or not len(predictions):
        return None
    true, predicted = decisions(predictions, labels)
    return {
        "texts": len(true),
        "exact": int((true == predicted).all(axis=1).sum()),
        "wrong": int((true != predicted).sum()),
        "decisions": int(true.size),
        "empty_hamming": float(true.mean()),
    }


def verdict(metrics: dict, info: dict, predictions: pd.DataFrame | None, labels: list[str]) -> str:
    """One line: micro-F1 after training with the other scores, what the model scored before training
    and the probe heads alone, what predicting no label scores, and the errors on the test texts."""
    after, before, probe = metrics["after"], as_dict(metrics.get("before")), as_dict(info.get("probe"))
    parts = [
        f"test micro-F1 {_shown(after.get('micro_f1'))} after training (macro-F1 "
        f"{_shown(after.get('macro_f1'))}, subset accuracy {_shown(after.get('subset_accuracy'))}, "
        f"Hamming loss {_shown(after.get('hamming_loss'))})"
    ]
    if before:
        parts.append(
            f"before training (random head): micro-F1 {_shown(before.get('micro_f1'))}, Hamming loss "
            f"{_shown(before.get('hamming_loss'))}"
        )
    if number_cell(probe.get("test_micro_f1")) is not None:
        parts.append(
            f"the linear-probe heads alone (before fine-tuning): micro-F1 {_shown(probe['test_micro_f1'])}"
        )
    counts = _decision_counts(predictions, labels)
    if counts is not None:
        parts.append(f"predicting no label at all: Hamming loss {counts['empty_hamming']:.4f}")
        parts.append(
            f"{counts['exact']} of {counts['texts']} test texts with every label right, {counts['wrong']} "
            f"wrong label decision{'s' * (counts['wrong'] != 1)} out of {counts['decisions']}"
        )
    return "Verdict: " + "; ".join(parts) + "."


def summary_rows(metrics: dict, labels: list[str], separator: str) -> list[list[Any]]:
    """The Summary table's multi-label rows: the task, then each test score before → after training."""
    before, after = as_dict(metrics.get("before")), metrics["after"]
    rows: list[list[Any]] = [
        [
            "task",
            f"{MULTI_LABEL}: {len(labels)} labels, each decided on its own (its sigmoid probability "
            "against its threshold); a text may get several or none",
        ],
        ["labels joined by (data.label_separator)", repr(separator)],
    ]
    for name, key in MULTILABEL_HEADLINE:
        if before:
            rows.append(
                [
                    f"test {name}, before → after training",
                    f"{_shown(before.get(key))} → {_shown(after.get(key))}",
                ]
            )
        else:
            rows.append([f"test {name} after training", or_na(after.get(key))])
    return rows


# ------------------------------------------------------------------------------------ data
def data_table(summary: dict, labels: list[str]) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows): texts carrying each label per split with its positive weight, then the texts
    per split and the labels per text (data_summary.json's counts, rows and pos_weights)."""
    counts, texts = as_dict(summary.get("counts")), as_dict(summary.get("rows"))
    weights = as_dict(summary.get("pos_weights"))
    splits = [split for split in ("train", "val", "test") if split in counts or split in texts]
    rows: list[list[Any]] = []
    for label in labels:
        row = [label, *[as_dict(counts.get(split)).get(label, 0) for split in splits]]
        rows.append(row + ([number_cell(weights.get(label))] if weights else []))
    tail = [""] if weights else []
    if texts:
        rows.append(["texts", *[texts.get(split, "") for split in splits], *tail])
        per_text = []
        for split in splits:
            n, carried = stages.number(texts.get(split)), _carried(counts.get(split))
            per_text.append(carried / n if n and carried is not None else None)
        rows.append(["labels per text", *per_text, *tail])
    headers = ["label", *splits] + (["positive weight"] if weights else [])
    return headers, rows


def _carried(counts: Any) -> float | None:
    """All label occurrences in a split (a text with two labels counts twice)."""
    values = [stages.number(v) for v in as_dict(counts).values()]
    return sum(v for v in values if v is not None) if values else None


def data_blocks(summary: dict, labels: list[str]) -> list[Block]:
    weights = as_dict(summary.get("pos_weights"))
    text = (
        f"Source: {summary.get('source')}. Texts carrying each label per split (a text with several labels "
        "counts under each), then the texts per split and the labels they carry on average"
        + (
            ", and each label's positive weight in the loss (binary cross-entropy pos_weight: what the "
            "loss of a text carrying the label is multiplied by, so that a rare label is not learned as "
            "never there)."
            if weights
            else " (no positive weights in the loss)."
        )
    )
    headers, rows = data_table(summary, labels)
    return [Block("para", text), Block("table", headers=headers, rows=rows)]


# ------------------------------------------------------------------------------------ metrics
def _probe_sentence(info: dict, config: dict) -> str:
    """Where fine-tuning started: the linear probes per label run_info.json records, or not."""
    probe = as_dict(info.get("probe"))
    if probe:
        parts = [
            f"{name} {_shown(probe.get(key))}"
            for name, key in (("training micro-F1", "train_micro_f1"), ("test micro-F1", "test_micro_f1"))
            if number_cell(probe.get(key)) is not None
        ]
        return (
            " Fine-tuning started from linear-probe heads (train.head_init: probe), a logistic regression "
            "per label fitted on the frozen model's features of the training split"
            + (f" ({', '.join(parts)})." if parts else ".")
        )
    if as_dict(config.get("train")).get("head_init") == "probe":
        return " Fine-tuning started from linear-probe heads (train.head_init: probe)."
    return " Fine-tuning started from that random head (train.head_init: random)."


def metric_blocks(metrics: dict, info: dict, config: dict, labels: list[str]) -> list[Block]:
    """The caption (what the numbers mean, where training started) and the table."""
    n = stages.number(metrics["after"].get("n"))
    caption = (
        f"On the test split ({int(n)} texts, {len(labels)} labels each)."
        if n is not None
        else ("On the test split.")
    )
    caption += (
        " Each text gets every label whose probability reaches that label's threshold. Micro F1 pools "
        "every label decision of every text; macro F1 is the mean of the labels' F1 (a rare label counts "
        "as much as a common one); subset accuracy is the share of texts whose predicted labels are "
        "exactly their true ones; Hamming loss is the share of wrong label decisions: lower is better."
        + stages.layer_sentence(info)
    )
    if metrics.get("before"):
        caption += " Before training is the baseline: the base model with a randomly initialised head."
        caption += _probe_sentence(info, config)
    headers, rows = metric_rows(metrics, MULTILABEL_HEADLINE)
    return [Block("para", caption), Block("table", headers=headers, rows=rows)]


def per_label_blocks(metrics: dict, info: dict, labels: list[str]) -> list[Block]:
    """Precision, recall, F1 (and before training), support and the threshold of each label."""
    after = as_dict(metrics["after"].get("per_label"))
    before = as_dict(as_dict(metrics.get("before")).get("per_label"))
    thresholds = as_dict(info.get("thresholds"))
    rows = []
    for label in labels:
        m = as_dict(after.get(label))
        cells = [number_cell(m.get(key)) for key in ("precision", "recall", "f1")]
        f1_before = number_cell(as_dict(before.get(label)).get("f1"))
        support = stages.number(m.get("support"))
        support = int(support) if support is not None else None
        rows.append([label, *cells, f1_before, support, number_cell(thresholds.get(label))])
    text = (
        "Each label's decisions on the test split after training (support: the test texts carrying it). "
        "A text gets the label where its probability reaches the label's threshold, tuned for the label's "
        "F1 on the validation split (run_info.json thresholds; 0.5 where there was none to tune on)."
    )
    headers = ["label", "precision", "recall", "F1", "F1 before", "support", "threshold"]
    return [Block("para", text), Block("table", headers=headers, rows=rows)]


# ------------------------------------------------------------------------------------ co-occurrence
def cooccurrence(rows: np.ndarray) -> np.ndarray:
    """(labels, labels) counts of the texts carrying both labels of each pair; the diagonal: each
    label's texts."""
    rows = np.asarray(rows, dtype=int)
    return rows.T @ rows


def top_pairs(
    true: np.ndarray, predicted: np.ndarray, labels: list[str], top: int = PAIRS
) -> list[list[Any]]:
    """The label pairs most often on one test text: "a + b", texts carrying both, texts predicted with
    both; most frequent first (then most often predicted, then labels.json's order), pairs never seen
    together in either left out."""
    together, guessed = cooccurrence(true), cooccurrence(predicted)
    pairs = [
        (int(together[i, j]), int(guessed[i, j]), i, j)
        for i in range(len(labels))
        for j in range(i + 1, len(labels))
        if together[i, j] or guessed[i, j]
    ]
    pairs.sort(key=lambda p: (-p[0], -p[1], p[2], p[3]))
    return [[f"{labels[i]} + {labels[j]}", both, guess] for both, guess, i, j in pairs[:top]]


def write_figures(
    folder: RunFolder, predictions: pd.DataFrame | None, labels: list[str]
) -> dict[str, plots.Png]:
    """The true and the predicted label co-occurrence of the test split, as PNGs in the run folder
    (none without rows)."""
    if predictions is None or not len(predictions):
        return {}
    true, predicted = (cooccurrence(rows) for rows in decisions(predictions, labels))
    figures = {
        "true": (TRUE_PNG, true, "True labels (test)"),
        "predicted": (PREDICTED_PNG, predicted, "Predicted labels (test, after training)"),
    }
    vmax = float(max(true.max(initial=0), predicted.max(initial=0)))  # one scale for both
    return {
        key: plots.save_png(plots.cooccurrence_figure(matrix, labels, title, vmax), folder, name)
        for key, (name, matrix, title) in figures.items()
    }


def cooccurrence_blocks(
    images: dict[str, plots.Png], predictions: pd.DataFrame | None, labels: list[str]
) -> list[Block]:
    if "true" not in images or predictions is None:
        what = "predictions_test.csv is missing" if predictions is None else "no test predictions"
        return [Block("para", f"{what}: no label co-occurrence.")]
    text = (
        "How many test texts carry both labels of each pair (the diagonal: the texts carrying each "
        "label), in their true labels and in the predicted ones after training. A pair the model "
        "predicts together far more or less often than it occurs shows labels it confuses or keeps apart."
    )
    half = len(labels) <= HALF_MAX
    blocks = [
        Block("para", text),
        Block("image", text="Label co-occurrence, true labels", image=images["true"], half=half),
        Block("image", text="Label co-occurrence, predicted labels", image=images["predicted"], half=half),
    ]
    pairs = top_pairs(*decisions(predictions, labels), labels)
    if not pairs:
        return blocks + [Block("para", "No test text carries or is predicted with two labels.")]
    headers = ["labels", "test texts with both", "predicted with both"]
    return blocks + [
        Block("para", f"The {len(pairs)} label pairs most often on one test text:"),
        Block("table", headers=headers, rows=pairs),
    ]


# ------------------------------------------------------------------------------------ the errors
def most_wrong(predictions: pd.DataFrame | None, labels: list[str], top: int = 10) -> pd.DataFrame:
    """The test texts with the most wrong label decisions (missed true labels plus extra predicted
    ones), most first (ties in file order): text (a text pair as its two texts), true, predicted,
    missed, extra, errors; texts with every label right left out."""
    columns = ["text", "true", "predicted", "missed", "extra", "errors"]
    if predictions is None or not len(predictions):
        return pd.DataFrame(columns=columns)
    text = predictions["text"].astype(str)
    if "pair" in predictions:
        text = text + " / " + predictions["pair"].astype(str)
    frame = pd.DataFrame({"text": text, "true": predictions["label"], "predicted": predictions["predicted"]})
    frame["missed"] = [tuple(x for x in t if x not in p) for t, p in zip(frame["true"], frame["predicted"])]
    frame["extra"] = [tuple(x for x in p if x not in t) for t, p in zip(frame["true"], frame["predicted"])]
    frame["errors"] = [len(m) + len(e) for m, e in zip(frame["missed"], frame["extra"])]
    wrong = frame[frame["errors"] > 0]
    order = wrong["errors"].sort_values(ascending=False, kind="stable").index
    return wrong.loc[order, columns].head(top).reset_index(drop=True)


def wrong_blocks(
    predictions: pd.DataFrame | None, labels: list[str], separator: str, top: int
) -> list[Block]:
    if predictions is None:
        return [Block("para", "predictions_test.csv is missing: no errors to list.")]
    wrong = most_wrong(predictions, labels, top)
    if not len(wrong):
        return [Block("para", "Every test text got exactly its true labels.")]
    # the text first: on a narrow page it is what shows, the rest of the row scrolls in the table's box
    rows = [
        [i + 1, shorten(r.text), shown_set(r.true, separator), shown_set(r.predicted, separator)]
        + [
            shown_set(r.missed, separator) if r.missed else "",
            shown_set(r.extra, separator) if r.extra else "",
        ]
        + [r.errors]
        for i, r in wrong.iterrows()
    ]
    what = (
        f"The {len(wrong)} test texts with the most wrong label decisions after training: missed (true "
        "labels not predicted) plus extra (labels predicted that are not true)."
    )
    headers = ["#", "text", "true", "predicted", "missed", "extra", "errors"]
    return [Block("para", what), Block("table", headers=headers, rows=rows)]


# ------------------------------------------------------------------------------------ training curves
def training_caption(info: dict) -> str:
    logged = any("eval_micro_f1" in e or "eval_macro_f1" in e for e in stages.log_entries(info))
    return "Training and validation loss" + (
        ", validation micro and macro F1 (each label decided at probability 0.5)" if logged else ""
    )


def validation_table(info: dict) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) of the few validations: loss, micro and macro F1."""
    return list(VALIDATION_HEADERS), stages.validation_rows(info, VALIDATION_KEYS)
