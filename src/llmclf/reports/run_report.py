"""The run report: `report.md` and a self-contained `report.html` (plots inlined), built from the run folder.

Reads only the files a finished run wrote (metrics.json, data_summary.json, run_info.json,
predictions_test.csv, config.yaml, labels.json), so `llmclf report RUN_DIR` rebuilds it at any time
without the model. The report is assembled once as a list of blocks (heading, paragraph, table, image,
preformatted text) and rendered twice, so the Markdown and HTML versions always hold the same content.
Every piece of text from the data is escaped in both renderings.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from llmclf.reports import plots
from llmclf.runfolder import CONFIG, DATA_SUMMARY, LABELS, METRICS, RunFolder, prob_column

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
TEXT_CHARS = 400  # a wrong example's text is cut here in the report (the CSV has it whole)


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
    predictions: pd.DataFrame | None = None


def read_run(run_dir: str | Path) -> RunFiles:
    """The report's inputs, or an error naming the missing file; every read confined to the folder."""
    run = RunFolder.open(run_dir, needed=(CONFIG, LABELS, METRICS), purpose="the report")
    config_text = run.read_text(CONFIG)
    return RunFiles(
        path=run.root,
        folder=run,
        labels=run.labels(),
        config_text=config_text,
        config=yaml.safe_load(config_text) or {},
        metrics=run.read_json(METRICS),
        run_info=run.run_info(),
        summary=run.optional_json(DATA_SUMMARY),
        predictions=run.predictions(),
    )


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
    frame["confidence"] = probs.max(axis=1)
    wrong = frame[frame["label"] != frame["predicted"]]
    return wrong.sort_values("confidence", ascending=False, kind="stable").head(top).reset_index(drop=True)


