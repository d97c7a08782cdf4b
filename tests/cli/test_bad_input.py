"""Malformed inputs through the real command line: `llmclf train`, `evaluate` and `predict`.

Each must end with exit status 2 and one paragraph starting with `error:` that names the file, row or
column (or key) and the fix, never a traceback; predict never loses a valid row.
"""

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import read_demo_rows
from llmclf.cli import main
from llmclf.data import clean_frame, read_table

GOOD = read_demo_rows()[:120]


def csv_text(rows, fields=("text", "label")):
    lines = [",".join(fields)]
    for r in rows:
        lines.append(",".join('"' + str(r[f]).replace('"', '""') + '"' for f in fields))
    return "\n".join(lines) + "\n"


def with_rows(changes):
    rows = [dict(r) for r in GOOD]
    for i, row in changes.items():
        rows[i] = {**rows[i], **row}
    return csv_text(rows).encode()


# name -> (file name or None for "not created", content, needles in the message)
FILES = {
    "missing file": ("absent.csv", None, ["not found", "absent.csv"]),
    "binary garbage csv": (
        "garbage.csv",
        b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x80" * 40,
        ["not valid UTF-8", "line 1"],
    ),
    "not parquet": (
        "fake.parquet",
        b"text,label\nhello,a\n",
        ["fake.parquet", "could not be read as PARQUET"],
    ),
    "unknown extension": ("data.xlsx", b"PK\x03\x04", ["unreadable format '.xlsx'", "Supported"]),
    "non-utf8 line": ("latin.csv", csv_text(GOOD[:5]).encode() + b'"caf\xe9",World\n', ["line 7", "UTF-8"]),
    "ragged csv": ("ragged.csv", csv_text(GOOD[:5]).encode() + b"a,b,c,d\n", ["ragged.csv", "line 7"]),
    "broken jsonl": (
        "broken.jsonl",
        b'{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", "label": \n',
        ["line 3", "not valid JSON"],
    ),
    "empty file": ("empty.csv", b"", ["empty.csv is empty"]),
    "whitespace-only file": ("blank.jsonl", b"\n  \n", ["blank.jsonl is empty"]),
    "header only": ("header.csv", b"text,label\n", ["no data rows", "['text', 'label']"]),
    "missing text column": (
        "cols.csv",
        csv_text(GOOD, ("label",)).encode(),
        ["['text'] not found", "['label']"],
    ),
    "empty text": ("emptytext.csv", with_rows({3: {"text": "  "}}), ["row(s) 4", "--drop-invalid"]),
}
LABEL_FILES = {
    "missing label column": ("nolabel.csv", csv_text(GOOD, ("text",)).encode(), ["['label'] not found"]),
    "missing label": ("nolab.csv", with_rows({7: {"label": ""}}), ["missing label", "row(s) 8"]),
    "short ragged row": ("short.csv", csv_text(GOOD[:20]).encode() + b'"only a text"\n', ["row(s) 21"]),
    "scores as labels": (
        "scores.csv",
        csv_text([{**r, "label": f"{(i * 0.37) % 5:.2f}"} for i, r in enumerate(GOOD)]).encode(),
        [
            "column 'label' holds 1",
            "distinct numbers (e.g.",
            "--task regression",
            "0.37, 0.74",
            "row(s) 2, 3",
            "bin the scores",
        ],
    ),
    "several labels per text": (
        "multi.csv",
        with_rows({5: {"label": "World,Sports"}}),
        ["'World,Sports'", "row(s) 6", "['World', 'Sports']", "--task multi-label", "--label-separator ','"],
    ),
}


def make(tmp_path, spec):
    name, content, needles = spec
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    return path, needles


def error_paragraph(err: str) -> str:
    """The `error:` paragraph that ends stderr (notes logged before it stay above it)."""
    start = ("\n" + err).rfind("\nerror: ")
    assert start >= 0, err
    return err[start:]


def check_error(code, err, needles):
    assert code == 2, err
    assert "Traceback" not in err, err
    error = error_paragraph(err)
    assert "\n\n" not in error.strip(), err  # one paragraph
    for needle in needles:
        assert needle in error, (needle, err)


