"""The report's building block and the two ways its values become text.

Apart from run_report so that the regression and multi-label reports (regression.py, multilabel.py)
build the same blocks without importing run_report, which dispatches to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmclf.reports import plots
from llmclf.reports.console import number_cell, signed_change

TEXT_CHARS = 400  # an example's text is cut here in the report (the CSV has it whole)
HALF_MAX = 8  # square heat maps of up to this many labels are shown two in a row (HTML)


@dataclass
class Block:
    """One piece of the report: kind is verdict (the line under the title), heading, para, table, image
    or pre."""

    kind: str
    text: str = ""
    headers: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    image: plots.Png | None = None
    half: bool = False  # in HTML, two such images share a row


def cell(value: Any) -> str:
    """A table value as text: a float to 4 decimals, None as an empty cell."""
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def shorten(text: str, limit: int = TEXT_CHARS) -> str:
    """`text` on one line, cut at `limit` characters (an ellipsis marks the cut)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def data_notes(summary: dict) -> list[Block]:
    """Under the data table: how many texts were cut at the token limit, then the run's notes."""
    truncated = summary.get("truncated") or {}
    blocks = [
        Block(
            "para",
            f"Texts truncated to {summary.get('max_length')} tokens: "
            + (", ".join(f"{k} {v}" for k, v in truncated.items()) or "none")
            + ".",
        )
    ]
    return blocks + [Block("para", f"Note: {note}") for note in summary.get("notes") or []]


def as_dict(value: Any) -> dict:
    """A value from a run folder's JSON where a mapping is expected; {} where it is something else."""
    return value if isinstance(value, dict) else {}


def or_na(value: Any) -> float | str:
    """A metric as a table cell; "n/a" where metrics.json has none (a correlation of constant
    predictions is null)."""
    cell = number_cell(value)
    return "n/a" if cell is None else cell


def metric_rows(metrics: dict, headline: tuple[tuple[str, str], ...]) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) of the `headline` test metrics after training, beside the baseline's with the
    change."""
    before, after = as_dict(metrics.get("before")), metrics["after"]
    rows: list[list[Any]] = []
    for name, key in headline:
        if not before:
            rows.append([name, or_na(after.get(key))])
            continue
        both = number_cell(after.get(key)) is not None and number_cell(before.get(key)) is not None
        change = signed_change(after[key] - before[key]) if both else ""
        rows.append([name, or_na(after.get(key)), or_na(before.get(key)), change])
    if not before:
        return ["metric", "after training"], rows + [["test texts", after.get("n")]]
    rows.append(["test texts", after.get("n"), before.get("n"), ""])
    return ["metric", "after training", "before training (baseline)", "change"], rows
