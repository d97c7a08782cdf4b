"""A run folder is untrusted input (people download and share them): what `report`, `compare` and the
model card may read, write and show.

Reads: a link leading out of the run folder is refused, with an error naming the file, before anything
is written. Writes: a link at an output name is replaced, never written through, and a planted temporary
name is left alone. Markdown (report.md, the comparison, the model card): every value from data or
config is literal text. Labels: drawn as plain text by matplotlib, shown with visible escapes on the
terminal; a confusion figure stays a bounded size whatever the number of classes.

The link tests go through `llmclf.cli.main` only, which every layout of the package has; the others
import the report modules inside the test.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from llmclf.cli import main

INPUTS = (
    "config.yaml",
    "labels.json",
    "metrics.json",
    "run_info.json",
    "data_summary.json",
    "predictions_test.csv",
)
PNGS = (
    "confusion_before.png",
    "confusion_before_normalised.png",
    "confusion_after.png",
    "confusion_after_normalised.png",
    "training_curves.png",
    "calibration.png",
)
OUTPUTS = ("report.md", "report.html", *PNGS)
SECRET = "SECRET-7f3a9c"


def copy_inputs(run: Path, dest: Path) -> Path:
    """A run folder holding the report's inputs only (what `report` and `compare` read)."""
    dest.mkdir(parents=True)
    for name in INPUTS:
        shutil.copy(run / name, dest / name)
    return dest


def link_out(run: Path, name: str, outside: Path) -> Path:
    """Move `name` out of the run folder (a secret added where the format allows) and link to it."""
    outside.mkdir(exist_ok=True)
    target = outside / name
    shutil.move(run / name, target)
    if name == "config.yaml":
        target.write_text(target.read_text(encoding="utf-8") + f"api_key: {SECRET}\n", encoding="utf-8")
    elif name in ("metrics.json", "run_info.json", "data_summary.json"):
        data = json.loads(target.read_text(encoding="utf-8"))
        target.write_text(json.dumps({**data, "api_key": SECRET}), encoding="utf-8")
    (run / name).symlink_to(target)
    return target


