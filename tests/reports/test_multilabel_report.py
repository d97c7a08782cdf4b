"""The reports of a multi-label run (task: multi-label), on run folders written by hand as the pipeline
writes them: the report (micro and macro F1, subset accuracy and Hamming loss before and after, per
label with its threshold, the label co-occurrence, the texts with the most wrong labels, the labels per
split), the terminal tables, `llmclf compare` and the model card. The other tasks' reports stay as they
were (tests/reports/test_regression_report.py and the rest)."""

from __future__ import annotations

import ast
import json
import re
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from test_regression_report import classifier_run, regression_run  # tests/reports is on the path

from llmclf.errors import LlmclfError
from llmclf.reports import console, multilabel, plots
from llmclf.reports import run_report as report

LABELS = ["sports", "politics", "tech"]
HOSTILE = "<script>alert(1)</script> # storm *now*"
TEXTS = [
    "match report",
    "election tech",
    HOSTILE,
    "chip news",
    "olympic vote",
    "robot football",
    "budget",
    "e-vote",
]
TRUE = [
    ("sports",),
    ("politics", "tech"),
    ("sports", "politics"),
    ("tech",),
    ("sports", "politics"),
    ("sports", "tech"),
    ("politics",),
    ("politics", "tech"),
]
PREDICTED = [
    ("sports",),
    ("politics",),
    ("tech",),
    (),  # no label reached its threshold: an empty cell
    ("sports", "politics"),
    ("sports", "politics", "tech"),
    ("sports",),
    ("tech",),
]
# label errors per text: 0, 1, 3, 1, 0, 1, 2, 1 -> most first, ties in file order
BY_ERRORS = [2, 6, 1, 3, 5, 7]
THRESHOLDS = {"sports": 0.45, "politics": 0.5, "tech": 0.62}
PER_LABEL = {  # of TRUE against PREDICTED (sklearn's precision_recall_fscore_support)
    "sports": {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4},
    "politics": {"precision": 2 / 3, "recall": 0.4, "f1": 0.5, "support": 5},
    "tech": {"precision": 2 / 3, "recall": 0.5, "f1": 4 / 7, "support": 4},
}
AFTER = {
    "n": 8,
    "micro_f1": 0.6086956521739131,
    "macro_f1": 0.6071428571428571,
    "subset_accuracy": 0.25,
    "hamming_loss": 0.375,
    "per_label": PER_LABEL,
    "labels": LABELS,
}
BEFORE = {
    "n": 8,
    "micro_f1": 0.3,
    "macro_f1": 0.25,
    "subset_accuracy": 0.0,
    "hamming_loss": 0.5,
    "per_label": {
        label: {"precision": 0.2, "recall": 0.2, "f1": f1, "support": 4}
        for label, f1 in zip(LABELS, (0.2, 0.3, 0.4))
    },
    "labels": LABELS,
}
LOG = [
    {"loss": 0.7, "step": 2, "epoch": 0.5},
    {"loss": 0.4, "step": 4, "epoch": 1.0},
    {"eval_loss": 0.45, "eval_micro_f1": 0.55, "eval_macro_f1": 0.5, "step": 4, "epoch": 1.0},
    {"train_runtime": 3.0, "train_loss": 0.55, "epoch": 1.0, "step": 4},
]
CONFIG = (
    "task: multi-label\nmodel:\n  name: org/base-model\ndata:\n  path: news.csv\n  label_column: topics\n"
    "  label_separator: ','\n"
)


