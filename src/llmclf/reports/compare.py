"""`llmclf compare`: config differences and test metrics of several runs, side by side."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from llmclf.data import input_key
from llmclf.errors import LlmclfError
from llmclf.reports import plots
from llmclf.reports.console import number_cell, one_line
from llmclf.reports.run_report import (
    Block,
    RunFiles,
    prediction_probabilities,
    read_run,
    render_markdown,
)
from llmclf.runfolder import atomic_write


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


COMPARE_METRICS = (
    ("accuracy before", "before", "accuracy"),
    ("accuracy after", "after", "accuracy"),
    ("balanced accuracy after", "after", "balanced_accuracy"),
    ("macro F1 after", "after", "macro_f1"),
)
MULTILABEL_COMPARE_METRICS = (
    ("micro F1 before", "before", "micro_f1"),
    ("micro F1 after", "after", "micro_f1"),
    ("macro F1 after", "after", "macro_f1"),
    ("subset accuracy after", "after", "subset_accuracy"),
    ("Hamming loss after (lower is better)", "after", "hamming_loss"),
)
REGRESSION_COMPARE_METRICS = (
    ("MSE before", "before", "mse"),
    ("MSE after", "after", "mse"),
    ("MAE after", "after", "mae"),
    ("Pearson after", "after", "pearson"),
    ("Spearman after", "after", "spearman"),
)


def compare_runs(run_dirs: list[str | Path]) -> tuple[list[str], list[list[Any]], list[str]]:
    """A table: one column per run; rows = config keys that differ (output excepted), then metrics;
    and warnings where the runs' metrics are not comparable (other data, labels or test split)."""
    if len(run_dirs) < 2:
        raise LlmclfError("compare needs at least two run folders.")
    runs = [read_run(d) for d in run_dirs]
    names = [r.path.name for r in runs]
    if len(set(names)) < len(names):
        names = [str(r.path) for r in runs]
    _same_task(runs, names)
    flat = [_flatten(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f} - {"output"})
    # config values as written (a float format of 4 decimals would show lr 1e-5 as 0.0000)
    rows: list[list[Any]] = [
        [k, *[str(f[k]) if k in f else "" for f in flat]]
        for k in keys
        if len({repr(f.get(k)) for f in flat}) > 1
    ]
    rows.append(["test examples", *[_test_size(r) or "" for r in runs]])
    if runs[0].regression or runs[0].multilabel:  # a metric that is no number (a null correlation): n/a
        measured = REGRESSION_COMPARE_METRICS if runs[0].regression else MULTILABEL_COMPARE_METRICS
        for title, stage, key in measured:
            values = [number_cell((r.metrics.get(stage) or {}).get(key)) for r in runs]
            rows.append([title, *["n/a" if v is None else v for v in values]])
    else:
        for title, stage, key in COMPARE_METRICS:
            rows.append([title, *[(r.metrics.get(stage) or {}).get(key, "") for r in runs]])
        eces = [
            plots.calibration(*prediction_probabilities(r)).ece if r.predictions is not None else ""
            for r in runs
        ]
        rows.append(["ECE after", *eces])
    rows.append(["training time", *[duration(r.run_info.get("train_runtime_s")) for r in runs]])
    return ["", *names], rows, comparison_warnings(runs, names)


def _same_task(runs: list[RunFiles], names: list[str]) -> None:
    """Refuse to set runs of different tasks side by side: their metrics measure different things."""
    if len({r.task for r in runs}) > 1:
        found = "; ".join(f"{one_line(n)}: {r.task}" for n, r in zip(names, runs))
        raise LlmclfError(
            f"These runs are of different tasks ({found}): a single-label run's accuracy, a multi-label "
            "run's micro F1 and Hamming loss (over every label decision) and a regression run's errors "
            "and correlations cannot be compared with one another. Compare runs of one task at a time."
        )


def duration(seconds: Any) -> str:
    """Seconds to one decimal, or minutes from two minutes on; empty when not recorded."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return ""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _data_source(run: RunFiles) -> str:
    data = run.config.get("data") if isinstance(run.config.get("data"), dict) else {}
    source = (run.summary or {}).get("source") or data.get("path")
    return f"{source}" + (f" (test split from {data['eval_data']})" if data.get("eval_data") else "")


def _test_size(run: RunFiles) -> int | None:
    n = run.metrics["after"].get("n")
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    return len(run.predictions) if run.predictions is not None else None


def _columns(frame: Any) -> list[str]:
    return [] if frame is None else list(frame.columns)


def _tested_inputs(frame: Any) -> list[str]:
    """A run's test inputs, sorted: its texts, or its text pairs (the first text alone does not tell
    two pair runs' test splits apart)."""
    return sorted(input_key(frame[[c for c in ("text", "pair") if c in frame]].astype(str)))


def comparison_warnings(runs: list[RunFiles], names: list[str]) -> list[str]:
    """Why the runs' metrics may not be comparable: other data, other label sets, other test splits."""
    out = []

    def differ(values: list[Any], what: str) -> None:
        if len({repr(v) for v in values}) > 1:
            out.append(f"{what} (" + "; ".join(f"{n}: {v}" for n, v in zip(names, values)) + ")")

    differ([_data_source(r) for r in runs], "the runs read different data")
    differ([sorted(r.labels) for r in runs], "the runs have different label sets")
    sizes = [_test_size(r) for r in runs]
    differ(sizes, "the runs were tested on different numbers of examples")
    tested = [_tested_inputs(r.predictions) for r in runs if "text" in _columns(r.predictions)]
    if len(set(sizes)) == 1 and len(tested) == len(runs) and any(t != tested[0] for t in tested):
        out.append("the runs were tested on different texts (as many, but another split)")
    return [f"metrics not comparable: {w}." for w in out]


def write_comparison(
    headers: list[str], rows: list[list[Any]], path: str | Path, warnings: list[str] | tuple = ()
) -> Path:
    """Markdown (.md) or CSV (.csv), chosen by the extension; warnings first (CSV: `warning` rows)."""
    out = Path(path).expanduser()
    suffix = out.suffix.lower()
    if suffix not in (".md", ".csv"):
        raise LlmclfError(f"Comparison output {out}: unsupported extension '{suffix}'. Use .md or .csv.")

    def write(tmp: Path) -> None:
        if suffix == ".csv":
            with tmp.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["key", *headers[1:]])
                writer.writerows(["warning", w] for w in warnings)
                writer.writerows(rows)
        else:
            blocks = [Block("para", f"Warning: {w}") for w in warnings]
            blocks.append(Block("table", headers=["key", *headers[1:]], rows=rows))
            tmp.write_text(render_markdown(blocks, "llmclf run comparison"), encoding="utf-8")

    return atomic_write(out, write)