def victim(folder: Path, name: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(f"victim {name}\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ links: reading
@pytest.mark.parametrize("name", INPUTS)
def test_report_refuses_a_link_leading_out_of_the_run_folder(trained_run, tmp_path, capsys, name):
    run = copy_inputs(trained_run, tmp_path / "run")
    link_out(run, name, tmp_path / "outside")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert name in err and "outside" in err, err
    assert sorted(p.name for p in run.iterdir()) == sorted(INPUTS)  # nothing written, nothing leaked


@pytest.mark.parametrize("name", ["config.yaml", "metrics.json"])
def test_compare_refuses_a_link_leading_out_of_a_run_folder(trained_run, tmp_path, capsys, name):
    a = copy_inputs(trained_run, tmp_path / "a")
    b = copy_inputs(trained_run, tmp_path / "b")
    link_out(a, name, tmp_path / "outside")
    out = tmp_path / "compared.md"
    assert main(["compare", str(a), str(b), "--output", str(out)]) == 2
    captured = capsys.readouterr()
    assert name in captured.err and "outside" in captured.err, captured.err
    assert SECRET not in captured.out + captured.err
    assert not out.exists()


def test_a_run_folder_named_through_a_link_is_read_and_written_in_place(trained_run, tmp_path):
    # The folder the user names may itself be a link: only links below it are refused.
    run = copy_inputs(trained_run, tmp_path / "run")
    alias = tmp_path / "alias"
    alias.symlink_to(run, target_is_directory=True)
    assert main(["--quiet", "report", str(alias)]) == 0
    assert (run / "report.html").is_file() and not (run / "report.html").is_symlink()


# ------------------------------------------------------------------------------------ links: writing
def test_report_replaces_links_at_its_output_names(trained_run, tmp_path):
    run = copy_inputs(trained_run, tmp_path / "run")
    victims = tmp_path / "victims"
    for name in ("report.md", "report.html", "calibration.png", "confusion_after.png", "training_curves.png"):
        (run / name).symlink_to(victim(victims, name))
    (run / "confusion_before.png").symlink_to("config.yaml")  # a link to a file inside the folder
    config = (run / "config.yaml").read_bytes()
    assert main(["--quiet", "report", str(run)]) == 0
    for path in victims.iterdir():
        assert path.read_bytes() == f"victim {path.name}\n".encode(), path.name  # not written through
    assert (run / "config.yaml").read_bytes() == config
    for name in OUTPUTS:
        assert (run / name).is_file() and not (run / name).is_symlink(), name
    assert (run / "calibration.png").read_bytes().startswith(b"\x89PNG")
    assert "## Summary" in (run / "report.md").read_text(encoding="utf-8")


def test_report_leaves_planted_temporary_names_alone(trained_run, tmp_path):
    run = copy_inputs(trained_run, tmp_path / "run")
    victims = tmp_path / "victims"
    planted = {name: victim(victims, name) for name in ("report.md.tmp", "report.html.tmp")}
    for name, target in planted.items():
        (run / name).symlink_to(target)
    assert main(["--quiet", "report", str(run)]) == 0
    for name, target in planted.items():
        assert target.read_bytes() == f"victim {name}\n".encode()  # not written through
        assert (run / name).is_symlink() and Path(os.readlink(run / name)) == target  # nor moved
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    assert (run / "report.md").is_file() and not (run / "report.md").is_symlink()


# ------------------------------------------------------------------------------------ a synthetic run
def synthetic_run(
    path: Path,
    labels: list[str],
    *,
    texts: list[str] | None = None,
    base: str = "org/base-model",
    source: str = "data.csv",
    notes: tuple[str, ...] = (),
    config_text: str = "model:\n  name: org/base-model\n",
) -> Path:
    """A run folder written by hand: every test text is predicted wrong, with confidence 0.9."""
    import pandas as pd

    path.mkdir(parents=True)
    k = len(labels)
    per_class = {label: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 3} for label in labels}
    matrix = [[3 if i == j else 0 for j in range(k)] for i in range(k)]
    stage = {"accuracy": 0.5, "balanced_accuracy": 0.5, "macro_f1": 0.5, "n": 3 * k}
    stage |= {"per_class": per_class, "labels": labels, "confusion_matrix": matrix}
    log = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 2, "eval_loss": 0.7}]
    counts = {split: {label: 3 for label in labels} for split in ("train", "val", "test")}
    summary = {"source": source, "counts": counts, "class_weights": {label: 1.0 for label in labels}}
    summary |= {"max_length": 64, "truncated": {"train": 0}, "notes": list(notes)}
    files = {
        "labels.json": labels,
        "metrics.json": {"before": stage, "after": stage},
        "run_info.json": {"base_model": base, "log_history": log},
        "data_summary.json": summary,
    }
    for name, data in files.items():
        (path / name).write_text(json.dumps(data), encoding="utf-8")
    (path / "config.yaml").write_text(config_text, encoding="utf-8")
    rows = []
    for i, text in enumerate(texts or [f"text {i}" for i in range(k)]):
        true, predicted = labels[i % k], labels[(i + 1) % k]
        probs = {f"prob_{label}": 0.9 if label == predicted else 0.1 / (k - 1) for label in labels}
        rows.append({"text": text, "label": true, "predicted": predicted, **probs})
    # \r\n rows: pandas quotes a field holding a bare \r only when \r is in the line terminator
    pd.DataFrame(rows).to_csv(path / "predictions_test.csv", index=False, lineterminator="\r\n")
    return path


HOSTILE = [
    "a\n## INJECTED-NL",
    "b\r# INJECTED-CR",
    "c\u2028# INJECTED-LS",
    "<script>alert(1)</script>",
    "![pixel](https://evil.example/p.png)",
    "[click](https://evil.example/)",
    "pipe | cell",
    "`code` *bold* _em_ ~~gone~~",
    "# heading",
    "- item",
    "1. item",
    "> quote",
    "tag_$x^$",
    "https://bare.example www.evil.example me@evil.example",
    "&lt;entity&gt; & \\",
    "<https://auto.example>",
    "```",
    "plain",
]
HOSTILE_TEXTS = [
    "Click ![x](https://evil.example/t.png) or [here](javascript:alert(1)) <img src=x onerror=alert(1)>",
    "line one\n# INJECTED-TEXT\n| a | b |\n\n- list",
    "<iframe src=https://evil.example></iframe> `rm -rf` **bold**",
]
HOSTILE_BASE = "org/model\n# INJECTED-BASE ![x](https://evil.example/b.png) <script>alert(1)</script> `t`"
HOSTILE_CONFIG = """model:
  name: "evil\\n# INJECTED-NAME <script>alert(1)</script> ![x](https://evil.example/c.png)"
data:
  note: |-
   ```
   # INJECTED-FROM-CONFIG
   <script>alert(1)</script>
   ![img](https://evil.example/c.png)
   ````
train:
  lr: 0.001
"""


