"""The report of a regression run (`task: regression`): what it scored, its plots and its largest errors.

A regression run's folder holds one output (labels.json `["score"]`); metrics.json has n, mse, mae,
pearson and spearman before and after training (a correlation is null where the predictions are
constant); predictions_test.csv has the true value as `label` and the predicted one as `score`; and
data_summary.json has the target's mean, standard deviation, smallest and largest value per split as
`targets`. In place of a classifier's per-class table, confusion matrices, calibration and most
confidently wrong texts, its report has the predicted values against the true ones, the residuals and
the texts with the largest errors.

run_report reads the folder and calls the builders here, which take the folder's values (dicts and the
predictions' frame, any of them possibly malformed in a shared folder) and return the report's blocks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llmclf.config import REGRESSION, SINGLE_LABEL, TASK_CHOICES
from llmclf.errors import LlmclfError
from llmclf.reports import plots, stages
from llmclf.reports.blocks import Block, as_dict, metric_rows, or_na, shorten
from llmclf.reports.console import REGRESSION_HEADLINE, is_regression, number_cell, one_line
from llmclf.runfolder import RunFolder

SECTIONS = (
    "Summary",
    "Data",
    "Metrics",
    "Predicted vs true",
    "Training curves",
    "Largest errors",
    "Configuration",
)
PREDICTED_PNG = "predicted_vs_true.png"
RESIDUALS_PNG = "residuals.png"
KNOWN_TASKS = TASK_CHOICES
VALIDATION_KEYS = ("eval_mse", "eval_mae", "eval_pearson", "eval_spearman")
VALIDATION_HEADERS = (
    "step",
    "epoch",
    "validation loss",
    "validation MSE",
    "validation MAE",
    "validation Pearson",
    "validation Spearman",
)


# ------------------------------------------------------------------------------------ reading the run
def task_of(config: dict, info: dict) -> str:
    """The run's task: config.yaml's top-level `task`, else run_info.json's, else single-label (runs
    from before llmclf had tasks name none)."""
    task = config.get("task") or info.get("task") or SINGLE_LABEL
    if task not in KNOWN_TASKS:
        raise LlmclfError(
            f"The run names task {one_line(str(task))[:100]!r} (config.yaml or run_info.json), which this "
            f"llmclf does not know (it knows {', '.join(KNOWN_TASKS)}). Update llmclf, or fix the file."
        )
    return task


def check_metrics(metrics: dict, source: Path) -> None:
    """A regression run's metrics.json must hold regression metrics (not a classifier's)."""
    if not is_regression(metrics["after"]):
        raise LlmclfError(
            f"{source} holds no regression metrics (mse, mae, pearson, spearman) although the run's task "
            f"is {REGRESSION}: the file does not belong to this run. Evaluate the run again."
        )


def numeric_predictions(frame: pd.DataFrame | None, source: Path) -> pd.DataFrame | None:
    """predictions_test.csv of a regression run with `label` (true) and `score` (predicted) as floats.

    A value that is no number is an error naming its row; NaN (or an empty cell) or infinity (a
    diverged model) stays in, and is left out of the plots and the error table, which say so."""
    if frame is None:
        return None
    missing = [column for column in ("text", "label", "score") if column not in frame]
    if missing:
        raise LlmclfError(
            f"{source} has no column {', '.join(missing)}: a regression run's predictions hold text, label "
            "(the true value) and score (the predicted value). Evaluate the run again."
        )
    out = frame.copy()
    for column in ("label", "score"):
        values = []
        for row, value in enumerate(frame[column]):
            try:  # an empty cell is how a NaN is written (pandas' to_csv)
                values.append(float(value) if value != "" else math.nan)
            except (TypeError, ValueError):
                raise LlmclfError(
                    f"{source}, row {row + 2}: {column} is {shorten(one_line(str(value)), 60)!r}, not a "
                    "number. Is this a regression run's folder? Evaluate the run again."
                ) from None
        out[column] = np.array(values, dtype=float)
    return out


def finite_rows(predictions: pd.DataFrame) -> pd.DataFrame:
    """The test rows whose true and predicted values are both finite numbers."""
    keep = np.isfinite(predictions["label"].to_numpy()) & np.isfinite(predictions["score"].to_numpy())
    return predictions[keep]


def _left_out(predictions: pd.DataFrame) -> list[Block]:
    left = len(predictions) - len(finite_rows(predictions))
    if not left:
        return []
    rows = "1 test row holds" if left == 1 else f"{left} test rows hold"
    return [Block("para", f"{rows} a value that is not a finite number (NaN or infinite): left out.")]


# ------------------------------------------------------------------------------------ the errors
def largest_errors(predictions: pd.DataFrame | None, top: int = 10) -> pd.DataFrame:
    """The test texts with the largest absolute error, largest first (ties in file order): text (a
    text pair as its two texts), true, predicted, error (predicted - true)."""
    if predictions is None:
        return pd.DataFrame(columns=["text", "true", "predicted", "error"])
    rows = finite_rows(predictions)
    text = rows["text"].astype(str)
    if "pair" in rows:
        text = text + " / " + rows["pair"].astype(str)
    frame = pd.DataFrame({"text": text, "true": rows["label"], "predicted": rows["score"]})
    frame["error"] = frame["predicted"] - frame["true"]
    order = frame["error"].abs().sort_values(ascending=False, kind="stable").index
    return frame.loc[order].head(top).reset_index(drop=True)


def error_blocks(predictions: pd.DataFrame | None, top: int) -> list[Block]:
    if predictions is None:
        return [Block("para", "predictions_test.csv is missing: no errors to list.")]
    errors = largest_errors(predictions, top)
    if not len(errors):
        return [Block("para", "No test predictions to list."), *_left_out(predictions)]
    # the text first: on a narrow page it is what shows, the rest of the row scrolls in the table's box
    rows = [
        [i + 1, shorten(r.text), number_cell(r.true), number_cell(r.predicted), number_cell(r.error)]
        for i, r in errors.iterrows()
    ]
    what = (
        f"The {len(errors)} test texts with the largest absolute error (predicted - true, in the "
        "target's units)."
    )
    return [
        Block("para", what),
        Block("table", headers=["#", "text", "true", "predicted", "error"], rows=rows),
        *_left_out(predictions),
    ]


# ------------------------------------------------------------------------------------ baselines
def training_mean(summary: dict | None) -> float | None:
    """The training split's mean target (data_summary.json), what a model that learned nothing predicts."""
    return stages.number(as_dict(as_dict(as_dict(summary).get("targets")).get("train")).get("mean"))


