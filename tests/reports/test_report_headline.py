"""What the report says first and how it labels things (issue #19 items 11-12), without a browser:
the verdict line, the after-training views before the baseline's, each stage's score, honest loss
labels, the layout and print rules of report.html, a readable single validation, the probe line on the
terminal. The browser's view of the same page is tested in test_report_layout.py."""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd

from llmclf.reports import console, plots
from llmclf.reports import run_report as report

# The helpers new with these report changes (stages, html_page) are imported inside the tests that
# use them, so that the tests on the report files themselves also run against an older llmclf.

INPUTS = ("config.yaml", "labels.json", "run_info.json", "metrics.json", "data_summary.json")
LOG = [
    {"loss": 1.2, "step": 4, "epoch": 0.2},
    {"loss": 0.9, "step": 8, "epoch": 0.4},
    {"loss": 0.7, "step": 12, "epoch": 0.6},
    {"loss": 0.4, "step": 16, "epoch": 0.8},
    {"loss": 0.35, "step": 20, "epoch": 1.0},
    {"eval_loss": 0.5, "eval_accuracy": 0.875, "eval_balanced_accuracy": 0.86, "epoch": 1.0, "step": 20},
    {"train_runtime": 9.0, "train_loss": 0.71, "epoch": 1.0, "step": 20},
]


def rebuilt(trained_run: Path, dest: Path, edit=None, config=None) -> tuple[str, str, dict]:
    """A copy of the run's report inputs, run_info.json edited by `edit` and config.yaml's text by
    `config`, the report rebuilt: (report.md, report.html, run_info)."""
    dest.mkdir()
    for name in (*INPUTS, "predictions_test.csv"):
        shutil.copy(trained_run / name, dest / name)
    info = json.loads((dest / "run_info.json").read_text())
    if edit:
        edit(info)
        (dest / "run_info.json").write_text(json.dumps(info))
    if config:
        (dest / "config.yaml").write_text(config((dest / "config.yaml").read_text()))
    report.build_report(dest)
    md = (dest / "report.md").read_text(encoding="utf-8")
    return md, (dest / "report.html").read_text(encoding="utf-8"), info


def with_probe_and_lexical(info: dict) -> None:
    """A run whose probe head was scored on the test split and whose lexical part was mixed in."""
    info["probe"] = {"train_accuracy": 0.9875, "test_accuracy": 0.625}
    info["lexical"] = {
        "weight": 0.5,
        "C": 1.0,
        "test_accuracy": {"model": 0.8, "lexical": 0.55, "mixed": 0.825},
        "test_macro_f1": {"model": 0.79, "lexical": 0.5, "mixed": 0.82},
    }


def table_rows(md: str, first_cell: str) -> list[list[str]]:
    """The cells of every Markdown table row whose first cell starts with `first_cell`."""
    rows = [line for line in md.splitlines() if line.startswith(f"| {first_cell}")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]


def stage_rows(md: str) -> dict[str, list[str]]:
    """The numbered rows of the stage table: {stage: [accuracy, macro F1, change]}."""
    return {row[0]: row[1:] for row in table_rows(md, "") if re.match(r"\d\. ", row[0])}


# ------------------------------------------------------------------------------------ the verdict
def test_the_verdict_comes_first_with_score_chance_probe_and_errors(trained_run, tmp_path):
    md, page, info = rebuilt(trained_run, tmp_path / "run", with_probe_and_lexical)
    metrics = json.loads((trained_run / "metrics.json").read_text())
    preds = pd.read_csv(trained_run / "predictions_test.csv", keep_default_na=False, dtype=str)
    wrong = int((preds["label"] != preds["predicted"]).sum())  # counted from the predictions themselves
    lines = md.splitlines()
    assert lines[0].startswith("# llmclf report") and lines[1] == ""
    verdict = lines[2]
    assert verdict.startswith(f"Verdict: test accuracy {metrics['after']['accuracy']:.4f} after training")
    assert "chance level 0.2500 (1 in 4 classes)" in verdict  # 10 test texts in each of 4 classes
    assert "the linear-probe head alone (before fine-tuning): accuracy 0.6250" in verdict
    assert "the fine-tuned model alone: accuracy 0.8000, the TF-IDF part adds +0.0250" in verdict
    assert verdict.endswith(f"; {wrong} error{'s' * (wrong != 1)} out of {len(preds)} test texts.")
    # in the page: right under the title, before the navigation and the first section
    body = page.split("<body>", 1)[1]
    assert re.match(r"\s*<h1>[^<]*</h1>\s*<p class=\"verdict\">Verdict: test accuracy", body)
    assert body.index('class="verdict"') < body.index("<nav>") < body.index("<h2")