# ------------------------------------------------------------------------------------ Markdown checks
FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
OWN_CODE = ("`config.id2label`", "`model_max_length`")  # the model card's own code spans
OWN_IMAGE = re.compile(r"!\[[^\\\[\]]*\]\((confusion_\w+|training_curves|calibration)\.png\)")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def split_fences(md: str) -> tuple[list[str], list[str]]:
    """(lines outside fenced code blocks, the text of each fenced block), by CommonMark's rules."""
    outside: list[str] = []
    blocks: list[str] = []
    inside: list[str] = []
    fence = ""
    for line in re.split(r"\r\n|\r|\n", md):  # Markdown ends a line at any of the three
        if not fence:
            opened = FENCE.match(line)
            if opened:
                fence, inside = opened.group(1), []
            else:
                outside.append(line)
        elif re.fullmatch(rf" {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*", line):
            blocks.append("\n".join(inside))
            fence = ""
        else:
            inside.append(line)
    if fence:  # never closed: the rest of the file is code (check_markdown then counts one fence too many)
        blocks.append("\n".join(inside))
    return outside, blocks


def unescaped(line: str, chars: str) -> list[str]:
    """The characters of `chars` in `line` that no backslash escapes."""
    found, i = [], 0
    while i < len(line):
        if line[i] == "\\":
            i += 2
            continue
        if line[i] in chars:
            found.append(line[i])
        i += 1
    return found


def check_markdown(md: str, headings: set[str], *, fences: int, images: int = 0, own=()) -> list[str]:
    """Structural checks on Markdown written by llmclf; returns the lines outside code blocks.

    Only llmclf's own headings, list items (`own` prefixes) and images; no raw HTML, no unescaped
    link/image/emphasis/code/maths character, no bare URL; every table row as many cells as its header.
    Every problem is listed in the failure, the worst kinds first."""
    outside, blocks = split_fences(md)
    found: dict[str, list[str]] = {
        k: [] for k in ("heading", "block", "control", "html", "link", "bare url", "markup", "columns")
    }
    columns, seen_images = 0, 0
    for line in outside:
        if re.match(r" {0,3}#{1,6}(\s|$)", line) and not (
            line in headings or line.startswith(tuple(h for h in headings if h.endswith(" ")))
        ):
            found["heading"].append(line)
        if re.match(r" {0,3}([-+*>]|\d{1,9}[.)])(\s|$)|( {0,3}[=_-]+\s*$)| {4}", line):
            if not line.startswith(tuple(own)):  # a list item, quote, rule or code block not of llmclf's
                found["block"].append(line)
        if CONTROL.search(line):
            found["control"].append(repr(line))
        if OWN_IMAGE.fullmatch(line):
            seen_images += 1
            continue
        if "<" in line:  # every < from the data is &lt;
            found["html"].append(line)
        text = line
        for span in OWN_CODE:
            text = text.replace(span, "")
        if unescaped(text, "[]!"):
            found["link"].append(line)
        if re.search(r"(?i)\b(https?|ftp|javascript)://|\bwww\.", text):
            found["bare url"].append(line)
        if unescaped(text, "`*_~$@"):
            found["markup"].append(line)
        if line.startswith("|"):
            cells = len(unescaped(line, "|"))
            columns = columns or cells
            if cells != columns:
                found["columns"].append(line)
        else:
            columns = 0
    problems = [f"{kind}: {line}" for kind, lines in found.items() for line in lines]
    if len(blocks) != fences:
        problems.append(f"fences: {len(blocks)} code blocks, not {fences}")
    assert not problems, "\n".join(problems)
    assert seen_images == images
    return outside


def rendered(md: str, *, images: int = 0) -> list[str]:
    """The text of every paragraph, heading and table cell, as a CommonMark + GFM tables parser sees it;
    and no link, image (but llmclf's own), raw HTML, emphasis, quote, ordered list or rule in it."""
    markdown_it = pytest.importorskip("markdown_it")
    tokens = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"]).parse(md)
    kinds = [t.type for t in tokens] + [c.type for t in tokens for c in t.children or []]
    for kind in ("link_open", "html_inline", "html_block", "em_open", "strong_open", "s_open"):
        assert kind not in kinds, kind
    for kind in ("blockquote_open", "ordered_list_open", "hr"):
        assert kind not in kinds, kind
    assert kinds.count("image") == images
    return ["".join(c.content for c in t.children or []) for t in tokens if t.type == "inline"]


def shown(value: str) -> str:
    """How a value appears once rendered: on one line (control characters are tested apart)."""
    return " ".join(value.split())


