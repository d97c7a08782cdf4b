"""The run report, run comparison, model card, progress lines and --report-to, on the tiny model."""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import TRAIN_ARGS
from llmclf.cli import main
from llmclf.config import build_config, report_to_list
from llmclf.errors import LlmclfError
from llmclf.progress import Progress
from llmclf.reports import plots
from llmclf.reports import run_report as report

PNGS = [
    "confusion_before.png",
    "confusion_before_normalised.png",
    "confusion_after.png",
    "confusion_after_normalised.png",
    "training_curves.png",
    "calibration.png",
]


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text outside tags."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.open: list[str] = []
        self.mismatched: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if self.open and self.open[-1] == tag:
            self.open.pop()
        else:
            self.mismatched.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def parse(html_text: str) -> Tags:
    parser = Tags()
    parser.feed(html_text)
    parser.close()
    return parser


def copy_run(run: Path, dest: Path) -> Path:
    """The report's inputs only: the report reads nothing else."""
    dest.mkdir()
    for name in ("config.yaml", "labels.json", "run_info.json", "metrics.json", "data_summary.json"):
        shutil.copy(run / name, dest / name)
    shutil.copy(run / "predictions_test.csv", dest / "predictions_test.csv")
    return dest


@pytest.fixture(scope="module")
def second_run(tmp_path_factory, tiny_model_dir, small_csv) -> tuple[Path, str, str]:
    """A run that differs in lr and epochs, logs to TensorBoard and is not --quiet, with its output
    captured in (non-terminal) StringIO streams: (run folder, stdout, stderr)."""
    out = tmp_path_factory.mktemp("runs2") / "run-lr"
    args = list(TRAIN_ARGS)
    args[args.index("--lr") + 1] = "1e-3"
    args[args.index("--epochs") + 1] = "1"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(
            ["train", "--data", str(small_csv), "--model", str(tiny_model_dir), "--output", str(out), *args]
            + ["--report-to", "tensorboard"]
        )
    assert code == 0, stderr.getvalue()
    return out, stdout.getvalue(), stderr.getvalue()


# ------------------------------------------------------------------------------------ the report files
def test_report_has_every_section(trained_run):
    md = (trained_run / "report.md").read_text(encoding="utf-8")
    page = (trained_run / "report.html").read_text(encoding="utf-8")
    headings = [t for t, _ in parse(page).tags if t == "h2"]
    assert len(headings) == len(report.REPORT_SECTIONS)
    for section in report.REPORT_SECTIONS:
        assert f"\n## {section}\n" in md, section
        assert re.search(rf"<h2 id=\"[^\"]+\">{re.escape(section)}</h2>", page), section
    # the numbers of this run are in it: data counts, metrics, the config
    after = json.loads((trained_run / "metrics.json").read_text())["after"]
    assert f"{after['accuracy']:.4f}" in md and f"{after['macro_f1']:.4f}" in page
    assert "| Business | 20 | 5 | 10 | 0.2500 |" in md  # rows per split and class weight
    assert "train_per_class: 20" in md and "train_per_class: 20" in page


def test_html_is_self_contained(trained_run):
    page = (trained_run / "report.html").read_text(encoding="utf-8")
    parsed = parse(page)
    assert parsed.open == [] and parsed.mismatched == []  # well-formed: every element closed in order
    tags = parsed.tags
    images = [a for t, a in tags if t == "img"]
    assert len(images) == len(PNGS)
    for attrs in images:
        src = attrs["src"] or ""
        assert src.startswith("data:image/png;base64,")
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert Image.open(io.BytesIO(raw)).format == "PNG"
    assert not any(t in ("script", "link", "iframe", "object", "embed") for t, _ in tags)
    for tag, attrs in tags:
        for name in ("src", "href", "srcset", "action", "data"):
            if name not in attrs:
                continue
            value = (attrs[name] or "").strip().lower()
            assert not value.startswith(("http:", "https:", "//", "file:", "ftp:")), (tag, name, value)
            if name == "href":
                assert value.startswith("#"), value  # only links inside the page
    assert "url(" not in page.split("<body>")[0]  # no external fonts or images in the CSS


