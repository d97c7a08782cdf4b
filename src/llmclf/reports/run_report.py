"""The run report: `report.md` and a self-contained `report.html` (plots inlined), built from the run folder.

Reads only the files a finished run wrote (metrics.json, data_summary.json, run_info.json,
predictions_test.csv, config.yaml, labels.json), so `llmclf report RUN_DIR` rebuilds it at any time
without the model. The report is assembled once as a list of blocks (heading, paragraph, table, image,
preformatted text) and rendered twice, so the Markdown and HTML versions always hold the same content.
A regression run (`task: regression` in config.yaml) has sections of its own (regression.SECTIONS),
built by regression.py: its errors and correlations, predicted against true values, the largest errors.
So has a multi-label run (`task: multi-label`, multilabel.SECTIONS, built by multilabel.py): micro and
macro F1, subset accuracy and Hamming loss, per label with its threshold, the label co-occurrence, the
texts with the most wrong labels.

A run folder is shared data: every value from it is escaped in both renderings (`md_text` here is the
one Markdown escaper, the model card uses it too), reads never leave the folder and writes never go
through a link (`RunFolder`), and a malformed file is an error naming it, not a traceback.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llmclf.config import REGRESSION, SINGLE_LABEL, parse_yaml
from llmclf.errors import LlmclfError
from llmclf.reports import html_page, multilabel, plots, regression, stages
from llmclf.reports.blocks import HALF_MAX, Block, cell, data_notes, shorten
from llmclf.reports.console import one_line
from llmclf.runfolder import (
    CONFIG,
    DATA_SUMMARY,
    LABELS,
    METRICS,
    PREDICTIONS,
    RUN_INFO,
    RunFolder,
    prob_column,
)

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
CONFUSION_PNG = "confusion_{stage}{suffix}.png"
TRAINING_PNG = "training_curves.png"
CALIBRATION_PNG = "calibration.png"
REPORT_SECTIONS = (
    "Summary",
    "Data",
    "Metrics",
    "Per class",
    "Confusion matrices",
    "Training curves",
    "Calibration",
    "Most confidently wrong",
    "Configuration",
)
CONFIG_VALUES = 100_000  # YAML aliases can make a small config.yaml expand to billions of values


# ------------------------------------------------------------------------------------ reading the run
@dataclass
class RunFiles:
    """What a run folder holds, read once; optional files are None when absent."""

    path: Path
    folder: RunFolder
    labels: list[str]
    config_text: str
    config: dict
    metrics: dict
    run_info: dict = field(default_factory=dict)
    summary: dict | None = None
    predictions: pd.DataFrame | None = None  # regression: label, score as floats; multi-label: label sets
    task: str = SINGLE_LABEL
    label_separator: str = multilabel.DEFAULT_SEPARATOR  # what joins a multi-label run's labels in the CSV

    @property
    def regression(self) -> bool:
        return self.task == REGRESSION

    @property
    def multilabel(self) -> bool:
        return self.task == multilabel.MULTI_LABEL


def read_run(run_dir: str | Path) -> RunFiles:
    """The report's inputs, or an error naming the missing or malformed file; every read confined to
    the folder (a link leading out of it is refused)."""
    run = RunFolder.open(run_dir, needed=(CONFIG, LABELS, METRICS), purpose="the report")
    config_text = _read(run, CONFIG, run.read_text)
    config = parse_yaml(config_text, run.path(CONFIG))
    _limit_values(config, run.path(CONFIG))
    metrics = _read(run, METRICS, run.read_json, dict)
    if not isinstance(metrics.get("after"), dict):
        raise LlmclfError(
            f"{run.path(METRICS)} has no 'after' metrics: it is not a metrics.json llmclf wrote. Evaluate "
            "or train the run again."
        )
    run_info = _read(run, RUN_INFO, lambda _: run.run_info(), dict)
    task = regression.task_of(config, run_info)
    labels = _read(run, LABELS, lambda _: run.labels(), list)  # checked: distinct non-empty names
    predictions = _read(run, PREDICTIONS, lambda _: run.predictions())
    separator = multilabel.DEFAULT_SEPARATOR
    if task == REGRESSION:
        regression.check_metrics(metrics, run.path(METRICS))
        predictions = regression.numeric_predictions(predictions, run.path(PREDICTIONS))
    elif task == multilabel.MULTI_LABEL:
        multilabel.check_metrics(metrics, run.path(METRICS))
        separator = multilabel.label_separator(config, run_info, run.path(CONFIG))
        predictions = multilabel.label_sets(predictions, labels, separator, run.path(PREDICTIONS))
    return RunFiles(
        path=run.root,
        folder=run,
        labels=labels,
        config_text=config_text,
        config=config,
        metrics=metrics,
        run_info=run_info,
        summary=_read(run, DATA_SUMMARY, run.optional_json, (dict, type(None))),
        predictions=predictions,
        task=task,
        label_separator=separator,
    )


def _read(run: RunFolder, name: str, reader: Any, kind: Any = object) -> Any:
    """`reader(name)`; an unreadable or malformed file (not UTF-8, not JSON, a folder) is an error."""
    try:
        value = reader(name)
    except (OSError, ValueError, TypeError) as exc:  # JSON, UTF-8 and CSV errors are ValueErrors
        raise LlmclfError(
            f"{run.root / name} could not be read: {one_line(str(exc))[:300]}. Is this a run folder "
            "written by `llmclf train`? Train or evaluate the run again."
        ) from None
    if not isinstance(value, kind):
        raise LlmclfError(
            f"{run.root / name} holds a JSON {type(value).__name__}, not what llmclf writes there. Is this "
            "a run folder written by `llmclf train`? Train or evaluate the run again."
        )
    return value


def _limit_values(value: Any, source: Path) -> None:
    """Refuse a config that expands (through YAML aliases) to more values than any real config."""
    stack, seen = [value], 1
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            children = [*item.keys(), *item.values()]
        elif isinstance(item, list | tuple | set | frozenset):  # safe_load makes all four
            children = list(item)
        else:
            continue
        seen += len(children)
        if seen > CONFIG_VALUES:
            raise LlmclfError(
                f"{source} expands to more than {CONFIG_VALUES} values (YAML aliases?): llmclf writes no "
                "such config. Refused; train the run again or fix the file."
            )
        stack.extend(children)


def base_model_name(run: RunFiles) -> str:
    """The base model as run_info.json resolved it, else as config.yaml names it."""
    model = run.config.get("model")
    name = model.get("name", "unknown") if isinstance(model, dict) else "unknown"
    return str(run.run_info.get("base_model") or name)


def prediction_probabilities(run: RunFiles) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities in label order, true label ids) from predictions_test.csv."""
    assert run.predictions is not None
    probs = run.predictions[[prob_column(label) for label in run.labels]].to_numpy(dtype=float)
    index = {label: i for i, label in enumerate(run.labels)}
    return probs, np.array([index[label] for label in run.predictions["label"]])