# ------------------------------------------------------------------------------------ Markdown injection
def test_md_text_is_literal_text_for_any_string():
    from llmclf.reports.run_report import md_line, md_table, md_text

    for value in [*HOSTILE, *HOSTILE_TEXTS, "===", "---", "+ plus", "2) two", "    indented", "* star"]:
        for markdown in (md_line(value), "text " + md_text(value)):
            assert "\n" not in markdown and "\r" not in markdown
            texts = rendered(markdown)
            assert texts in ([shown(value)], [shown("text " + value)]), (value, markdown, texts)
    table = "\n".join(md_table(["label", "note"], [[value, value] for value in HOSTILE]))
    check_markdown(table, set(), fences=0)
    assert rendered(table) == ["label", "note", *[shown(v) for v in HOSTILE for _ in range(2)]]


def test_markdown_report_shows_hostile_values_as_text(tmp_path):
    from llmclf.reports import run_report as report

    path = synthetic_run(
        tmp_path / "run",
        HOSTILE,
        texts=HOSTILE_TEXTS,
        base=HOSTILE_BASE,
        source=HOSTILE[1],
        notes=("- a note", HOSTILE[4]),
        config_text=HOSTILE_CONFIG,
    )
    run = report.read_run(path)
    md = report.render_markdown(report.build_blocks(run, {}, None, 10), "llmclf report: run")
    headings = {"# llmclf report: run", *(f"## {section}" for section in report.REPORT_SECTIONS)}
    check_markdown(md, headings, fences=1)
    assert split_fences(md)[1] == [HOSTILE_CONFIG.rstrip()]  # the config whole, in one code block
    texts = "\n".join(rendered(md))
    for value in [*HOSTILE, *HOSTILE_TEXTS, HOSTILE_BASE, "- a note"]:
        assert shown(value) in texts, value


def test_model_card_shows_hostile_values_as_text(tmp_path, monkeypatch):
    from llmclf.reports import modelcard

    licence = "mit\n---\nlicense: evil\n# INJECTED-LICENCE <script>alert(1)</script>"
    monkeypatch.setattr(modelcard, "base_model_licence", lambda name: licence)
    path = synthetic_run(
        tmp_path / "run", HOSTILE, base=HOSTILE_BASE, source=HOSTILE[5], config_text=HOSTILE_CONFIG
    )
    card = modelcard.model_card(path)
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    headings = {
        "# Text classifier fine-tuned from ",
        *(f"## {h}" for h in ("Labels", "Base model and licence", "Intended use", "Limitations")),
        *(f"## {h}" for h in ("Training data", "Metrics (test split)", "Use", "Training configuration")),
    }
    own = ("- base model: ", "- licence of the base model: ", "- this fine-tuned", "- It only knows")
    own += ("- Texts are cut at ", "- Measured on ", "- Biases of ")
    check_markdown(body, headings, fences=2, own=own)
    assert split_fences(body)[1][1] == HOSTILE_CONFIG.rstrip()
    front = yaml.safe_load(head)  # valid YAML, holding only llmclf's keys; the licence on one line
    assert set(front) == {"library_name", "pipeline_tag", "tags", "license", "widget", "model-index"}
    assert front["license"] == shown(licence)
    # the example text comes from the run's own data: a plain YAML string, whatever it holds
    assert all(set(item) == {"text"} and isinstance(item["text"], str) for item in front["widget"])
    texts = "\n".join(rendered(body))
    for value in [*HOSTILE, HOSTILE_BASE, licence]:
        assert shown(value) in texts, value


def test_comparison_markdown_is_one_table_of_literal_text(tmp_path):
    from llmclf.reports.compare import write_comparison

    headers = ["", "run\n# INJECTED", "run | b"]
    rows = [["model.name", HOSTILE[0], HOSTILE[4]], ["data.note", HOSTILE[3], HOSTILE[13]]]
    md = write_comparison(headers, rows, tmp_path / "compared.md").read_text(encoding="utf-8")
    check_markdown(md, {"# llmclf run comparison"}, fences=0)
    texts = rendered(md)
    assert texts[:4] == ["llmclf run comparison", "key", shown(headers[1]), headers[2]]


# ------------------------------------------------------------------------------------ labels: plots, terminal
def test_dollar_labels_are_drawn_as_plain_text():
    from llmclf.reports import plots

    labels = ["tag_$x^$", "$\\frac{1}{0}$", "a$b", "$5 $10"]
    matrix = [[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 3, 0], [0, 0, 0, 4]]
    for normalise in (False, True):
        fig = plots.confusion_figure(matrix, labels, normalise=normalise, title="t")
        fig.savefig(io.BytesIO(), format="png")  # mathtext raised on 'tag_$x^$'
        ax = fig.axes[0]
        for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
            assert [t.get_text() for t in ticks] == labels
            assert not any(t.get_parse_math() or t.get_usetex() for t in ticks)