def test_verdict_of_imbalanced_classes_leads_with_macro_f1():
    matrix = [[50, 10], [6, 4]]  # 60 texts of one class, 10 of the other
    after = {"n": 70, "accuracy": 54 / 70, "macro_f1": 0.6, "confusion_matrix": matrix}
    from llmclf.reports import stages

    line = stages.verdict({"after": after}, {}, {})
    assert line.startswith("Verdict: test macro-F1 0.6000 after training (the test classes are imbalanced")
    assert f"accuracy {60 / 70:.4f} always guessing the largest class" in line
    # a uniform guess: precision = class share p, recall 1/2, F1 = 2p(1/2)/(p+1/2), averaged over classes
    shares = (60 / 70, 10 / 70)
    f1 = sum(2 * p * 0.5 / (p + 0.5) for p in shares) / 2
    assert f"macro-F1 {f1:.4f} guessing at random" in line
    assert line.endswith("; 16 errors out of 70 test texts.") and "probe" not in line


# ------------------------------------------------------------------------------------ stages, captions
def test_each_stage_scores_in_the_order_they_ran(trained_run, tmp_path):
    md, page, _ = rebuilt(trained_run, tmp_path / "run", with_probe_and_lexical)
    before = json.loads((trained_run / "metrics.json").read_text())["before"]
    rows = stage_rows(md)
    names = list(rows)
    assert [n[:2] for n in names] == ["1.", "2.", "3.", "4."]  # baseline, probe, fine-tuned, + lexical
    assert rows[names[0]][:2] == [f"{before['accuracy']:.4f}", f"{before['macro_f1']:.4f}"]
    assert "probe" in names[1] and rows[names[1]][0] == "0.6250"  # the probe's own test accuracy
    assert rows[names[1]][2] == f"{0.625 - before['accuracy']:+.4f}"
    assert rows[names[2]] == ["0.8000", "0.7900", "+0.1750"]
    assert "TF-IDF" in names[3] and rows[names[3]] == ["0.8250", "0.8200", "+0.0250"]
    alone = table_rows(md, "for comparison: TF-IDF")
    assert alone and alone[0][1:3] == ["0.5500", "0.5000"]


def test_the_caption_names_the_head_the_run_started_from(trained_run, tmp_path):
    md, _, info = rebuilt(trained_run, tmp_path / "probe", with_probe_and_lexical)
    assert "before training the classification head is random" not in md
    assert "Fine-tuning did not start from that random head but from a linear-probe head" in md

    def random_head(info: dict) -> None:
        info["probe"], info["lexical"] = None, None

    def head_init_random(text: str) -> str:
        assert "head_init: probe" in text
        return text.replace("head_init: probe", "head_init: random")

    md, page, _ = rebuilt(trained_run, tmp_path / "random", random_head, head_init_random)
    assert "Fine-tuning started from that random head (train.head_init: random)." in page
    assert "Fine-tuning started from that random head (train.head\\_init: random)." in md  # escaped _
    assert "linear-probe" not in md
    names = list(stage_rows(md))
    assert [n[:2] for n in names] == ["1.", "3."] and "saved classifier" in names[1]