def multilabel_run(
    path: Path,
    *,
    true=TRUE,
    predicted=PREDICTED,
    texts=TEXTS,
    labels=LABELS,
    separator=",",
    pairs=None,
    **edits,
) -> Path:
    """A multi-label run folder with exactly the files the pipeline writes; `labels` renames LABELS
    (same order) everywhere; `edits` replace whole files' contents (metrics, run_info, summary, config)."""
    path.mkdir(parents=True)
    name = dict(zip(LABELS, labels))
    info = {
        "base_model": "org/base-model",
        "task": "multi-label",
        "target_scale": None,
        "thresholds": {name[k]: v for k, v in THRESHOLDS.items()},
        "label_separator": separator,
        "probe": {"train_micro_f1": 0.91, "test_micro_f1": 0.58},
        "lexical": None,
        "before_training": "random head",
        "log_history": LOG,
        "train_runtime_s": 3.0,
        "train_loss": 0.55,
        "llmclf_version": "9.9",
        "torch_version": "2.x",
    }
    counts = {
        "train": {"sports": 30, "politics": 25, "tech": 20},
        "val": {"sports": 6, "politics": 5, "tech": 4},
        "test": {"sports": 4, "politics": 5, "tech": 4},
    }
    summary = {
        "source": "news.csv",
        "counts": {split: {name[k]: v for k, v in c.items()} for split, c in counts.items()},
        "rows": {"train": 50, "val": 10, "test": len(true)},
        "class_weights": None,
        "pos_weights": {name["sports"]: 0.6667, name["politics"]: 1.0, name["tech"]: 1.5},
        "truncated": {"train": 2, "val": 0, "test": 0},
        "max_length": 64,
        "notes": [],
    }
    rename = lambda metrics: {  # noqa: E731
        stage: {**m, "per_label": {name[k]: v for k, v in m["per_label"].items()}, "labels": labels}
        for stage, m in metrics.items()
    }
    files = {
        "labels.json": labels,
        "metrics.json": edits.get("metrics", rename({"before": BEFORE, "after": AFTER})),
        "run_info.json": edits.get("run_info", info),
        "data_summary.json": edits.get("summary", summary),
    }
    for file, data in files.items():
        (path / file).write_text(json.dumps(data), encoding="utf-8")
    config = CONFIG.replace("','", json.dumps(separator))
    (path / "config.yaml").write_text(edits.get("config", config), encoding="utf-8")
    join = lambda sets: [separator.join(sorted(name[x] for x in s)) for s in sets]  # noqa: E731 as the pipeline
    frame = pd.DataFrame({"text": texts[: len(true)], "label": join(true), "predicted": join(predicted)})
    if pairs is not None:
        frame.insert(1, "pair", pairs)
    for i, label in enumerate(LABELS):  # independent sigmoid probabilities
        frame[f"prob_{name[label]}"] = [0.9 if label in s else 0.1 + 0.05 * i for s in predicted]
    frame.to_csv(path / "predictions_test.csv", index=False, lineterminator="\r\n")
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


def pair_counts(sets: list[tuple[str, ...]]) -> dict[tuple[str, str], int]:
    """Texts carrying both labels of each pair, counted text by text (not through the report's code)."""
    counts = {pair: 0 for pair in combinations(LABELS, 2)}
    for names in sets:
        for pair in combinations(LABELS, 2):
            counts[pair] += all(x in names for x in pair)
    return counts


# ------------------------------------------------------------------------------------ the report
def test_the_report_has_the_multilabel_sections_and_metrics(tmp_path):
    md, page = built(multilabel_run(tmp_path / "run"))
    assert [line[3:] for line in md.splitlines() if line.startswith("## ")] == list(multilabel.SECTIONS)
    metrics = section(md, "Metrics")
    assert table_rows(metrics, "micro F1") == [["micro F1", "0.6087", "0.3000", "+0.3087"]]
    assert table_rows(metrics, "macro F1") == [["macro F1", "0.6071", "0.2500", "+0.3571"]]
    assert table_rows(metrics, "subset accuracy") == [["subset accuracy", "0.2500", "0.0000", "+0.2500"]]
    assert table_rows(metrics, "Hamming loss (lower is better)") == [
        ["Hamming loss (lower is better)", "0.3750", "0.5000", "-0.1250"]
    ]
    assert table_rows(metrics, "test texts") == [["test texts", "8", "8", ""]]
    assert "On the test split (8 texts, 3 labels each)." in metrics
    assert "linear-probe heads (train.head\\_init: probe)" in metrics
    assert "(training micro-F1 0.9100, test micro-F1 0.5800)" in metrics
    summary = section(md, "Summary")
    assert table_rows(summary, "test micro F1, before → after training") == [
        ["test micro F1, before → after training", "0.3000 → 0.6087"]
    ]
    assert table_rows(summary, "test Hamming loss (lower is better), before → after training") == [
        ["test Hamming loss (lower is better), before → after training", "0.5000 → 0.3750"]
    ]
    assert "multi-label: 3 labels, each decided on its own" in summary
    text = re.sub(r"data:image/png;base64,[^\"]+", "", page)  # the page without its images' bytes
    for gone in ("Per class", "Confusion", "Calibration", "confidently wrong", "ECE", "balanced accuracy"):
        assert gone not in md and gone not in text, gone