def test_terminal_tables_show_control_characters_as_escapes():
    from llmclf.reports import console

    labels = [
        "\x1b[2J\x1b[31mred",
        "bell\x07",
        "c1\x9b31m",
        "cr\rover",
        "nl\nline",
        "rtl\u202eevil",
        "nul\x00",
    ]
    k = len(labels)
    metrics = {"accuracy": 0.5, "balanced_accuracy": 0.5, "macro_f1": 0.5, "labels": labels}
    metrics["per_class"] = {
        label: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1} for label in labels
    }
    metrics["confusion_matrix"] = [[int(i == j) for j in range(k)] for i in range(k)]
    out = console.full_report(metrics, metrics) + console.table(
        ["run\x1b]0;title\x07"], [[v] for v in labels]
    )
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]", out)
    for escaped in (
        "\\x1b[2J\\x1b[31mred",
        "bell\\x07",
        "c1\\x9b31m",
        "cr\\rover",
        "nl\\nline",
        "rtl\\u202eevil",
    ):
        assert escaped in out
    per_class = console.per_class(metrics).splitlines()
    assert len(per_class) == 3 + k  # title, header, rule, one line per class: no label broke a line


def test_report_builds_with_hostile_labels(tmp_path):
    from llmclf.reports import run_report as report

    path = synthetic_run(tmp_path / "run", HOSTILE, texts=HOSTILE_TEXTS, base=HOSTILE_BASE)
    report.build_report(path)
    md = (path / "report.md").read_text(encoding="utf-8")
    headings = {"# llmclf report: run", *(f"## {section}" for section in report.REPORT_SECTIONS)}
    check_markdown(md, headings, fences=1, images=len(PNGS))
    rendered(md, images=len(PNGS))
    page = (path / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page and "<iframe" not in page and "<img src=x" not in page
    assert page.count("<img") == len(PNGS)


# ------------------------------------------------------------------------------------ size and malformed files
def test_confusion_figure_stays_small_with_300_classes(tmp_path):
    from PIL import Image

    from llmclf.reports import plots
    from llmclf.reports import run_report as report

    labels = [f"class_{i:03d}" for i in range(300)]
    matrix = [[5 if i == j else int((i * j) % 7 == 0) for j in range(300)] for i in range(300)]
    fig = plots.confusion_figure(matrix, labels, normalise=False, title="t")
    assert max(fig.get_size_inches()) <= 22  # was 211 inches a side: ~2 GB of pixels
    assert not fig.axes[0].texts and not fig.axes[0].get_xticklabels()  # unreadable at this size: left out
    path = synthetic_run(tmp_path / "run", labels)
    report.build_report(path)
    for name in PNGS:
        assert (path / name).stat().st_size < 3_000_000, name
        with Image.open(path / name) as image:
            assert max(image.size) <= 22 * plots.DPI, (name, image.size)
    md = (path / "report.md").read_text(encoding="utf-8")
    assert "300 classes: cell values and class names left out" in md  # the image's caption
    assert "With 300 classes the cells carry no values" in md  # and the text above the images


BOMB = "".join(
    [
        "a: &a [x, x, x, x, x, x, x, x, x, x]\n",
        *(f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcd", "bcde")),
        "model:\n  name: [" + ", ".join(["*e"] * 10) + "]\n",  # 10^6 values from 600 bytes
    ]
)


def test_a_config_expanding_through_yaml_aliases_is_refused(tmp_path, capsys):
    a = synthetic_run(tmp_path / "a", ["x", "y"], config_text=BOMB)
    b = synthetic_run(tmp_path / "b", ["x", "y"])
    assert main(["report", str(a)]) == 2
    assert "config.yaml" in capsys.readouterr().err and not (a / "report.md").exists()
    assert main(["compare", str(a), str(b)]) == 2
    assert "aliases" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, content",
    [
        ("metrics.json", b"{not json"),
        ("metrics.json", b'{"before": {}}'),
        ("labels.json", b'{"x": 1}'),
        ("config.yaml", b"- a list\n"),
        ("run_info.json", b"\xff\xfe not utf-8"),
        ("data_summary.json", b"[1, 2]"),
    ],
)
def test_a_malformed_file_is_an_error_naming_it(tmp_path, capsys, name, content):
    path = synthetic_run(tmp_path / "run", ["x", "y"])
    (path / name).write_bytes(content)
    assert main(["report", str(path)]) == 2
    assert name in capsys.readouterr().err
    assert not (path / "report.md").exists()
