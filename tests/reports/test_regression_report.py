"""The reports of a regression run (task: regression), on run folders written by hand as the pipeline
writes them: the report (metrics before and after, predicted against true values, residuals, the
largest errors, the target per split), the terminal tables, `llmclf compare` and the model card. A
classifier's report stays as it was."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from llmclf.errors import LlmclfError
from llmclf.reports import console, plots, regression, stages
from llmclf.reports import run_report as report

# The test split: true and predicted values, every absolute error distinct (2.0, 0.9, 0.6, 0.35, 0.2,
# 0.1, 0.05, 0), so that the largest errors have one right order.
TEXTS = ["calm", "brisk", "mild", "<script>alert(1)</script> # storm", "gale", "breeze", "gust", "still"]
TRUE = [1.0, 2.0, 3.0, 4.0, 5.0, 2.5, 3.5, 1.5]
PREDICTED = [1.2, 2.9, 3.0, 2.0, 4.4, 2.4, 3.85, 1.55]
BY_ERROR = [3, 1, 4, 6, 0, 5, 7, 2]  # the rows, largest absolute error first
BEFORE = {"n": 8, "mse": 3.25, "mae": 1.625, "pearson": None, "spearman": None}
AFTER = {"n": 8, "mse": 0.668125, "mae": 0.525, "pearson": 0.8123, "spearman": 0.7857}
TARGETS = {
    "train": {"mean": 3.0, "std": 1.25, "min": 0.5, "max": 5.0},
    "val": {"mean": 2.75, "std": 1.1, "min": 1.0, "max": 4.5},
    "test": {"mean": 2.8125, "std": 1.28, "min": 1.0, "max": 5.0},
}
LOG = [
    {"loss": 2.0, "step": 2, "epoch": 0.5},
    {"loss": 1.1, "step": 4, "epoch": 1.0},
    {
        "eval_loss": 0.9,
        "eval_mse": 0.8,
        "eval_mae": 0.7,
        "eval_pearson": 0.65,
        "eval_spearman": 0.6,
        "step": 4,
    },
    {"train_runtime": 3.0, "train_loss": 1.55, "epoch": 1.0, "step": 4},
]
CLASSIFIER_FIGURES = ("confusion_after.png", "confusion_before.png", "calibration.png")


def regression_run(path: Path, *, true=TRUE, predicted=PREDICTED, texts=TEXTS, pairs=None, **edits) -> Path:
    """A regression run folder with exactly the files the pipeline writes; `edits` replace whole files'
    contents (metrics, run_info, summary, config)."""
    path.mkdir(parents=True)
    info = {
        "base_model": "org/base-model",
        "task": "regression",
        "target_scale": 2.0,
        "probe": {"train_r2": 0.81, "cv_mse": 0.42, "alpha": 10.0, "test_mse": 0.5},
        "lexical": None,
        "before_training": "random head",
        "log_history": LOG,
        "train_runtime_s": 3.0,
        "train_loss": 1.55,
        "llmclf_version": "9.9",
        "torch_version": "2.x",
    }
    counts = {split: {"score": n} for split, n in (("train", 40), ("val", 8), ("test", len(true)))}
    summary = {"source": "weather.csv", "counts": counts, "class_weights": None, "targets": TARGETS}
    summary |= {"max_length": 64, "truncated": {"train": 1, "val": 0, "test": 0}, "notes": []}
    files = {
        "labels.json": ["score"],
        "metrics.json": edits.get("metrics", {"before": BEFORE, "after": AFTER}),
        "run_info.json": edits.get("run_info", info),
        "data_summary.json": edits.get("summary", summary),
    }
    for name, data in files.items():
        (path / name).write_text(json.dumps(data), encoding="utf-8")
    config = (
        "task: regression\nmodel:\n  name: org/base-model\ndata:\n  path: weather.csv\n  label_column: wind\n"
    )
    (path / "config.yaml").write_text(edits.get("config", config), encoding="utf-8")
    frame = pd.DataFrame({"text": texts[: len(true)], "label": true, "score": predicted})
    if pairs is not None:
        frame.insert(1, "pair", pairs)
    frame.to_csv(path / "predictions_test.csv", index=False, lineterminator="\r\n")
    return path


def classifier_run(path: Path, config: str = "model:\n  name: org/base-model\n") -> Path:
    """A single-label run folder (two classes, four test texts); `config` without a task: an older run."""
    path.mkdir(parents=True)
    labels = ["no", "yes"]
    per_class = {label: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2} for label in labels}
    stage = {"accuracy": 0.5, "balanced_accuracy": 0.5, "macro_f1": 0.5, "n": 4, "per_class": per_class}
    stage |= {"labels": labels, "confusion_matrix": [[1, 1], [1, 1]]}
    counts = {split: {label: 2 for label in labels} for split in ("train", "val", "test")}
    summary = {"source": "weather.csv", "counts": counts, "class_weights": None, "max_length": 64}
    files = {"labels.json": labels, "metrics.json": {"before": stage, "after": stage}}
    files |= {
        "run_info.json": {"base_model": "org/base-model", "log_history": LOG},
        "data_summary.json": summary,
    }
    for name, data in files.items():
        (path / name).write_text(json.dumps(data), encoding="utf-8")
    (path / "config.yaml").write_text(config, encoding="utf-8")
    rows = [
        {
            "text": f"t{i}",
            "label": labels[i % 2],
            "predicted": labels[i // 2],
            "prob_no": 0.6,
            "prob_yes": 0.4,
        }
        for i in range(4)
    ]
    pd.DataFrame(rows).to_csv(path / "predictions_test.csv", index=False)
    return path


def built(path: Path) -> tuple[str, str]:
    report.build_report(path)
    return (path / "report.md").read_text(encoding="utf-8"), (path / "report.html").read_text(
        encoding="utf-8"
    )


def table_rows(md: str, first_cell: str) -> list[list[str]]:
    """The cells of every Markdown table row whose first cell is `first_cell`."""
    rows = [line for line in md.splitlines() if line.startswith(f"| {first_cell} |")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]


def section(md: str, heading: str) -> str:
    return md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


# ------------------------------------------------------------------------------------ the report
def test_the_report_shows_the_regression_metrics_before_and_after(tmp_path):
    md, page = built(regression_run(tmp_path / "run"))
    assert [line[3:] for line in md.splitlines() if line.startswith("## ")] == list(regression.SECTIONS)
    metrics = section(md, "Metrics")
    assert table_rows(metrics, "MSE") == [["MSE", "0.6681", "3.2500", "-2.5819"]]
    assert table_rows(metrics, "MAE") == [["MAE", "0.5250", "1.6250", "-1.1000"]]
    assert table_rows(metrics, "Pearson") == [["Pearson", "0.8123", "n/a", ""]]  # null before: constant
    assert table_rows(metrics, "Spearman") == [["Spearman", "0.7857", "n/a", ""]]
    assert table_rows(metrics, "test texts") == [["test texts", "8", "8", ""]]
    # the probe head as run_info.json records it for regression (ridge: training R², CV MSE, alpha)
    assert "(training R² 0.8100, cross-validated MSE 0.4200, alpha 10.0000, test MSE 0.5000)" in metrics
    summary = section(md, "Summary")
    assert table_rows(summary, "test MSE after training") == [["test MSE after training", "0.6681"]]
    assert table_rows(summary, "test Pearson after training") == [["test Pearson after training", "0.8123"]]
    assert "regression: one output (score)" in summary
    for gone in ("Per class", "Confusion", "Calibration", "confidently wrong", "accuracy", "ECE"):
        assert gone not in md and gone not in page, gone


def test_the_verdict_gives_r2_and_what_predicting_the_mean_scores(tmp_path):
    md, page = built(regression_run(tmp_path / "run"))
    true, predicted = np.array(TRUE), np.array(PREDICTED)
    r2 = 1 - np.mean((predicted - true) ** 2) / np.var(true)  # by hand, from the predictions
    mean_mse, mean_mae = np.mean((true - 3.0) ** 2), np.mean(np.abs(true - 3.0))  # the training mean: 3.0
    verdict = md.splitlines()[2]
    assert verdict.startswith("Verdict: test MAE 0.5250 after training (MSE 0.6681, Pearson 0.8123")
    assert f"R² {r2:.4f} " in verdict and r2 == pytest.approx(1 - 0.668125 / np.var(true))
    assert f"always predicting the training mean (3.0000): MAE {mean_mae:.4f}, MSE {mean_mse:.4f}" in verdict
    assert "before training (random head): MAE 1.6250, MSE 3.2500" in verdict
    assert "; the linear-probe head alone (before fine-tuning): MSE 0.5000;" in verdict
    assert verdict.endswith("; 8 test texts.")
    assert '<p class="verdict">Verdict: test MAE 0.5250' in page


def test_the_data_section_summarises_the_target_per_split(tmp_path):
    md, _ = built(regression_run(tmp_path / "run"))
    data = section(md, "Data")
    assert table_rows(data, "split") == [["split", "rows", "mean", "std", "min", "max"]]
    assert table_rows(data, "train") == [["train", "40", "3.0000", "1.2500", "0.5000", "5.0000"]]
    assert table_rows(data, "val") == [["val", "8", "2.7500", "1.1000", "1.0000", "4.5000"]]
    assert table_rows(data, "test") == [["test", "8", "2.8125", "1.2800", "1.0000", "5.0000"]]
    assert "Texts truncated to 64 tokens: train 1, val 0, test 0." in data
    assert "class" not in data


def test_the_largest_errors_are_listed_largest_first_and_escaped(tmp_path):
    md, page = built(regression_run(tmp_path / "run"))
    errors = section(md, "Largest errors")
    rows = [table_rows(errors, str(rank))[0] for rank in range(1, 9)]
    for row, i in zip(rows, BY_ERROR):
        assert row[2:] == [f"{TRUE[i]:.4f}", f"{PREDICTED[i]:.4f}", f"{PREDICTED[i] - TRUE[i]:.4f}"]
    assert rows[0][1] == r"&lt;script&gt;alert(1)&lt;/script&gt; \# storm"  # Markdown: literal text
    assert [row[1] for row in rows[1:4]] == ["brisk", "gale", "gust"]
    assert [row[4] for row in rows[:3]] == ["-2.0000", "0.9000", "-0.6000"]
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; # storm" in page
    top = regression.largest_errors(report.read_run(tmp_path / "run").predictions, top=3)
    assert list(top["text"]) == [TEXTS[i] for i in BY_ERROR[:3]]
    assert list(top["error"]) == pytest.approx([-2.0, 0.9, -0.6])


def test_a_text_pair_is_shown_as_its_two_texts(tmp_path):
    pairs = [f"second {i}" for i in range(8)]
    md, _ = built(regression_run(tmp_path / "run", pairs=pairs))
    assert table_rows(section(md, "Largest errors"), "2")[0][1] == "brisk / second 1"


def test_the_plots_are_pngs_of_the_runs_values(tmp_path):
    path = regression_run(tmp_path / "run")
    md, page = built(path)
    for name in (regression.PREDICTED_PNG, regression.RESIDUALS_PNG, "training_curves.png"):
        with Image.open(path / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 300
        assert f"]({name})" in md
    assert not any((path / name).exists() for name in CLASSIFIER_FIGURES)
    assert page.count('<img alt="') == 3 and page.count("data:image/png;base64,") == 3
    fig = plots.predicted_figure(np.array(TRUE), np.array(PREDICTED))
    ax = fig.axes[0]
    assert ax.collections[0].get_offsets().tolist() == [list(p) for p in zip(TRUE, PREDICTED)]
    diagonal = ax.get_lines()[0]  # y = x over the whole plotted range
    assert list(diagonal.get_xdata()) == list(diagonal.get_ydata()) and ax.get_xlim() == ax.get_ylim()
    residuals = plots.residual_figure(np.array(TRUE), np.array(PREDICTED)).axes[0]
    offsets = np.asarray(residuals.collections[0].get_offsets())
    assert offsets[:, 0].tolist() == TRUE
    assert offsets[:, 1].tolist() == pytest.approx([p - t for p, t in zip(PREDICTED, TRUE)])
    assert residuals.get_ylim() == pytest.approx((-2.2, 2.2))  # symmetric around 0, the largest error 2


def test_training_curves_show_the_validation_correlations(tmp_path):
    fig = plots.training_figure(LOG, regression=True)
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    assert list(lines["validation Pearson"].get_ydata()) == [0.65]
    assert list(lines["validation Spearman"].get_ydata()) == [0.6]
    assert list(lines["training loss"].get_ydata()) == [2.0, 1.1]
    assert "validation accuracy" not in lines
    assert stages.validation_rows({"log_history": LOG}, regression.VALIDATION_KEYS) == [
        [4, None, 0.9, 0.8, 0.7, 0.65, 0.6]
    ]
    md, _ = built(regression_run(tmp_path / "run"))
    assert table_rows(section(md, "Training curves"), "4") == [
        ["4", "", "0.9000", "0.8000", "0.7000", "0.6500", "0.6000"]
    ]


def test_a_log_with_the_validation_mse_alone_draws_the_loss_alone(tmp_path):
    """What llmclf's trainer logs for a regression run: eval_loss and eval_mse (the same MSE)."""
    log = [{"loss": 2.0, "step": 2}, {"loss": 1.1, "step": 4}, {"eval_loss": 0.9, "eval_mse": 0.9, "step": 4}]
    fig = plots.training_figure(log, regression=True)
    assert len(fig.axes) == 1 and fig.axes[0].get_xlabel() == "step"
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["training loss", "validation loss"]
    info = {"target_scale": 1.25, "log_history": log}
    # its validation MSE is its validation loss again: one column
    assert regression.validation_table(info) == (["step", "epoch", "validation loss"], [[4, None, 0.9]])
    other = {"log_history": [{"eval_loss": 0.9, "eval_mse": 2.5, "step": 4}]}  # an MSE of its own: shown
    assert regression.validation_table(other) == (
        ["step", "epoch", "validation loss", "validation MSE"],
        [[4, None, 0.9, 2.5]],
    )
    assert regression.training_caption(info) == "Training and validation loss"
    path = regression_run(tmp_path / "run", run_info={"task": "regression", **info})
    curves = section(built(path)[0], "Training curves")
    assert "divided by its scale (1.2500, the training split's standard deviation" in curves
    assert "![Training and validation loss](training_curves.png)" in curves
    assert table_rows(curves, "4") == [["4", "", "0.9000"]]
    with Image.open(path / "training_curves.png") as image:
        assert image.size[0] > image.size[1]  # one panel: wider than high