def mean_baseline(predictions: pd.DataFrame | None, summary: dict | None) -> dict[str, Any] | None:
    """MSE and MAE on the test split of always predicting the training mean (else the test mean), and
    R² of the model's predictions (1 - its MSE / the variance of the true values); None without rows."""
    if predictions is None:
        return None
    rows = finite_rows(predictions)
    true, predicted = rows["label"].to_numpy(), rows["score"].to_numpy()
    if not len(true):
        return None
    mean = training_mean(summary)
    out = {"mean": float(true.mean()) if mean is None else mean, "of": "test" if mean is None else "training"}
    out["mse"] = float(np.mean((true - out["mean"]) ** 2))
    out["mae"] = float(np.mean(np.abs(true - out["mean"])))
    variance = float(true.var())
    out["r2"] = 1 - float(np.mean((predicted - true) ** 2)) / variance if variance > 0 else None
    return out


# ------------------------------------------------------------------------------------ summary, verdict
def _shown(metrics: dict, key: str) -> str:
    cell = number_cell(metrics.get(key))
    return "n/a" if cell is None else (f"{cell:.4f}" if isinstance(cell, float) else cell)


def verdict(metrics: dict, info: dict, predictions: pd.DataFrame | None, summary: dict | None) -> str:
    """One line: the test errors and correlations after training, R², what predicting the mean would
    score, what the model scored before training and the probe head alone, and on how many texts."""
    after, before, probe = metrics["after"], as_dict(metrics.get("before")), as_dict(info.get("probe"))
    parts = [
        f"test MAE {_shown(after, 'mae')} after training (MSE {_shown(after, 'mse')}, Pearson "
        f"{_shown(after, 'pearson')}, Spearman {_shown(after, 'spearman')})"
    ]
    baseline = mean_baseline(predictions, summary)
    if baseline is not None and baseline["r2"] is not None:
        parts.append(f"R² {baseline['r2']:.4f} (1 - MSE / variance of the true values)")
    if baseline is not None:
        parts.append(
            f"always predicting the {baseline['of']} mean ({_shown(baseline, 'mean')}): MAE "
            f"{_shown(baseline, 'mae')}, MSE {_shown(baseline, 'mse')}"
        )
    if before:
        parts.append(
            f"before training (random head): MAE {_shown(before, 'mae')}, MSE {_shown(before, 'mse')}"
        )
    if number_cell(probe.get("test_mse")) is not None:
        parts.append(f"the linear-probe head alone (before fine-tuning): MSE {_shown(probe, 'test_mse')}")
    n = stages.number(after.get("n"))
    if n is not None:
        parts.append(f"{int(n)} test texts")
    return "Verdict: " + "; ".join(parts) + "."


