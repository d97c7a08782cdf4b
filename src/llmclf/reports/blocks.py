"""The report's building block and the two ways its values become text.

Apart from run_report so that the regression and multi-label reports (regression.py, multilabel.py)
build the same blocks without importing run_report, which dispatches to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmclf.reports import plots

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