def confidently_wrong(run: RunFiles, top: int = 10) -> pd.DataFrame:
    """Wrong test predictions, most confident first: text, true, predicted, confidence."""
    if run.predictions is None:
        return pd.DataFrame(columns=["text", "label", "predicted", "confidence"])
    probs, _ = prediction_probabilities(run)
    frame = run.predictions[["text", "label", "predicted"]].copy()
    if "pair" in run.predictions:  # a text pair, shown as its two texts
        frame["text"] = frame["text"].astype(str) + " / " + run.predictions["pair"].astype(str)
    frame["confidence"] = probs.max(axis=1)
    wrong = frame[frame["label"] != frame["predicted"]]
    return wrong.sort_values("confidence", ascending=False, kind="stable").head(top).reset_index(drop=True)


# ------------------------------------------------------------------------------------ blocks
def _data_blocks(run: RunFiles) -> list[Block]:
    s = run.summary
    if s is None:
        return [Block("para", "data_summary.json is missing from this run folder.")]
    counts, weights = s.get("counts", {}), s.get("class_weights") or {}
    splits = [name for name in ("train", "val", "test") if name in counts]
    headers = ["class", *splits] + (["class weight"] if weights else [])
    rows: list[list[Any]] = []
    for label in run.labels:
        rows.append(
            [label, *[counts[x].get(label, 0) for x in splits]] + ([weights.get(label)] if weights else [])
        )
    rows.append(
        ["total", *[sum(counts[x].values()) for x in splits]] + ([sum(weights.values())] if weights else [])
    )
    blocks = [
        Block(
            "para",
            f"Source: {s.get('source')}. Rows per split and class"
            + (" and the class weights used in the loss." if weights else " (no class weights)."),
        ),
        Block("table", headers=headers, rows=rows),
    ]
    return blocks + data_notes(s)