def test_values_that_are_not_finite_are_left_out_and_said_so(tmp_path):
    predicted = [*PREDICTED[:7], float("nan")]
    md, _ = built(regression_run(tmp_path / "run", predicted=predicted))
    errors = section(md, "Largest errors")
    assert "1 test row holds a value that is not a finite number (NaN or infinite): left out." in errors
    assert "still" not in errors and len([r for i in range(1, 9) for r in table_rows(errors, str(i))]) == 7


def test_constant_predictions_and_a_missing_predictions_file_still_make_a_report(tmp_path):
    after = {**AFTER, "pearson": None, "spearman": None}
    path = regression_run(tmp_path / "flat", predicted=[3.0] * 8, metrics={"after": after})
    md, _ = built(path)
    summary, metrics = section(md, "Summary"), section(md, "Metrics")
    assert table_rows(summary, "test Pearson after training") == [["test Pearson after training", "n/a"]]
    assert table_rows(metrics, "MSE") == [["MSE", "0.6681"]]  # no baseline: no before column
    assert "Before training is the baseline" not in metrics
    with Image.open(path / regression.PREDICTED_PNG) as image:
        assert image.format == "PNG"
    path = regression_run(tmp_path / "no-predictions")
    (path / "predictions_test.csv").unlink()
    md, _ = built(path)
    assert r"predictions\_test.csv is missing: no plots of the predictions." in md  # _ escaped
    assert r"predictions\_test.csv is missing: no errors to list." in md
    assert "R²" not in md.splitlines()[2] and not (path / regression.PREDICTED_PNG).exists()