def test_the_verdict_counts_the_texts_and_decisions(tmp_path):
    md, page = built(multilabel_run(tmp_path / "run"))
    verdict = md.splitlines()[2]
    assert verdict.startswith(
        "Verdict: test micro-F1 0.6087 after training (macro-F1 0.6071, subset accuracy 0.2500, "
        "Hamming loss 0.3750); before training (random head): micro-F1 0.3000, Hamming loss 0.5000; "
        "the linear-probe heads alone (before fine-tuning): micro-F1 0.5800;"
    )
    positives = sum(len(s) for s in TRUE) / (len(TRUE) * len(LABELS))  # predicting no label: each one wrong
    assert f"predicting no label at all: Hamming loss {positives:.4f};" in verdict
    assert verdict.endswith("2 of 8 test texts with every label right, 9 wrong label decisions out of 24.")
    assert '<p class="verdict">Verdict: test micro-F1 0.6087' in page


def test_per_label_rows_hold_the_thresholds(tmp_path):
    md, _ = built(multilabel_run(tmp_path / "run"))
    per_label = section(md, "Per label")
    assert table_rows(per_label, "label") == [
        ["label", "precision", "recall", "F1", "F1 before", "support", "threshold"]
    ]
    assert table_rows(per_label, "sports") == [
        ["sports", "0.7500", "0.7500", "0.7500", "0.2000", "4", "0.4500"]
    ]
    assert table_rows(per_label, "politics") == [
        ["politics", "0.6667", "0.4000", "0.5000", "0.3000", "5", "0.5000"]
    ]
    assert table_rows(per_label, "tech") == [["tech", "0.6667", "0.5000", "0.5714", "0.4000", "4", "0.6200"]]


def test_the_data_section_counts_texts_per_label_and_split(tmp_path):
    md, _ = built(multilabel_run(tmp_path / "run"))
    data = section(md, "Data")
    assert table_rows(data, "label") == [["label", "train", "val", "test", "positive weight"]]
    assert table_rows(data, "sports") == [["sports", "30", "6", "4", "0.6667"]]
    assert table_rows(data, "tech") == [["tech", "20", "4", "4", "1.5000"]]
    assert table_rows(data, "texts") == [["texts", "50", "10", "8", ""]]
    assert table_rows(data, "labels per text") == [["labels per text", "1.5000", "1.5000", "1.6250", ""]]
    assert "Texts truncated to 64 tokens: train 2, val 0, test 0." in data
    assert "total" not in data  # label counts do not add up to texts