@pytest.mark.parametrize("case", [*FILES, *LABEL_FILES])
def test_train_refuses_bad_data(case, tmp_path, tiny_model_dir, capsys):
    path, needles = make(tmp_path, {**FILES, **LABEL_FILES}[case])
    code = main(
        ["train", "--data", str(path), "--model", str(tiny_model_dir), "--output", str(tmp_path / "o")]
    )
    check_error(code, capsys.readouterr().err, needles)
    assert not (tmp_path / "o" / "adapter").exists()


@pytest.mark.parametrize("case", [*FILES, *LABEL_FILES])
def test_evaluate_refuses_bad_data(case, tmp_path, trained_run, capsys):
    path, needles = make(tmp_path, {**FILES, **LABEL_FILES}[case])
    code = main(
        ["--quiet", "evaluate", str(trained_run), "--data", str(path), "--output", str(tmp_path / "m.json")]
    )
    check_error(code, capsys.readouterr().err, needles)
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("case", list(FILES))
def test_predict_refuses_bad_data(case, tmp_path, trained_run, capsys):
    path, needles = make(tmp_path, FILES[case])
    out = tmp_path / "out.csv"
    code = main(["--quiet", "predict", str(trained_run), "--input", str(path), "--output", str(out)])
    check_error(code, capsys.readouterr().err, needles)
    assert not out.exists()