def test_a_value_that_is_no_number_is_an_error_naming_its_row(tmp_path):
    path = regression_run(tmp_path / "run", predicted=[*PREDICTED[:2], "high", *PREDICTED[3:]])
    with pytest.raises(LlmclfError, match=r"predictions_test.csv, row 4: score is 'high', not a number"):
        report.build_report(path)


def test_an_unknown_task_and_classifier_metrics_are_errors(tmp_path):
    path = regression_run(tmp_path / "a", config="task: ranking\n")
    with pytest.raises(LlmclfError, match="task 'ranking'.*does not know"):
        report.build_report(path)
    stage = {"accuracy": 0.5, "n": 8}
    path = regression_run(tmp_path / "b", metrics={"before": stage, "after": stage})
    with pytest.raises(LlmclfError, match="metrics.json holds no regression metrics"):
        report.build_report(path)


# ------------------------------------------------------------------------------------ a classifier's report
@pytest.mark.parametrize("config", ["model:\n  name: org/base-model\n", "task: single-label\n"])
def test_a_single_label_run_keeps_its_report(tmp_path, config):
    path = classifier_run(tmp_path / "run", config)
    md, _ = built(path)
    assert [line[3:] for line in md.splitlines() if line.startswith("## ")] == list(report.REPORT_SECTIONS)
    assert (path / "calibration.png").exists() and not (path / regression.PREDICTED_PNG).exists()
    assert md.splitlines()[2].startswith("Verdict: test accuracy 0.5000 after training")
    assert report.read_run(path).task == "single-label"