def test_pngs_are_real_images(trained_run):
    md = (trained_run / "report.md").read_text(encoding="utf-8")
    for name in PNGS:
        with Image.open(trained_run / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
        assert f"]({name})" in md  # the Markdown report shows the files beside it


# ------------------------------------------------------------------------------------ plotted values
def cell_texts(fig) -> dict[tuple[int, int], str]:
    ax = fig.axes[0]
    return {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}


def test_confusion_figures_show_the_runs_numbers(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    preds = pd.read_csv(trained_run / "predictions_test.csv", keep_default_na=False, dtype=str)
    labels = metrics["after"]["labels"]
    # independent: the after-training matrix from the predictions file (rows true, columns predicted)
    crosstab = pd.crosstab(preds["label"], preds["predicted"]).reindex(
        index=labels, columns=labels, fill_value=0
    )
    assert crosstab.to_numpy().tolist() == metrics["after"]["confusion_matrix"]
    for stage in ("before", "after"):
        matrix = np.array(metrics[stage]["confusion_matrix"])
        raw = plots.confusion_figure(matrix.tolist(), labels, normalise=False, title="t")
        assert np.array_equal(raw.axes[0].images[0].get_array(), matrix)
        texts = cell_texts(raw)
        for i in range(len(labels)):
            for j in range(len(labels)):
                assert texts[(i, j)] == str(matrix[i, j])  # row i = true label i, column j = predicted j
        assert [t.get_text() for t in raw.axes[0].get_yticklabels()] == labels
        norm = plots.confusion_figure(matrix.tolist(), labels, normalise=True, title="t")
        expected = matrix / matrix.sum(axis=1, keepdims=True)
        assert np.allclose(norm.axes[0].images[0].get_array(), expected)
        assert cell_texts(norm)[(0, 0)] == f"{expected[0, 0]:.2f}"


def test_training_curves_are_the_log_history(trained_run):
    log = json.loads((trained_run / "run_info.json").read_text())["log_history"]
    fig = plots.training_figure(log)
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    expected = {
        "training loss": [(e["step"], e["loss"]) for e in log if "loss" in e],
        "validation loss": [(e["step"], e["eval_loss"]) for e in log if "eval_loss" in e],
        "validation accuracy": [(e["step"], e["eval_accuracy"]) for e in log if "eval_accuracy" in e],
    }
    assert len(expected["training loss"]) >= 2 and len(expected["validation loss"]) == 2
    for label, points in expected.items():
        line = lines[label]
        assert list(line.get_xdata()) == [s for s, _ in points]
        assert list(line.get_ydata()) == pytest.approx([v for _, v in points])


def ece_by_hand(probs: np.ndarray, truth: np.ndarray, n_bins: int = 10) -> float:
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == truth
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (conf > lo) & (conf <= hi) if b else (conf >= lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return total


def test_ece_is_the_textbook_value(trained_run):
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    # bins: {0.9 right, 0.9 wrong}, {0.6 right}, {0.7 right}: 2/4*0.4 + 1/4*0.4 + 1/4*0.3
    assert plots.calibration(probs, np.array([0, 1, 0, 1])).ece == pytest.approx(0.375)
    preds = pd.read_csv(trained_run / "predictions_test.csv", keep_default_na=False, dtype={"label": str})
    labels = json.loads((trained_run / "labels.json").read_text())
    probs = preds[[f"prob_{lab}" for lab in labels]].to_numpy()
    truth = np.array([labels.index(lab) for lab in preds["label"]])
    cal = plots.calibration(probs, truth)
    assert cal.ece == pytest.approx(ece_by_hand(probs, truth))
    assert cal.counts.sum() == len(preds)
    md = (trained_run / "report.md").read_text(encoding="utf-8")
    assert f"test split after training): {cal.ece:.4f}." in md


# ------------------------------------------------------------------------------------ escaping, rebuild
def test_report_escapes_texts_and_rebuilds(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    preds = pd.read_csv(
        run / "predictions_test.csv", keep_default_na=False, dtype={"label": str, "predicted": str}
    )
    labels = json.loads((run / "labels.json").read_text())
    evil = '<script>alert("x")</script><img src=http://evil.example/a.png> | & more'
    # make row 0 a certain mistake, so it tops the confidently-wrong table
    wrong = next(lab for lab in labels if lab != preds.loc[0, "label"])
    preds.loc[0, "text"] = evil
    preds.loc[0, "predicted"] = wrong
    for lab in labels:
        preds.loc[0, f"prob_{lab}"] = 1.0 if lab == wrong else 0.0
    preds.to_csv(run / "predictions_test.csv", index=False)
    assert main(["--quiet", "report", str(run), "--top", "3"]) == 0
    page = (run / "report.html").read_text(encoding="utf-8")
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "<script" not in page and "evil.example/a.png>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert [t for t, _ in parse(page).tags].count("img") == len(PNGS)  # the text made no <img>
    assert "<script" not in md and "&lt;script&gt;" in md and "\\| &amp; more" in md
    assert report.confidently_wrong(report.read_run(run), 3).loc[0, "text"] == evil
    for name in PNGS:
        assert (run / name).is_file()


def test_report_of_an_incomplete_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("output: x\n")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "metrics.json" in err and "labels.json" in err


# ------------------------------------------------------------------------------------ compare
def test_compare_shows_config_differences_and_metrics(trained_run, second_run, tmp_path, capsys):
    run2 = second_run[0]
    out_md, out_csv = tmp_path / "cmp.md", tmp_path / "cmp.csv"
    assert main(["compare", str(trained_run), str(run2), "--output", str(out_md)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"train\.lr\s+0\.002\s+0\.001", printed), printed
    assert "train.report_to" in printed and "data.path" not in printed  # only what differs
    assert main(["--quiet", "compare", str(trained_run), str(run2), "--output", str(out_csv)]) == 0
    rows = {r[0]: r[1:] for r in csv.reader(out_csv.open(encoding="utf-8"))}
    assert rows["train.epochs"] == ["2.0", "1.0"]
    acc = [json.loads((r / "metrics.json").read_text())["after"]["accuracy"] for r in (trained_run, run2)]
    assert [float(x) for x in rows["accuracy after"]] == pytest.approx(acc)
    assert "| train.lr | 0.002 | 0.001 |" in out_md.read_text(encoding="utf-8")
    assert main(["compare", str(trained_run), str(run2), "--output", str(tmp_path / "x.txt")]) == 2


# ------------------------------------------------------------------------------------ progress, tensorboard
def test_progress_without_a_terminal_is_plain_lines(second_run):
    run, stdout, stderr = second_run
    assert "\r" not in stdout + stderr
    steps = [line for line in stderr.splitlines() if line.startswith("training: step")]
    assert steps and all("loss" in s and "rows/s" in s and "left" in s for s in steps)
    assert re.search(r"^evaluating after training: 40/40 texts \(100%\)", stderr, re.M)
    assert "validation at step" in stderr
    assert "Accuracy" not in stderr and "Run folder" in stdout  # results on stdout, progress on stderr
    assert (run / "report.html").is_file()


def test_progress_lines_unit():
    stream = io.StringIO()
    bar = Progress(3, "scoring", "row", progress=None, stream=stream, interval=0)
    for _ in range(3):
        bar.update()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("scoring: 3/3 rows (100%)")
    silent = io.StringIO()
    off = Progress(3, "x", progress=False, stream=silent, interval=0)
    off.update(3)
    assert silent.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    bar = Progress(3, "scoring", "row", progress=None, stream=terminal, interval=0)
    bar.update(3)
    bar.close()
    assert "\r" in terminal.getvalue()  # on a terminal: the redrawn tqdm bar


def test_tensorboard_event_file_holds_the_losses(second_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = second_run[0]
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events, list(run.iterdir())
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    log = json.loads((run / "run_info.json").read_text())["log_history"]
    assert logged == [(e["step"], pytest.approx(e["loss"], rel=1e-5)) for e in log if "loss" in e]


def test_report_to_is_validated():
    with pytest.raises(LlmclfError, match="tensorbored.*tensorboard"):
        build_config({"train": {"report_to": "tensorbored"}})
    assert report_to_list("none") == [] and report_to_list("tensorboard, wandb") == ["tensorboard", "wandb"]
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    absent = sorted(set(INTEGRATION_TO_CALLBACK) - set(get_available_reporting_integrations()))
    with pytest.raises(LlmclfError, match="not installed"):
        report_to_list(absent[0], require_installed=True)


# ------------------------------------------------------------------------------------ model card
def test_export_writes_a_model_card(trained_run, tiny_model_dir, tmp_path):
    out = tmp_path / "exported"
    assert main(["--quiet", "export", str(trained_run), "--output", str(out)]) == 0
    card = (out / "README.md").read_text(encoding="utf-8")
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for i, label in enumerate(json.loads((trained_run / "labels.json").read_text())):
        assert f"| {i} | {label} |" in card  # the labels table: output index, escaped label
    for heading in ("## Labels", "## Intended use", "## Limitations", "## Training data", "## Metrics"):
        assert heading in card
    assert f"| accuracy | {metrics['before']['accuracy']:.4f} | {metrics['after']['accuracy']:.4f} |" in card
    assert str(tiny_model_dir) in card
    assert "unknown — check the base model's licence" in card  # the tiny model declares none


def test_licence_is_read_from_the_base_model(tmp_path):
    from llmclf.reports.modelcard import base_model_licence

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# A model\n")
    assert base_model_licence(str(tmp_path)) == "mit"
    (tmp_path / "README.md").write_text("# no metadata\n")
    assert base_model_licence(str(tmp_path)) is None


@pytest.mark.slow
def test_default_model_licence_from_gguf_metadata():
    from llmclf.reports.modelcard import base_model_licence

    assert base_model_licence("smollm2-135m") == "apache-2.0"