def _metric_blocks(run: RunFiles) -> list[Block]:
    """The after-training metrics beside the baseline's, then what each stage of the run scored."""
    before, after = run.metrics.get("before"), run.metrics["after"]
    names = (("accuracy", "accuracy"), ("balanced accuracy", "balanced_accuracy"), ("macro F1", "macro_f1"))
    if before:
        rows = [[n, after[k], before[k], f"{after[k] - before[k]:+.4f}"] for n, k in names]
        headers = ["metric", "after training", "before training (baseline)", "change"]
    else:
        rows, headers = [[n, after[k]] for n, k in names], ["metric", "after training"]
    rows.append(
        ["test texts", after.get("n"), *([before.get("n")] if before else []), *([""] if before else [])]
    )
    info, config = run.run_info, run.config
    return [
        Block("para", stages.metrics_caption(run.metrics, info, config)),
        Block("table", headers=headers, rows=rows),
        Block("para", "What each stage of the run scores on the test split, in the order they ran:"),
        Block(
            "table",
            headers=["stage", "test accuracy", "test macro F1", "accuracy change"],
            rows=stages.stage_rows(run.metrics, info, config),
        ),
    ]


def _fraction(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1
    return float(value) if ok else None


def classifier_parts(info: dict) -> list[list[Any]]:
    """Test accuracy of the probe head (before fine-tuning), of the fine-tuned model alone, of the
    lexical part alone and of their mix, as far as run_info.json records them (numbers only)."""
    probe = info.get("probe") if isinstance(info.get("probe"), dict) else {}
    lexical = info.get("lexical") if isinstance(info.get("lexical"), dict) else {}
    tested = lexical.get("test_accuracy") if isinstance(lexical.get("test_accuracy"), dict) else {}
    weight = _fraction(lexical.get("weight"))
    rows = [
        ["linear-probe head, before fine-tuning", _fraction(probe.get("test_accuracy"))],
        ["fine-tuned model alone (what `llmclf export` writes)", _fraction(tested.get("model"))],
        ["TF-IDF + logistic regression alone", _fraction(tested.get("lexical"))],
        [f"the two mixed (TF-IDF weight {weight:.1f})", _fraction(tested.get("mixed"))]
        if weight is not None
        else ["", None],
    ]
    return [row for row in rows if row[1] is not None]


def _per_class_blocks(run: RunFiles) -> list[Block]:
    before, after = run.metrics.get("before") or {}, run.metrics["after"]
    rows = []
    for label, m in after["per_class"].items():
        f1_before = before.get("per_class", {}).get(label, {}).get("f1")
        rows.append([label, m["precision"], m["recall"], m["f1"], f1_before, m["support"]])
    return [Block("table", headers=["class", "precision", "recall", "F1", "F1 before", "support"], rows=rows)]


def _confusion_caption(key: str, classes: int) -> str:
    """'confusion_after_normalised' -> 'Confusion matrix after training, row-normalised'."""
    parts = key.split("_")
    stage = "after training" if parts[1] == "after" else "before training (the baseline)"
    caption = f"Confusion matrix {stage}, " + ("row-normalised" if "normalised" in parts else "counts")
    if classes > plots.ANNOTATE_MAX:
        caption += f" ({classes} classes: cell values and class names left out; they are in metrics.json)"
    return caption


def _confusion_note(classes: int) -> str:
    note = (
        "After training first, then before (the baseline). Rows: true label; columns: predicted. Counts, "
        "and each row divided by its total."
    )
    if classes > plots.ANNOTATE_MAX:
        note += (
            f" With {classes} classes the cells carry no values and the axes no class names (unreadable at "
            "this size): the numbers are in metrics.json and the tables above."
        )
    return note


def _summary_blocks(run: RunFiles) -> list[Block]:
    info = run.run_info
    if run.regression:
        scores = regression.summary_rows(run.metrics, info)
    elif run.multilabel:
        scores = multilabel.summary_rows(run.metrics, run.labels, run.label_separator)
    else:
        scores = [["test accuracy after training", run.metrics["after"]["accuracy"]]]
    rows = [
        ["run folder", str(run.path)],
        ["base model", base_model_name(run)],
        ["labels", ", ".join(run.labels)],
        ["quantized (4-bit)", info.get("quantized")],
        ["training time (s)", info.get("train_runtime_s")],
        *stages.loss_rows(info),
        *scores,
        ["llmclf / torch", f"{info.get('llmclf_version')} / {info.get('torch_version')}"],
    ]
    return [Block("heading", "Summary"), Block("table", headers=["", "value"], rows=rows)]


def _figure_blocks(run: RunFiles, images: dict[str, plots.Png]) -> list[Block]:
    """The confusion matrices (after training first), the training curves and their validations."""
    k = len(run.labels)
    blocks = [Block("heading", "Confusion matrices"), Block("para", _confusion_note(k))]
    blocks += [
        Block("image", text=_confusion_caption(key, k), image=png, half=k <= HALF_MAX)
        for key, png in images.items()
        if key.startswith("confusion")
    ]
    return blocks + _training_blocks(run, images)


def _training_blocks(run: RunFiles, images: dict[str, plots.Png]) -> list[Block]:
    """The training curves, and the validations as a table where they are few."""
    blocks = [Block("heading", "Training curves")]
    if "training" in images:
        caption = "Training and validation loss, validation accuracy"
        if run.regression:
            caption = regression.training_caption(run.run_info)
            blocks += regression.scale_note(run.run_info)
        elif run.multilabel:
            caption = multilabel.training_caption(run.run_info)
        blocks.append(Block("image", text=caption, image=images["training"]))
    else:
        blocks.append(Block("para", "No training log in run_info.json."))
    if run.regression:
        headers, validations = regression.validation_table(run.run_info)
    elif run.multilabel:
        headers, validations = multilabel.validation_table(run.run_info)
    else:
        validations = stages.validation_rows(run.run_info)
        headers = ["step", "epoch", "validation loss", "validation accuracy", "validation balanced accuracy"]
    if validations:
        n = len(validations)
        blocks.append(Block("para", f"The {n} validation{'s' * (n > 1)} of the run, as numbers:"))
        blocks.append(Block("table", headers=headers, rows=validations))
    return blocks


def _calibration_blocks(images: dict[str, plots.Png], cal: plots.Calibration | None) -> list[Block]:
    blocks = [Block("heading", "Calibration")]
    if cal is None:
        return blocks + [Block("para", "predictions_test.csv is missing: no calibration.")]
    text = (
        "Expected calibration error (10 equal-width bins of the top-class probability, test split after "
        f"training): {cal.ece:.4f}."
    )
    return blocks + [
        Block("para", text),
        Block("image", text="Reliability diagram", image=images["calibration"]),
    ]


def _wrong_blocks(run: RunFiles, top: int) -> list[Block]:
    blocks = [Block("heading", "Most confidently wrong")]
    wrong = confidently_wrong(run, top)
    if not len(wrong):
        return blocks + [Block("para", "No wrong predictions on the test split.")]
    # the text first: on a narrow page it is what shows, the rest of the row scrolls in the table's box
    rows = [[i + 1, shorten(r.text), r.label, r.predicted, float(r.confidence)] for i, r in wrong.iterrows()]
    return blocks + [
        Block("para", f"The {len(wrong)} wrong test predictions with the highest confidence."),
        Block("table", headers=["#", "text", "true", "predicted", "confidence"], rows=rows),
    ]


def build_blocks(
    run: RunFiles, images: dict[str, plots.Png], cal: plots.Calibration | None, top: int
) -> list[Block]:
    """The report, first the verdict, then each section in REPORT_SECTIONS' order (a regression run's:
    regression.SECTIONS; a multi-label run's: multilabel.SECTIONS)."""
    if run.regression:
        return _regression_blocks(run, images, top)
    if run.multilabel:
        return _multilabel_blocks(run, images, top)
    blocks = [Block("verdict", stages.verdict(run.metrics, run.run_info, run.config))]
    blocks += _summary_blocks(run)
    blocks += [Block("heading", "Data"), *_data_blocks(run)]
    blocks += [Block("heading", "Metrics"), *_metric_blocks(run)]
    blocks += [Block("heading", "Per class"), *_per_class_blocks(run)]
    blocks += _figure_blocks(run, images)
    blocks += _calibration_blocks(images, cal)
    blocks += _wrong_blocks(run, top)
    blocks += [Block("heading", "Configuration"), Block("pre", run.config_text.rstrip())]
    return blocks


def _regression_blocks(run: RunFiles, images: dict[str, plots.Png], top: int) -> list[Block]:
    """A regression run's report: its scores, the target per split, predicted against true values."""
    baseline = regression.mean_baseline(run.predictions, run.summary)
    blocks = [Block("verdict", regression.verdict(run.metrics, run.run_info, run.predictions, run.summary))]
    blocks += _summary_blocks(run)
    blocks.append(Block("heading", "Data"))
    if run.summary is None:
        blocks.append(Block("para", "data_summary.json is missing from this run folder."))
    else:
        blocks += [*regression.data_blocks(run.summary), *data_notes(run.summary)]
    blocks.append(Block("heading", "Metrics"))
    blocks += regression.metric_blocks(run.metrics, run.run_info, run.config, baseline)
    blocks += [Block("heading", "Predicted vs true"), *regression.figure_blocks(images, run.predictions)]
    blocks += _training_blocks(run, images)
    blocks += [Block("heading", "Largest errors"), *regression.error_blocks(run.predictions, top)]
    blocks += [Block("heading", "Configuration"), Block("pre", run.config_text.rstrip())]
    return blocks


def _multilabel_blocks(run: RunFiles, images: dict[str, plots.Png], top: int) -> list[Block]:
    """A multi-label run's report: its scores, per label, the label co-occurrence, the worst texts."""
    ml, labels = multilabel, run.labels
    blocks = [Block("verdict", ml.verdict(run.metrics, run.run_info, run.predictions, labels))]
    blocks += _summary_blocks(run)
    blocks.append(Block("heading", "Data"))
    if run.summary is None:
        blocks.append(Block("para", "data_summary.json is missing from this run folder."))
    else:
        blocks += [*ml.data_blocks(run.summary, labels), *data_notes(run.summary)]
    blocks += [Block("heading", "Metrics"), *ml.metric_blocks(run.metrics, run.run_info, run.config, labels)]
    blocks += [Block("heading", "Per label"), *ml.per_label_blocks(run.metrics, run.run_info, labels)]
    blocks.append(Block("heading", "Label co-occurrence"))
    blocks += ml.cooccurrence_blocks(images, run.predictions, labels)
    blocks += _training_blocks(run, images)
    blocks.append(Block("heading", "Most wrong"))
    blocks += ml.wrong_blocks(run.predictions, labels, run.label_separator, top)
    blocks += [Block("heading", "Configuration"), Block("pre", run.config_text.rstrip())]
    return blocks


# ------------------------------------------------------------------------------------ Markdown escaping
# Backslash-escaped: every ASCII punctuation character that can start markup, a link, an image, a code
# span, a table cell, maths ($, rendered by the Hugging Face hub) or an autolink (@ of an address).
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]!|~#$@])")
_SCHEME = re.compile(r"(?<=[A-Za-z0-9]):(?=/)")  # https:// stays text, not a bare-URL link (GFM)
_WWW = re.compile(r"(?i)\b(www)\.")  # www.example.org likewise
_LIST_ITEM = re.compile(r"^(\d{1,9})([.)])")  # '1. x' at the start of a line is an ordered list