# ------------------------------------------------------------------------------------ the terminal
def test_the_terminal_prints_the_regression_metrics():
    text = console.compare(BEFORE, AFTER)
    lines = text.splitlines()
    assert lines[0] == "Test metrics" and lines[1].split() == ["metric", "before", "after", "change"]
    assert lines[3].split() == ["MSE", "3.2500", "0.6681", "-2.5819"]
    assert lines[4].split() == ["MAE", "1.6250", "0.5250", "-1.1000"]
    assert lines[5].split() == ["Pearson", "n/a", "0.8123"]
    assert lines[6].split() == ["Spearman", "n/a", "0.7857"]
    assert "accuracy" not in text
    alone = console.compare(None, {"n": 8, "mse": 0.00004, "mae": 3.2e9, "pearson": 0.5, "spearman": 1})
    assert [line.split() for line in alone.splitlines()[3:]] == [
        ["MSE", "4e-05"],  # 4 decimals would show 0.0000
        ["MAE", "3.2e+09"],
        ["Pearson", "0.5000"],
        ["Spearman", "1.0000"],
    ]
    assert console.full_report(BEFORE, AFTER) == text  # no per-class table or confusion matrix


def test_the_terminal_prints_the_target_per_split():
    text = console.target_summary({**TARGETS, "val": None})
    lines = [line.split() for line in text.splitlines()]
    assert lines[0] == ["Target", "per", "split"] and lines[1] == ["split", "mean", "std", "min", "max"]
    assert lines[3] == ["train", "3.0000", "1.2500", "0.5000", "5.0000"]
    assert lines[4] == ["val", "(empty)"]
    assert lines[5] == ["test", "2.8125", "1.2800", "1.0000", "5.0000"]


