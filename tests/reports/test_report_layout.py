"""report.html in a real browser (headless Chromium, driven by benchmarks/report_screens.py): at a
390 px phone width the page does not scroll sideways, no element sticks out of it, the "most confidently
wrong" texts keep a readable column width, and every plot's smallest text is shown at 9 px or more; at
1280 px nothing overflows either. Skipped where /usr/bin/chromium is absent (Debian: apt-get install
chromium)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from llmclf.reports import run_report as report

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Chromium at /usr/bin/chromium")

LONG_TEXT = " ".join(["a fairly long news text about markets, matches and machines"] * 8)
UNBROKEN = "https://example.org/" + "x" * 150  # one 170-character word
LONG_LABELS = [f"{name} and everything related to it" for name in ("world", "sports", "business", "sci")]


def screens():
    spec = importlib.util.spec_from_file_location("report_screens", ROOT / "benchmarks" / "report_screens.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def renamed(value, names: dict[str, str]):
    """A JSON value with every dict key and string equal to a label renamed."""
    if isinstance(value, dict):
        return {names.get(k, k): renamed(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [renamed(v, names) for v in value]
    return names.get(value, value) if isinstance(value, str) else value


def with_long_texts(trained_run: Path, dest: Path) -> Path:
    """The tiny run's report with the texts a narrow page finds hardest: long wrong texts, a long
    unbroken word, long class names (in every table and on the confusion matrices' axes)."""
    dest.mkdir()
    shutil.copy(trained_run / "config.yaml", dest / "config.yaml")
    labels = json.loads((trained_run / "labels.json").read_text())
    names = dict(zip(labels, LONG_LABELS))
    for name in ("labels.json", "run_info.json", "metrics.json", "data_summary.json"):
        data = json.loads((trained_run / name).read_text(encoding="utf-8"))
        (dest / name).write_text(json.dumps(renamed(data, names)), encoding="utf-8")
    preds = pd.read_csv(trained_run / "predictions_test.csv", keep_default_na=False, dtype=str)
    preds = preds.rename(columns={f"prob_{old}": f"prob_{new}" for old, new in names.items()})
    preds[["label", "predicted"]] = preds[["label", "predicted"]].replace(names)
    for row in range(3):  # three certain mistakes, so they head the confidently-wrong table
        wrong = next(label for label in LONG_LABELS if label != preds.loc[row, "label"])
        preds.loc[row, "predicted"] = wrong
        preds.loc[row, "text"] = UNBROKEN if row == 1 else LONG_TEXT
        for label in LONG_LABELS:
            preds.loc[row, f"prob_{label}"] = "1.0" if label == wrong else "0.0"
    preds.to_csv(dest / "predictions_test.csv", index=False)
    return report.build_report(dest)


@pytest.fixture(scope="module")
def page(trained_run, tmp_path_factory) -> Path:
    return with_long_texts(trained_run, tmp_path_factory.mktemp("layout") / "run")


def test_the_page_at_phone_width_does_not_scroll_sideways(page):
    html = page.read_text(encoding="utf-8")
    assert all(label in html for label in LONG_LABELS) and UNBROKEN in html  # the hard texts are in it
    m = screens().measure(page, 390)
    assert m["clientWidth"] == 390  # laid out at phone width (not widened to a desktop window's minimum)
    assert m["scrollWidth"] <= m["clientWidth"], m["sticking_out"]
    assert m["sticking_out"] == []  # wide tables and plots scroll inside their own boxes
    assert len(m["text_cells"]) >= 3 and min(m["text_cells"]) >= 200  # not one word a line
    assert len(m["images"]) == 6
    for image in m["images"]:
        assert image["smallest_text_px"] >= 9, image  # tick labels and cell values readable


def test_the_page_at_desktop_width_does_not_overflow(page):
    m = screens().measure(page, 1280)
    assert m["clientWidth"] == 1280 and m["scrollWidth"] <= 1280 and m["sticking_out"] == []
    assert all(image["smallest_text_px"] >= 9 for image in m["images"])


@pytest.mark.skipif(not shutil.which("pdftotext"), reason="needs pdftotext (poppler-utils) to read the PDF")
def test_printed_no_page_ends_with_a_heading(page, tmp_path):
    """Printed (A4): each section's heading is on the page where its content starts."""
    import subprocess

    pdf = tmp_path / "report.pdf"
    module = screens()
    with module.Browser() as browser:
        browser.open(page, 1280)
        browser.pdf(pdf)
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True).stdout
    pages = [p for p in text.split("\f") if p.strip()]
    assert len(pages) >= 3
    for number, content in enumerate(pages, 1):
        last = [line.strip() for line in content.splitlines() if line.strip()][-1]
        assert last not in report.REPORT_SECTIONS, f"page {number} ends with the heading {last!r}"
    found = [s for s in report.REPORT_SECTIONS if any(s in p for p in pages)]
    assert found == list(report.REPORT_SECTIONS)