def test_after_training_views_come_before_the_baseline(trained_run, tmp_path):
    md, page, _ = rebuilt(trained_run, tmp_path / "run")
    assert md.index("](confusion_after.png)") < md.index("](confusion_before.png)")
    assert md.index("](confusion_after_normalised.png)") < md.index("](confusion_before.png)")
    alts = re.findall(r'<img alt="([^"]*)"', page)
    assert [a.split(",")[0] for a in alts[:4]] == ["Confusion matrix after training"] * 2 + [
        "Confusion matrix before training (the baseline)"
    ] * 2
    header = table_rows(md, "metric")[0]
    assert header[1] == "after training" and header[2].startswith("before training")


# ------------------------------------------------------------------------------------ losses, validation
def test_losses_are_labelled_as_what_they_are(trained_run, tmp_path):
    md, _, info = rebuilt(trained_run, tmp_path / "run")
    logged = [e for e in info["log_history"] if "loss" in e]
    assert "final training loss" not in md
    assert table_rows(md, "mean training loss over the run")[0][1] == f"{info['train_loss']:.4f}"
    last = table_rows(md, f"last logged training loss (step {logged[-1]['step']})")
    assert last and last[0][1] == f"{logged[-1]['loss']:.4f}"
    from llmclf.reports import stages

    assert stages.loss_rows({"train_loss": 0.71, "log_history": LOG}) == [
        ["mean training loss over the run", 0.71],
        ["last logged training loss (step 20)", 0.35],
    ]


def test_a_single_validation_is_a_marked_point_on_the_whole_run():
    fig = plots.training_figure(LOG)
    loss_ax, acc_ax = fig.axes
    for ax in (loss_ax, acc_ax):
        low, high = ax.get_xlim()
        assert low == 0 and 20 < high < 25  # the run's steps from 0, not an axis from 19 to 21
    assert "0.875" in [t.get_text() for t in acc_ax.texts]  # the value written beside the point
    assert "0.500" in [t.get_text() for t in loss_ax.texts]
    from llmclf.reports import stages

    assert stages.validation_rows({"log_history": LOG}) == [[20, "1.00", 0.5, 0.875, 0.86]]


def test_the_report_lists_few_validations_as_a_table(trained_run, tmp_path):
    md, _, info = rebuilt(trained_run, tmp_path / "run")
    evals = [e for e in info["log_history"] if "eval_loss" in e]
    assert 0 < len(evals) <= 12  # few: listed
    rows = table_rows(md, "step")
    assert rows and rows[0][:3] == ["step", "epoch", "validation loss"]
    for e in evals:
        assert f"| {e['step']} | {e['epoch']:.2f} | {e['eval_loss']:.4f} | {e['eval_accuracy']:.4f} |" in md