# ------------------------------------------------------------------------------------ compare
def test_compare_sets_regression_runs_side_by_side(tmp_path):
    from llmclf.reports.compare import compare_runs

    first = regression_run(tmp_path / "first")
    better = {**AFTER, "mse": 0.25, "mae": 0.4, "pearson": None}
    second = regression_run(tmp_path / "second", metrics={"before": BEFORE, "after": better})
    headers, rows, warnings = compare_runs([first, second])
    assert headers == ["", "first", "second"]
    table = {row[0]: row[1:] for row in rows}
    assert table["MSE after"] == [0.668125, 0.25]
    assert table["MSE before"] == [3.25, 3.25]
    assert table["MAE after"] == [0.525, 0.4]
    assert table["Pearson after"] == [0.8123, "n/a"]
    assert table["Spearman after"] == [0.7857, 0.7857]
    assert table["test examples"] == [8, 8]
    assert not any("accuracy" in key or "ECE" in key for key in table)
    assert warnings == []


def test_compare_refuses_a_regression_run_beside_a_classifier(tmp_path):
    from llmclf.reports.compare import compare_runs

    runs = [regression_run(tmp_path / "scores"), classifier_run(tmp_path / "classes")]
    with pytest.raises(LlmclfError, match=r"different tasks \(scores: regression; classes: single-label\)"):
        compare_runs(runs)