def md_text(value: Any) -> str:
    """`value` as literal Markdown text on one line: no markup, HTML, link or image survives it.

    Line breaks become spaces (so a label cannot start a heading or end a table row), controls become
    visible escapes, Markdown punctuation is backslash-escaped and &, <, > become HTML entities."""
    text = _MD_SPECIAL.sub(r"\\\1", one_line(cell(value)))
    text = html.escape(text, quote=False)
    return _WWW.sub(r"\1\\.", _SCHEME.sub(r"\\:", text))


def md_line(value: Any) -> str:
    """`md_text` for text that starts a line, where '- ', '+ ', '1. ' or '=' would be block markup."""
    text = _LIST_ITEM.sub(r"\1\\\2", md_text(value))
    return "\\" + text if text[:1] in ("-", "+", "=") else text


def md_table(headers: list[Any], rows: list[list[Any]]) -> list[str]:
    """A GFM table, every header and cell through `md_text`; ends with a blank line."""
    out = ["| " + " | ".join(md_text(h) for h in headers) + " |"]
    out.append("|" + "|".join(" --- " for _ in headers) + "|")
    out += ["| " + " | ".join(md_text(c) for c in row) + " |" for row in rows]
    return out + [""]


def md_fence(text: str, info: str = "") -> list[str]:
    """`text` verbatim in a code block whose fence is longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + info, text, fence, ""]


# ------------------------------------------------------------------------------------ rendering
def render_markdown(blocks: list[Block], title: str) -> str:
    out = [f"# {md_text(title)}", ""]
    for b in blocks:
        if b.kind == "heading":
            out += [f"## {md_text(b.text)}", ""]
        elif b.kind in ("para", "verdict"):
            out += [md_line(b.text), ""]
        elif b.kind == "table":
            out += md_table(b.headers, b.rows)
        elif b.kind == "image" and b.image is not None:
            out += [f"![{md_text(b.text)}]({b.image.name})", ""]
        elif b.kind == "pre":
            out += md_fence(b.text, "yaml")
    return "\n".join(out)


def render_html(blocks: list[Block], title: str) -> str:
    """One file: CSS inline, images as base64 data URIs, no reference to anything outside it."""
    return html_page.render_html(blocks, title, cell)


# ------------------------------------------------------------------------------------ the report
def write_figures(run: RunFiles) -> tuple[dict[str, plots.Png], plots.Calibration | None]:
    """Every PNG of the report, written into the run folder."""
    if run.regression or run.multilabel:
        if run.regression:
            images = regression.write_figures(run.folder, run.predictions)
        else:
            images = multilabel.write_figures(run.folder, run.predictions, run.labels)
        if run.run_info.get("log_history"):
            log = run.run_info["log_history"]
            fig = plots.training_figure(log, regression=run.regression, multilabel=run.multilabel)
            images["training"] = plots.save_png(fig, run.folder, TRAINING_PNG)
        return images, None
    images: dict[str, plots.Png] = {}
    for stage in ("after", "before"):  # the after-training views first
        m = run.metrics.get(stage)
        if not m:
            continue
        for normalise, suffix in ((False, ""), (True, "_normalised")):
            title = f"{stage.capitalize()} training ({'row-normalised' if normalise else 'counts'})"
            fig = plots.confusion_figure(m["confusion_matrix"], m["labels"], normalise=normalise, title=title)
            name = CONFUSION_PNG.format(stage=stage, suffix=suffix)
            images[f"confusion_{stage}{suffix}"] = plots.save_png(fig, run.folder, name)
    if run.run_info.get("log_history"):
        fig = plots.training_figure(run.run_info["log_history"])
        images["training"] = plots.save_png(fig, run.folder, TRAINING_PNG)
    cal = None
    if run.predictions is not None and len(run.predictions):
        cal = plots.calibration(*prediction_probabilities(run))
        images["calibration"] = plots.save_png(plots.reliability_figure(cal), run.folder, CALIBRATION_PNG)
    return images, cal


def build_report(run_dir: str | Path, *, top: int = 10) -> Path:
    """Write the PNGs, report.md and report.html into the run folder; return the HTML path."""
    run = read_run(run_dir)
    images, cal = write_figures(run)
    blocks = build_blocks(run, images, cal, top)
    title = f"llmclf report: {run.path.name}"
    run.folder.write_text(REPORT_MD, render_markdown(blocks, title))
    return run.folder.write_text(REPORT_HTML, render_html(blocks, title))