def test_the_cooccurrence_counts_label_pairs_of_the_test_split(tmp_path):
    path = multilabel_run(tmp_path / "run")
    md, page = built(path)
    true, predicted = pair_counts(TRUE), pair_counts(PREDICTED)
    assert true == {("sports", "politics"): 2, ("sports", "tech"): 1, ("politics", "tech"): 2}
    part = section(md, "Label co-occurrence")
    rows = [row for i, j in combinations(LABELS, 2) for row in table_rows(part, f"{i} + {j}")]
    # most often together first (then most often predicted together, then labels.json's order)
    assert rows == [
        ["sports + politics", str(true[("sports", "politics")]), str(predicted[("sports", "politics")])],
        ["sports + tech", "1", "1"],
        ["politics + tech", "2", "1"],
    ]
    order = [
        line.split(" | ")[0][2:] for line in part.splitlines() if " + " in line and line.startswith("| ")
    ]
    assert order == ["sports + politics", "politics + tech", "sports + tech"]
    run = report.read_run(path)
    hot = multilabel.multi_hot(run.predictions["label"], LABELS)
    matrix = multilabel.cooccurrence(hot)
    for (a, b), count in true.items():
        assert matrix[LABELS.index(a), LABELS.index(b)] == matrix[LABELS.index(b), LABELS.index(a)] == count
    assert np.diag(matrix).tolist() == [sum(x in s for s in TRUE) for x in LABELS]  # each label's texts
    fig = plots.cooccurrence_figure(matrix, LABELS, "True labels (test)")
    assert fig.axes[0].images[0].get_array().tolist() == matrix.tolist()
    assert sorted(t.get_text() for t in fig.axes[0].texts) == sorted(str(v) for v in matrix.ravel())
    for name in (multilabel.TRUE_PNG, multilabel.PREDICTED_PNG, "training_curves.png"):
        with Image.open(path / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 200
        assert f"]({name})" in md
    assert not any((path / name).exists() for name in ("confusion_after.png", "calibration.png"))
    assert page.count('<img alt="') == 3 and page.count("data:image/png;base64,") == 3


def test_the_most_wrong_texts_come_first_and_are_escaped(tmp_path):
    md, page = built(multilabel_run(tmp_path / "run"))
    part = section(md, "Most wrong")
    rows = [table_rows(part, str(rank))[0] for rank in range(1, len(BY_ERRORS) + 1)]
    assert not table_rows(part, str(len(BY_ERRORS) + 1))  # the texts with every label right left out
    assert [row[1] for row in rows[1:]] == [TEXTS[i] for i in BY_ERRORS[1:]]
    assert rows[0] == [
        "1",
        r"&lt;script&gt;alert(1)&lt;/script&gt; \# storm \*now\*",  # Markdown: literal text
        "sports, politics",
        "tech",
        "sports, politics",
        "tech",
        "3",
    ]
    assert rows[1][2:] == ["politics", "sports", "politics", "sports", "2"]
    assert rows[2][2:] == ["politics, tech", "politics", "tech", "", "1"]  # labels.json's order
    assert rows[3][2:] == ["tech", "(none)", "tech", "", "1"]  # the empty cell: no label predicted
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; # storm *now*" in page


def test_training_curves_show_the_validation_f1(tmp_path):
    fig = plots.training_figure(LOG, multilabel=True)
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    assert list(lines["validation micro F1"].get_ydata()) == [0.55]
    assert list(lines["validation macro F1"].get_ydata()) == [0.5]
    assert list(lines["training loss"].get_ydata()) == [0.7, 0.4]
    assert "validation accuracy" not in lines
    md, _ = built(multilabel_run(tmp_path / "run"))
    curves = section(md, "Training curves")
    assert "validation micro and macro F1" in curves
    assert table_rows(curves, "step") == [
        ["step", "epoch", "validation loss", "validation micro F1", "validation macro F1"]
    ]
    assert table_rows(curves, "4") == [["4", "1.00", "0.4500", "0.5500", "0.5000"]]


def test_hostile_labels_and_another_separator(tmp_path):
    labels = ["<b>sport</b>", "a|b", "[x](http://evil)"]
    pairs = [f"second {i}" for i in range(8)]
    path = multilabel_run(tmp_path / "run", labels=labels, separator=";", pairs=pairs)
    md, page = built(path)
    assert table_rows(section(md, "Per label"), r"&lt;b&gt;sport&lt;/b&gt;")[0][-1] == "0.4500"
    assert table_rows(section(md, "Per label"), r"a\|b")[0][-1] == "0.5000"
    assert r"\[x\](http\://evil)" in md and "](http://evil)" not in md
    assert "<b>sport</b>" not in page and "&lt;b&gt;sport&lt;/b&gt;" in page
    wrong = table_rows(section(md, "Most wrong"), "1")[0]
    assert wrong[1].endswith(" / second 2")  # a text pair as its two texts
    assert wrong[2] == r"&lt;b&gt;sport&lt;/b&gt; ; a\|b"  # joined by the run's separator
    assert table_rows(section(md, "Summary"), r"labels joined by (data.label\_separator)") == [
        [r"labels joined by (data.label\_separator)", "';'"]
    ]


def test_bad_files_are_errors_naming_them(tmp_path):
    path = multilabel_run(tmp_path / "a")
    frame = pd.read_csv(path / "predictions_test.csv", keep_default_na=False)
    frame.loc[2, "predicted"] = "tech,chess"
    frame.to_csv(path / "predictions_test.csv", index=False)
    with pytest.raises(LlmclfError, match=r"predictions_test.csv \(predicted\), row 4: 'chess' is not one"):
        report.build_report(path)
    stage = {"accuracy": 0.5, "n": 8}
    path = multilabel_run(tmp_path / "b", metrics={"before": stage, "after": stage})
    with pytest.raises(LlmclfError, match="metrics.json holds no multi-label metrics"):
        report.build_report(path)
    path = multilabel_run(tmp_path / "c", config=CONFIG.replace("','", "' '"))
    with pytest.raises(LlmclfError, match="data.label_separator is ' '"):
        report.build_report(path)


def test_a_missing_predictions_file_still_makes_a_report(tmp_path):
    path = multilabel_run(tmp_path / "run")
    (path / "predictions_test.csv").unlink()
    md, _ = built(path)
    assert r"predictions\_test.csv is missing: no label co-occurrence." in md
    assert r"predictions\_test.csv is missing: no errors to list." in md
    assert "predicting no label" not in md.splitlines()[2]
    assert not (path / multilabel.TRUE_PNG).exists()


def test_the_other_tasks_keep_their_reports(tmp_path):
    md, _ = built(classifier_run(tmp_path / "single"))
    assert [line[3:] for line in md.splitlines() if line.startswith("## ")] == list(report.REPORT_SECTIONS)
    md, _ = built(regression_run(tmp_path / "regression"))
    assert "co-occurrence" not in md and "micro" not in md


# ------------------------------------------------------------------------------------ the terminal
def test_the_terminal_prints_the_multilabel_metrics():
    text = console.compare(BEFORE, AFTER)
    lines = [line.split("  ") for line in console.compare(BEFORE, AFTER).splitlines()]
    cells = [[c.strip() for c in line if c.strip()] for line in lines]
    assert cells[0] == ["Test metrics"] and cells[1] == ["metric", "before", "after", "change"]
    assert cells[3] == ["micro F1", "0.3000", "0.6087", "+0.3087"]
    assert cells[4] == ["macro F1", "0.2500", "0.6071", "+0.3571"]
    assert cells[5] == ["subset accuracy", "0.0000", "0.2500", "+0.2500"]
    assert cells[6] == ["Hamming loss (lower is better)", "0.5000", "0.3750", "-0.1250"]
    assert "accuracy" not in text.replace("subset accuracy", "")
    alone = console.compare(None, AFTER).splitlines()
    assert alone[1].split() == ["metric", "value"] and alone[3].split() == ["micro", "F1", "0.6087"]
    full = console.full_report(BEFORE, AFTER, THRESHOLDS)
    assert full.startswith(text + "\n\nPer label (after)\n")
    per_label = [line.split() for line in full.split("Per label (after)\n")[1].splitlines()]
    assert per_label[0] == ["label", "precision", "recall", "F1", "support", "threshold"]
    assert per_label[2] == ["sports", "0.7500", "0.7500", "0.7500", "4", "0.4500"]
    assert per_label[4] == ["tech", "0.6667", "0.5000", "0.5714", "4", "0.6200"]
    assert "Confusion" not in full
    without = console.full_report(None, AFTER)
    assert "threshold" not in without and "Per label (after)" in without
    assert console.probe_line({"train_micro_f1": 0.91, "test_micro_f1": 0.58}) == (
        "Head initialised from a linear probe on the frozen model's features: training micro F1 0.9100, "
        "test micro F1 0.5800."
    )


# ------------------------------------------------------------------------------------ compare
def test_compare_sets_multilabel_runs_side_by_side(tmp_path):
    from llmclf.reports.compare import compare_runs

    first = multilabel_run(tmp_path / "first")
    better = {**AFTER, "micro_f1": 0.7, "hamming_loss": 0.25}
    second = multilabel_run(tmp_path / "second", metrics={"before": BEFORE, "after": better})
    headers, rows, warnings = compare_runs([first, second])
    assert headers == ["", "first", "second"]
    table = {row[0]: row[1:] for row in rows}
    assert table["micro F1 before"] == [0.3, 0.3]
    assert table["micro F1 after"] == [AFTER["micro_f1"], 0.7]
    assert table["macro F1 after"] == [AFTER["macro_f1"]] * 2
    assert table["subset accuracy after"] == [0.25, 0.25]
    assert table["Hamming loss after (lower is better)"] == [0.375, 0.25]
    assert table["test examples"] == [8, 8]
    assert not any(key.startswith(("accuracy", "ECE", "MSE")) for key in table)
    assert warnings == []


@pytest.mark.parametrize("other", ["single-label", "regression"])
def test_compare_refuses_runs_of_different_tasks(tmp_path, other):
    from llmclf.reports.compare import compare_runs

    make = classifier_run if other == "single-label" else regression_run
    runs = [multilabel_run(tmp_path / "tags"), make(tmp_path / "other")]
    with pytest.raises(LlmclfError, match=rf"different tasks \(tags: multi-label; other: {other}\)"):
        compare_runs(runs)


# ------------------------------------------------------------------------------------ the model card
def test_the_model_card_describes_a_multilabel_model(tmp_path, monkeypatch):
    from llmclf.reports import modelcard

    monkeypatch.setattr(modelcard, "base_model_licence", lambda name: "apache-2.0")
    card = modelcard.model_card(multilabel_run(tmp_path / "run"), repo_id="me/news")
    head, body = card[4:].split("\n---\n", 1)
    front = yaml.safe_load(head)
    assert "multi-label" in front["tags"]
    results = {m["name"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert results == {
        "micro F1": AFTER["micro_f1"],
        "macro F1": AFTER["macro_f1"],
        "subset accuracy": 0.25,
        "Hamming loss": 0.375,
    }
    assert body.lstrip().startswith("# Multi-label text classifier fine-tuned from org/base-model")
    assert "Each label is decided independently" in body and "sigmoid" in body
    assert table_rows(body, "0") == [["0", "sports", "0.4500"]]  # id, label, threshold
    assert table_rows(body, "2") == [["2", "tech", "0.6200"]]
    assert table_rows(body, "micro F1") == [["micro F1", "0.3000", "0.6087"]]
    assert table_rows(body, "Hamming loss (lower is better)") == [
        ["Hamming loss (lower is better)", "0.5000", "0.3750"]
    ]
    assert ["politics", "0.6667", "0.4000", "0.5000", "5", "0.5000"] in table_rows(body, "politics")
    assert table_rows(body, "sports")[0] == ["sports", "30", "6", "4", "0.6667"]  # training data first
    code = body.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'clf = pipeline("text-classification", model="me/news")' in code
    assert 'scores = clf("match report", top_k=None, function_to_apply="sigmoid")' in code
    assert 'thresholds = {"sports": 0.45, "politics": 0.5, "tech": 0.62}' in code
    assert 'labels = [s["label"] for s in scores if s["score"] >= thresholds[s["label"]]]' in code
    ast.parse(code)  # valid Python
    namespace = {
        "pipeline": lambda *a, **k: (
            lambda text, **kw: [
                {"label": "tech", "score": 0.7},
                {"label": "sports", "score": 0.44},
                {"label": "politics", "score": 0.5},
            ]
        )
    }
    exec(code.replace("from transformers import pipeline", ""), namespace)  # noqa: S102 the card's own code
    assert namespace["labels"] == ["tech", "politics"]  # each score against its own label's threshold
    for gone in ('function_to_apply="none"', "## Labels\n", "every text gets one of them"):
        assert gone not in body, gone


def test_a_hostile_label_stays_text_in_the_card_and_its_code(tmp_path, monkeypatch):
    from llmclf.reports import modelcard

    monkeypatch.setattr(modelcard, "base_model_licence", lambda name: None)
    labels = ['x"); import os #', "a|b", "[x](http://evil)"]
    card = modelcard.model_card(multilabel_run(tmp_path / "run", labels=labels))
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    tree = ast.parse(code)
    assert not any(
        isinstance(node, ast.Import | ast.ImportFrom) and node.names[0].name == "os"
        for node in ast.walk(tree)
    )
    assert json.dumps({labels[0]: 0.45, labels[1]: 0.5, labels[2]: 0.62}) in code
    assert "](http://evil)" not in card.split("```python", 1)[0]