# ------------------------------------------------------------------------------------ the model card
def test_the_model_card_describes_a_regression_model(tmp_path, monkeypatch):
    from llmclf.reports import modelcard

    monkeypatch.setattr(modelcard, "base_model_licence", lambda name: "apache-2.0")
    card = modelcard.model_card(regression_run(tmp_path / "run"), repo_id="me/wind")
    head, body = card[4:].split("\n---\n", 1)
    front = yaml.safe_load(head)
    assert "regression" in front["tags"]
    results = {m["type"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert results == {"mse": 0.668125, "mae": 0.525, "pearsonr": 0.8123, "spearmanr": 0.7857}
    assert body.lstrip().startswith("# Regression model fine-tuned from org/base-model")
    assert (
        "It outputs one number per text, labelled “score”, in the units of the training column “wind”."
        in body
    )
    assert 'pipeline("text-classification", model="me/wind", function_to_apply="none")' in body
    assert 'clf("calm")  # [{"label": "score", "score": <the predicted value>}]' in body
    assert table_rows(body, "MSE") == [["MSE", "3.2500", "0.6681"]]
    assert table_rows(body, "Pearson") == [["Pearson", "n/a", "0.8123"]]
    assert table_rows(body, "train") == [["train", "40", "3.0000", "1.2500", "0.5000", "5.0000"]]
    assert "training range (0.5000 to 5.0000 in training)" in body
    for gone in ("## Labels", "precision", "accuracy", "Probabilities"):
        assert gone not in body, gone


def test_a_classifier_card_is_unchanged(tmp_path, monkeypatch):
    from llmclf.reports import modelcard

    monkeypatch.setattr(modelcard, "base_model_licence", lambda name: None)
    card = modelcard.model_card(classifier_run(tmp_path / "run"))
    assert "# Text classifier fine-tuned from org/base-model" in card and "## Labels" in card
    assert 'clf = pipeline("text-classification", model="PATH/TO/THIS/FOLDER")\nclf("t0")\n' in card
    assert "function_to_apply" not in card and "regression" not in card
    assert table_rows(card, "accuracy") == [["accuracy", "0.5000", "0.5000"]]