def summary_rows(metrics: dict, info: dict) -> list[list[Any]]:
    """The Summary table's regression rows: the task, the target scale, the test scores after training."""
    after = metrics["after"]
    rows: list[list[Any]] = [["task", f"{REGRESSION}: one output (score), a number per text"]]
    scale = number_cell(info.get("target_scale"))
    if scale is not None:
        rows.append(["target scale in training (run_info.json target_scale)", scale])
    rows += [[f"test {name} after training", or_na(after.get(key))] for name, key in REGRESSION_HEADLINE]
    return rows


# ------------------------------------------------------------------------------------ data, metrics
def target_rows(summary: dict) -> list[list[Any]]:
    """split, n, mean, std, min, max of the target, from data_summary.json (empty cells for a split
    without rows or a value that is no number)."""
    counts, targets = as_dict(summary.get("counts")), as_dict(summary.get("targets"))
    rows = []
    for split in ("train", "val", "test"):
        if split not in counts and split not in targets:
            continue
        n = sum(v for v in as_dict(counts.get(split)).values() if stages.number(v) is not None)
        values = as_dict(targets.get(split))
        rows.append([split, int(n), *[number_cell(values.get(k)) for k in ("mean", "std", "min", "max")]])
    return rows


def target_range(summary: dict | None, split: str = "train") -> tuple[Any, Any]:
    """(smallest, largest) target value of a split as data_summary.json records them (each None when
    it records no number), shown as table cells."""
    values = as_dict(as_dict(as_dict(summary).get("targets")).get(split))
    return number_cell(values.get("min")), number_cell(values.get("max"))


def data_blocks(summary: dict) -> list[Block]:
    text = (
        f"Source: {summary.get('source')}. The target (the training column's values) per split: "
        "rows, mean, standard deviation, smallest and largest value."
    )
    headers = ["split", "rows", "mean", "std", "min", "max"]
    return [Block("para", text), Block("table", headers=headers, rows=target_rows(summary))]


def _probe_sentence(info: dict, config: dict) -> str:
    """Where fine-tuning started: the linear probe (ridge regression) run_info.json records, or not."""
    probe = as_dict(info.get("probe"))
    if probe:
        parts = [
            f"{name} {_shown(probe, key)}"
            for name, key in (
                ("training R²", "train_r2"),
                ("cross-validated MSE", "cv_mse"),
                ("alpha", "alpha"),
                ("test MSE", "test_mse"),
            )
            if number_cell(probe.get(key)) is not None
        ]
        return (
            " Fine-tuning started from a linear-probe head (train.head_init: probe), a ridge regression "
            "fitted on the frozen model's features of the training split"
            + (f" ({', '.join(parts)})." if parts else ".")
        )
    if as_dict(config.get("train")).get("head_init") == "probe":
        return " Fine-tuning started from a linear-probe head (train.head_init: probe)."
    return " Fine-tuning started from that random head (train.head_init: random)."