# ------------------------------------------------------------------------------------ blocks
@dataclass
class Block:
    """One piece of the report: kind is heading, para, table, image or pre."""

    kind: str
    text: str = ""
    headers: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    image: Path | None = None
    half: bool = False  # in HTML, two such images share a row


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def _shorten(text: str, limit: int = TEXT_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
    truncated = s.get("truncated") or {}
    blocks = [
        Block(
            "para",
            f"Source: {s.get('source')}. Rows per split and class"
            + (" and the class weights used in the loss." if weights else " (no class weights)."),
        ),
        Block("table", headers=headers, rows=rows),
        Block(
            "para",
            f"Texts truncated to {s.get('max_length')} tokens: "
            + (", ".join(f"{k} {v}" for k, v in truncated.items()) or "none")
            + ".",
        ),
    ]
    blocks += [Block("para", f"Note: {note}") for note in s.get("notes") or []]
    return blocks


def _metric_blocks(run: RunFiles) -> list[Block]:
    before, after = run.metrics.get("before"), run.metrics["after"]
    names = (("accuracy", "accuracy"), ("balanced accuracy", "balanced_accuracy"), ("macro F1", "macro_f1"))
    if before:
        rows = [[n, before[k], after[k], f"{after[k] - before[k]:+.4f}"] for n, k in names]
        headers = ["metric", "before training", "after training", "change"]
    else:
        rows, headers = [[n, after[k]] for n, k in names], ["metric", "after training"]
    rows.append(
        ["test texts", *([before.get("n")] if before else []), after.get("n"), *([""] if before else [])]
    )
    return [
        Block("para", "On the test split; before training the classification head is random (chance level)."),
        Block("table", headers=headers, rows=rows),
    ]


def _per_class_blocks(run: RunFiles) -> list[Block]:
    before, after = run.metrics.get("before") or {}, run.metrics["after"]
    rows = []
    for label, m in after["per_class"].items():
        f1_before = before.get("per_class", {}).get(label, {}).get("f1")
        rows.append([label, m["precision"], m["recall"], m["f1"], f1_before, m["support"]])
    return [Block("table", headers=["class", "precision", "recall", "F1", "F1 before", "support"], rows=rows)]


def _confusion_caption(key: str) -> str:
    """'confusion_after_normalised' -> 'Confusion matrix after training, row-normalised'."""
    parts = key.split("_")
    return f"Confusion matrix {parts[1]} training, " + (
        "row-normalised" if "normalised" in parts else "counts"
    )


def build_blocks(
    run: RunFiles, images: dict[str, Path], cal: plots.Calibration | None, top: int
) -> list[Block]:
    info = run.run_info
    after = run.metrics["after"]
    summary_rows = [
        ["run folder", str(run.path)],
        ["base model", info.get("base_model", run.config.get("model", {}).get("name"))],
        ["labels", ", ".join(run.labels)],
        ["quantized (4-bit)", info.get("quantized")],
        ["training time (s)", info.get("train_runtime_s")],
        ["final training loss", info.get("train_loss")],
        ["test accuracy after training", after["accuracy"]],
        ["llmclf / torch", f"{info.get('llmclf_version')} / {info.get('torch_version')}"],
    ]
    blocks = [Block("heading", "Summary"), Block("table", headers=["", "value"], rows=summary_rows)]
    blocks += [Block("heading", "Data"), *_data_blocks(run)]
    blocks += [Block("heading", "Metrics"), *_metric_blocks(run)]
    blocks += [Block("heading", "Per class"), *_per_class_blocks(run)]
    blocks += [
        Block("heading", "Confusion matrices"),
        Block("para", "Rows: true label; columns: predicted. Counts, and each row divided by its total."),
    ]
    blocks += [
        Block("image", text=_confusion_caption(key), image=path, half=True)
        for key, path in images.items()
        if key.startswith("confusion")
    ]
    blocks.append(Block("heading", "Training curves"))
    if "training" in images:
        blocks.append(
            Block("image", text="Training and validation loss, validation accuracy", image=images["training"])
        )
    else:
        blocks.append(Block("para", "No training log in run_info.json."))
    blocks.append(Block("heading", "Calibration"))
    if cal is not None:
        blocks.append(
            Block(
                "para",
                f"Expected calibration error (10 equal-width bins of the top-class "
                f"probability, test split after training): {cal.ece:.4f}.",
            )
        )
        blocks.append(Block("image", text="Reliability diagram", image=images["calibration"]))
    else:
        blocks.append(Block("para", "predictions_test.csv is missing: no calibration."))
    blocks.append(Block("heading", "Most confidently wrong"))
    wrong = confidently_wrong(run, top)
    if len(wrong):
        blocks.append(Block("para", f"The {len(wrong)} wrong test predictions with the highest confidence."))
        blocks.append(
            Block(
                "table",
                headers=["#", "confidence", "true", "predicted", "text"],
                rows=[
                    [i + 1, float(r.confidence), r.label, r.predicted, _shorten(r.text)]
                    for i, r in wrong.iterrows()
                ],
            )
        )
    else:
        blocks.append(Block("para", "No wrong predictions on the test split."))
    blocks += [Block("heading", "Configuration"), Block("pre", run.config_text.rstrip())]
    return blocks


# ------------------------------------------------------------------------------------ rendering
def _md_cell(value: Any) -> str:
    # escaped as HTML too: Markdown viewers render raw HTML, and a text must never become markup
    return html.escape(_cell(value)).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block], title: str) -> str:
    out = [f"# {_md_cell(title)}", ""]
    for b in blocks:
        if b.kind == "heading":
            out += [f"## {b.text}", ""]
        elif b.kind == "para":
            out += [_md_cell(b.text), ""]
        elif b.kind == "table":
            out.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            out.append("|" + "|".join(" --- " for _ in b.headers) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
        elif b.kind == "image" and b.image is not None:
            out += [f"![{_md_cell(b.text)}]({b.image.name})", ""]
        elif b.kind == "pre":
            out += ["```yaml", b.text.replace("```", "'''"), "```", ""]
    return "\n".join(out)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1050px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #ddd;padding-bottom:.3em}h2{margin-top:1.8em;border-bottom:1px solid #eee}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.text{max-width:560px;word-wrap:break-word}img{max-width:100%;display:block;margin:.6em 0}
img.half{display:inline-block;width:49%;vertical-align:top}
pre{background:#f7f7f7;padding:1em;overflow-x:auto}nav a{margin-right:1em}
"""


def _html_cell(value: Any) -> str:
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    kind = "num" if numeric else ("text" if isinstance(value, str) and len(value) > 60 else "")
    return (
        f'<td class="{kind}">{html.escape(_cell(value))}</td>'
        if kind
        else f"<td>{html.escape(_cell(value))}</td>"
    )


def _anchor(title: str) -> str:
    return title.lower().replace(" ", "-")


def render_html(blocks: list[Block], title: str) -> str:
    """One file: CSS inline, images as base64 data URIs, no reference to anything outside it."""
    headings = [b.text for b in blocks if b.kind == "heading"]
    nav = " ".join(f'<a href="#{_anchor(h)}">{html.escape(h)}</a>' for h in headings)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<nav>{nav}</nav>",
    ]
    for b in blocks:
        if b.kind == "heading":
            out.append(f'<h2 id="{_anchor(b.text)}">{html.escape(b.text)}</h2>')
        elif b.kind == "para":
            out.append(f"<p>{html.escape(b.text)}</p>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
            body = "".join("<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in b.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b.kind == "image" and b.image is not None:
            data = base64.b64encode(b.image.read_bytes()).decode("ascii")
            half = ' class="half"' if b.half else ""
            out.append(f'<img{half} alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">')
        elif b.kind == "pre":
            out.append(f"<pre>{html.escape(b.text)}</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------ the report
def write_figures(run: RunFiles) -> tuple[dict[str, Path], plots.Calibration | None]:
    """Every PNG of the report, written into the run folder."""
    images: dict[str, Path] = {}
    for stage in ("before", "after"):
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
