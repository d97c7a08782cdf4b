"""`llmclf compare`: config differences and test metrics of several runs, side by side."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from llmclf.errors import LlmclfError
from llmclf.reports import plots
from llmclf.reports.run_report import Block, prediction_probabilities, read_run, render_markdown
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


def compare_runs(run_dirs: list[str | Path]) -> tuple[list[str], list[list[Any]]]:
    """A table: one column per run; rows = config keys that differ (output excepted), then metrics."""
    if len(run_dirs) < 2:
        raise LlmclfError("compare needs at least two run folders.")
    runs = [read_run(d) for d in run_dirs]
    names = [r.path.name for r in runs]
    if len(set(names)) < len(names):
        names = [str(r.path) for r in runs]
    flat = [_flatten(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f} - {"output"})
    # config values as written (a float format of 4 decimals would show lr 1e-5 as 0.0000)
    rows: list[list[Any]] = [
        [k, *[str(f[k]) if k in f else "" for f in flat]]
        for k in keys
        if len({repr(f.get(k)) for f in flat}) > 1
    ]
    for title, stage, key in COMPARE_METRICS:
        rows.append([title, *[(r.metrics.get(stage) or {}).get(key, "") for r in runs]])
    eces = [
        plots.calibration(*prediction_probabilities(r)).ece if r.predictions is not None else "" for r in runs
    ]
    rows.append(["ECE after", *eces])
    rows.append(["training time (s)", *[r.run_info.get("train_runtime_s", "") for r in runs]])
    return ["", *names], rows


def write_comparison(headers: list[str], rows: list[list[Any]], path: str | Path) -> Path:
    """Markdown (.md) or CSV (.csv), chosen by the extension."""
    out = Path(path).expanduser()
    suffix = out.suffix.lower()
    if suffix not in (".md", ".csv"):
        raise LlmclfError(f"Comparison output {out}: unsupported extension '{suffix}'. Use .md or .csv.")

    def write(tmp: Path) -> None:
        if suffix == ".csv":
            with tmp.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["key", *headers[1:]])
                writer.writerows(rows)
        else:
            block = Block("table", headers=["key", *headers[1:]], rows=rows)
            tmp.write_text(render_markdown([block], "llmclf run comparison"), encoding="utf-8")

    return atomic_write(out, write)