def metric_blocks(metrics: dict, info: dict, config: dict, baseline: dict | None) -> list[Block]:
    """The caption (what the numbers mean, where training started), the table, the mean's scores."""
    n = stages.number(metrics["after"].get("n"))
    caption = f"On the test split ({int(n)} texts)." if n is not None else "On the test split."
    caption += (
        " MSE and MAE are in the target's units (MSE squared): lower is better. Pearson and Spearman are "
        "the correlations of predicted with true values (Spearman of their rank order): 1 is best, n/a "
        "where the predictions are all the same." + stages.layer_sentence(info)
    )
    if metrics.get("before"):
        caption += " Before training is the baseline: the base model with a randomly initialised head."
        caption += _probe_sentence(info, config)
    headers, rows = metric_rows(metrics, REGRESSION_HEADLINE)
    blocks = [Block("para", caption), Block("table", headers=headers, rows=rows)]
    if baseline is not None:
        blocks.append(
            Block(
                "para",
                f"For comparison, always predicting the {baseline['of']} mean ({_shown(baseline, 'mean')}) "
                f"scores MSE {_shown(baseline, 'mse')} and MAE {_shown(baseline, 'mae')} on the same texts.",
            )
        )
    return blocks


# ------------------------------------------------------------------------------------ figures
def training_caption(info: dict) -> str:
    """The training curves' caption: the validation correlations are drawn only where the log has them."""
    logged = any("eval_pearson" in e or "eval_spearman" in e for e in stages.log_entries(info))
    return "Training and validation loss" + (
        ", validation Pearson and Spearman correlation" if logged else ""
    )


def scale_note(info: dict) -> list[Block]:
    """What the losses are measured in: the model learns the target divided by its scale."""
    scale = number_cell(info.get("target_scale"))
    if scale is None:
        return []
    shown = f"{scale:.4f}" if isinstance(scale, float) else scale
    return [
        Block(
            "para",
            f"The losses are mean squared errors of the target divided by its scale ({shown}, the training "
            "split's standard deviation; run_info.json target_scale), the units the model learns in: "
            "always predicting the training mean scores about 1 on this scale. The metrics above and "
            "the saved model are in the target's own units.",
        )
    ]


def _mse_is_loss(row: list[Any]) -> bool:
    """Is a validation's MSE its loss again (as for a model trained with an MSE loss), or absent?"""
    loss, mse = row[2], row[3]
    return mse is None or (loss is not None and math.isclose(mse, loss, rel_tol=1e-5))


def validation_table(info: dict) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) of the few validations, leaving out the columns the log has no value for (the
    trainer may log the validation MSE alone) and a validation MSE that is the validation loss."""
    rows = stages.validation_rows(info, VALIDATION_KEYS)
    keep = [i for i in range(len(VALIDATION_HEADERS)) if i < 3 or any(row[i] is not None for row in rows)]
    if all(_mse_is_loss(row) for row in rows):
        keep = [i for i in keep if i != 3]
    return [VALIDATION_HEADERS[i] for i in keep], [[row[i] for i in keep] for row in rows]


def write_figures(folder: RunFolder, predictions: pd.DataFrame | None) -> dict[str, plots.Png]:
    """Predicted against true values and the residuals, as PNGs in the run folder (none without rows)."""
    rows = finite_rows(predictions) if predictions is not None else None
    if rows is None or not len(rows):
        return {}
    true, predicted = rows["label"].to_numpy(), rows["score"].to_numpy()
    return {
        "predicted": plots.save_png(plots.predicted_figure(true, predicted), folder, PREDICTED_PNG),
        "residuals": plots.save_png(plots.residual_figure(true, predicted), folder, RESIDUALS_PNG),
    }


def figure_blocks(images: dict[str, plots.Png], predictions: pd.DataFrame | None) -> list[Block]:
    if "predicted" not in images:
        what = "predictions_test.csv is missing" if predictions is None else "no test predictions to plot"
        return [Block("para", f"{what}: no plots of the predictions.")]
    text = (
        "Each test text after training: its predicted value against its true value (on the dashed line "
        "they agree), and its residual, predicted minus true (above zero: predicted too high). A slope in "
        "the residuals shows the predictions pulled towards the mean."
    )
    return [
        Block("para", text),
        Block("image", text="Predicted vs true value", image=images["predicted"], half=True),
        Block(
            "image", text="Residual (predicted - true) vs true value", image=images["residuals"], half=True
        ),
        *(_left_out(predictions) if predictions is not None else []),
    ]