def small_labelled(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text(csv_text(rows), encoding="utf-8")
    return path


CLASS_CASES = {
    "single class": (
        lambda: [r for r in GOOD if r["label"] == "World"],
        [],
        ["only one class (World)", "--label-column"],
    ),
    "too few for the per-class sizes": (
        lambda: GOOD,
        ["--train-per-class", "25", "--val-per-class", "5", "--test-per-class", "5"],
        ["35 examples per class requested", "'Business' has 24", "'World' has 31"],
    ),
}


@pytest.mark.parametrize("case", list(CLASS_CASES))
def test_train_refuses_bad_classes(case, tmp_path, tiny_model_dir, capsys):
    rows, extra, needles = CLASS_CASES[case]
    path = small_labelled(tmp_path, "d.csv", rows())
    code = main(
        [
            "train",
            "--data",
            str(path),
            "--model",
            str(tiny_model_dir),
            "--output",
            str(tmp_path / "o"),
            *extra,
        ]
    )
    check_error(code, capsys.readouterr().err, needles)


def test_train_refuses_unseen_labels_in_eval_data(tmp_path, tiny_model_dir, capsys):
    train = small_labelled(tmp_path, "train.csv", GOOD)
    evaluation = small_labelled(
        tmp_path, "eval.csv", [*read_demo_rows()[200:220], {"text": "Sun", "label": "Weather"}]
    )
    code = main(
        [
            "train",
            "--data",
            str(train),
            "--eval-data",
            str(evaluation),
            "--model",
            str(tiny_model_dir),
            "--output",
            str(tmp_path / "o"),
        ]
    )
    check_error(code, capsys.readouterr().err, ["never seen in training: ['Weather']"])


CONFIG_CASES = {
    "yaml bad choice": ({"model": {"quantize": "8bit"}}, [], ["model.quantize='8bit'", "auto, 4bit, none"]),
    "yaml bad number": ({"train": {"lr": "fast"}}, [], ["train.lr='fast'", "a number in"]),
    "yaml bad type": ({"train": {"keep_checkpoint": "yes"}}, [], ["train.keep_checkpoint", "true, false"]),
    "yaml unknown key": ({"train": {"learning_rate": 1}}, [], ["['learning_rate']", "allowed are"]),
    "yaml not a mapping": ("just a string", [], ["must hold a mapping"]),
    "flag bad choice": ({}, ["--quantize", "8bit"], ["--quantize", "invalid choice", "4bit"]),
    "flag not a number": ({}, ["--lr", "fast"], ["--lr", "invalid float value: 'fast'"]),
    "flag out of range": ({}, ["--lr", "-1"], ["train.lr=-1.0", "a number in (0.0, 1.0]", "flag --lr"]),
    "flag zero batch": (
        {},
        ["--batch-size", "0"],
        ["train.batch_size=0", "a whole number > 0", "flag --batch-size"],
    ),
    "unknown flag": ({}, ["--learning-rate", "1"], ["unrecognized arguments: --learning-rate"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_invalid_config_names_the_key_and_the_allowed_values(case, tmp_path, capsys):
    overlay, flags, needles = CONFIG_CASES[case]
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(overlay))
    try:
        code = main(["train", "--config", str(config), "--output", str(tmp_path / "o"), *flags])
    except SystemExit as exc:  # argparse: usage errors end at parse time, with the same form
        code = exc.code
    check_error(code, capsys.readouterr().err, needles)


def test_predict_with_drop_invalid_keeps_every_row_in_order(tmp_path, trained_run, capsys):
    rows = [{"id": i, "text": r["text"]} for i, r in enumerate(GOOD[:30])]
    for i in (0, 7, 29):
        rows[i]["text"] = " " if i != 7 else ""
    src = tmp_path / "in.csv"
    pd.DataFrame(rows).to_csv(src, index=False)
    out = tmp_path / "out.csv"
    code = main(["--quiet", "predict", str(trained_run), "--input", str(src), "--output", str(out)])
    check_error(code, capsys.readouterr().err, ["3 empty or missing text(s)", "row(s) 1, 8, 30"])
    assert not out.exists()

    code = main(
        ["--quiet", "predict", str(trained_run), "--input", str(src), "--output", str(out), "--drop-invalid"]
    )
    assert code == 0
    assert "left unlabelled 3 invalid row(s)" in capsys.readouterr().err
    got = pd.read_csv(out, keep_default_na=False)
    assert len(got) == 30 and got["id"].tolist() == list(range(30))
    unlabelled = got.index[got["label"] == ""].tolist()
    assert unlabelled == [0, 7, 29]
    labels = json.loads((trained_run / "labels.json").read_text())
    assert set(got.drop(index=unlabelled)["label"]) <= set(labels)
    assert (got.loc[unlabelled, [f"prob_{lab}" for lab in labels]] == "").all().all()


def test_long_texts_are_reported_as_truncated(tmp_path, trained_run, capsys):
    rows = [
        {"text": r["text"] * 5 if i < 4 else f"short {i}", "label": r["label"]}
        for i, r in enumerate(GOOD[:10])
    ]
    src = small_labelled(tmp_path, "long.csv", rows)
    assert (
        main(
            [
                "--quiet",
                "evaluate",
                str(trained_run),
                "--data",
                str(src),
                "--output",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    assert "4 text(s) longer than 64 tokens truncated" in capsys.readouterr().err
    pd.DataFrame({"text": [r["text"] for r in rows]}).to_csv(tmp_path / "p.csv", index=False)
    assert (
        main(
            [
                "--quiet",
                "predict",
                str(trained_run),
                "--input",
                str(tmp_path / "p.csv"),
                "--output",
                str(tmp_path / "o.csv"),
            ]
        )
        == 0
    )
    assert "4 text(s) longer than 64 tokens truncated" in capsys.readouterr().err


def test_label_types_map_to_one_class(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_text("text,label\na,1\nb,1.0\nc,2\nd,2.00\ne,10\n", encoding="utf-8")
    got = clean_frame(read_table(str(path)).frames["all"], "f", "text", "label")
    assert got["label"].tolist() == ["1", "1", "2", "2", "10"]


def test_subprocess_errors_have_no_traceback(tmp_path, trained_run):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "a"}\n{oops\n')
    for args in (
        ["evaluate", str(trained_run), "--data", str(bad)],
        ["predict", str(trained_run), "--input", str(bad), "--output", str(tmp_path / "o.csv")],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "llmclf", "--quiet", *args], capture_output=True, text=True, timeout=300
        )
        check_error(proc.returncode, proc.stderr, ["line 2", "bad.jsonl"])


def test_an_error_quoting_data_shows_control_characters_as_escapes(tmp_path, capsys):
    missing = tmp_path / "news\x1b[2J\x07.csv"  # a file name that would clear the screen and ring
    assert main(["train", "--data", str(missing), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err
    assert "news\\x1b[2J\\x07.csv" in err


def test_texts_with_carriage_returns_survive_the_written_csv(tmp_path, trained_run):
    frame = pd.DataFrame({"text": ["Stocks fell\rsharply", "A late goal\r\nwon it", "plain"]})
    frame.to_csv(tmp_path / "in.csv", index=False, lineterminator="\r\n")  # quoted: a valid CSV input
    out = tmp_path / "out.csv"
    assert main(["--quiet", "predict", str(trained_run), "--input", str(tmp_path / "in.csv"), "--output", str(out)]) == 0
    back = pd.read_csv(out, keep_default_na=False)
    assert back["text"].tolist() == frame["text"].tolist()  # a bare \r used to split its row in two