# ------------------------------------------------------------------------------------ the page's layout rules
class Tree(HTMLParser):
    """Each start tag with its attributes and the tags it sits in."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, dict]] = []
        self.found: list[tuple[str, dict, list[tuple[str, dict]]]] = []

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, dict(attrs), list(self.stack)))
        if tag not in self.VOID:
            self.stack.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if self.stack and self.stack[-1][0] == tag:
            self.stack.pop()


def css_rules(css: str) -> dict[str, str]:
    """{selector: declarations} of the top-level rules and of those inside @media print (prefixed)."""
    rules: dict[str, str] = defaultdict(str)
    print_block = re.search(r"@media print\{(.*)\}\s*$", css, re.S)
    for prefix, text in (
        ("", css.split("@media")[0]),
        ("print ", print_block.group(1) if print_block else ""),
    ):
        for selectors, body in re.findall(r"([^{}]+)\{([^{}]*)\}", text):
            for selector in selectors.split(","):
                rules[prefix + selector.strip()] += body + ";"
    return rules


def test_tables_and_plots_sit_in_boxes_that_scroll_and_print_keeps_rows_whole(trained_run, tmp_path):
    md, page, _ = rebuilt(trained_run, tmp_path / "run")
    tree = Tree()
    tree.feed(page)
    for tag, _attrs, parents in tree.found:
        if tag == "table":
            assert parents[-1] == ("div", {"class": "scroll"})  # a wide table scrolls in its own box
        if tag == "img":
            assert parents[-1] == ("div", {"class": "plot"}) and parents[-2][0] == "figure"
    rules = css_rules(page.split("<style>", 1)[1].split("</style>", 1)[0])
    assert "overflow-x:auto" in rules[".scroll"] and "overflow-x:auto" in rules[".plot"]
    assert re.search(r"min-width:\d+(\.\d+)?em", rules["td.text"])  # texts are not one word a line
    assert "max-width:100%" in rules[".plot img"] and "min-width:var(--min" in rules[".plot img"]
    assert "flex-wrap:wrap" in rules[".figures"]  # two plots share a row only where both fit
    for selector in ("h2", "h1", "figcaption", "h2+p"):
        assert "break-after:avoid" in rules[f"print {selector}"], selector
    for selector in ("tr", "figure", "img", ".verdict"):
        assert "break-inside:avoid" in rules[f"print {selector}"], selector
    assert "table-header-group" in rules["print thead"]
    assert "min-width:0" in rules["print .plot img"] and "overflow:visible" in rules["print .scroll"]


def test_each_plot_keeps_its_text_readable_when_the_page_is_narrow(trained_run, tmp_path):
    _, page, _ = rebuilt(trained_run, tmp_path / "run")
    images = re.findall(
        r'<img alt="[^"]*"( style="--min:(\d+)px")? width="(\d+)" [^>]*data-text-px="([\d.]+)"', page
    )
    assert len(images) == 6
    for _, minimum, width, text_px in images:
        # the narrowest it is shown (a narrower page scrolls the plot's box): text still >= 9 px
        shown = int(minimum) if minimum else int(width)
        assert float(text_px) * shown / int(width) >= 9 - 0.05
        assert shown <= int(width)  # and never stretched beyond its own size


def test_figure_text_is_large_enough_for_a_phone():
    # At 390 px a page is ~366 px wide: a 4-class matrix then shows its smallest text at >= 9 px whole.
    fig = plots.confusion_figure(
        [[3, 1, 0, 0]] * 4, ["Business", "Sci/Tech", "Sports", "World"], normalise=False, title="t"
    )
    fig.canvas.draw()
    width = fig.get_size_inches()[0] * plots.DPI
    assert plots.smallest_text_px(fig) * 366 / width >= 9
    big = plots.confusion_figure(
        [[1] * 40] * 40, [f"class {i}" for i in range(40)], normalise=True, title="t"
    )
    big.canvas.draw()
    assert plots.smallest_text_px(big) >= 9  # shown at its own size (scrolling), 40 classes stay readable


# ------------------------------------------------------------------------------------ terminal
def test_the_probe_result_prints_as_a_readable_line():
    line = console.probe_line({"train_accuracy": 0.9875, "test_accuracy": 0.95})
    assert line == (
        "Head initialised from a linear probe on the frozen model's features: training accuracy 0.9875, "
        "test accuracy 0.9500."
    )
    assert "{" not in console.probe_line({"train_accuracy": 1.0}) and "not measured" in console.probe_line(
        {"train_accuracy": 1.0}
    )


def test_malformed_stage_values_are_left_out_not_shown():
    info = {"probe": {"test_accuracy": "NaN"}, "lexical": {"weight": True, "test_accuracy": [1]}}
    after = {"n": 4, "accuracy": 0.5, "macro_f1": 0.5, "confusion_matrix": [[1, 1], [1, 1]]}
    metrics = {"before": copy.deepcopy(after), "after": after}
    from llmclf.reports import stages

    rows = stages.stage_rows(metrics, info, {})
    assert [r[0][:2] for r in rows] == ["ch", "1.", "2.", "3.", "4.", "fo"]
    assert rows[2][1] == "not measured on this run" and rows[3][1:3] == [None, None]
    assert "probe" not in stages.verdict(metrics, info, {})
