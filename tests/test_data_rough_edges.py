"""Data rough edges (#19, items 1, 6 and 9): text and label columns inside nested JSON objects and
Parquet structs, a column of objects chosen as text, messages that name the flag of the command at hand,
and evaluation labels that differ from the training labels only in case."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from conftest import read_demo_rows
from llmclf.data import clean_frame, load_splits, read_table
from llmclf.errors import LlmclfError

ROWS = read_demo_rows()[:80]


def nested_jsonl(path, rows=ROWS):
    """Tickets as a support tool exports them: the text and the label inside objects."""
    with path.open("w", encoding="utf-8") as handle:
        for i, r in enumerate(rows):
            record = {
                "ticket": {"body": r["text"], "meta": {"id": i, "lang": "en"}},
                "triage": {"topic": r["label"]},
            }
            handle.write(json.dumps(record) + "\n")
    return path


def frame_of(path):
    return next(iter(read_table(str(path)).frames.values()))


def test_dotted_columns_reach_into_jsonl_objects_for_training(tmp_path):
    path = nested_jsonl(tmp_path / "tickets.jsonl")
    splits = load_splits(str(path), "ticket.body", "triage.topic", val_fraction=0.1, test_fraction=0.1)
    got = pd.concat([splits.train, splits.val, splits.test])
    by_row = dict(zip(got["row"], zip(got["text"], got["label"])))
    assert len(by_row) == len(ROWS)
    for row, (text, label) in by_row.items():
        assert (text, label) == (ROWS[row - 1]["text"], ROWS[row - 1]["label"])  # the field, not a repr
    assert splits.labels == sorted({r["label"] for r in ROWS})


def test_dotted_columns_reach_into_parquet_structs(tmp_path):
    structs = pd.DataFrame(
        {
            "doc": [{"title": f"t{i}", "body": r["text"]} for i, r in enumerate(ROWS)],
            "meta": [{"gold": {"label": r["label"]}} for r in ROWS],
        }
    )
    structs.to_parquet(tmp_path / "docs.parquet")
    got = clean_frame(frame_of(tmp_path / "docs.parquet"), "docs.parquet", "doc.body", "meta.gold.label")
    assert got["text"].tolist() == [r["text"] for r in ROWS]
    assert got["label"].tolist() == [r["label"] for r in ROWS]


def test_a_column_of_objects_chosen_as_text_names_the_fields_to_choose(tmp_path):
    path = nested_jsonl(tmp_path / "tickets.jsonl")
    with pytest.raises(LlmclfError) as err:
        load_splits(str(path), "ticket", "triage.topic")
    msg = str(err.value)
    assert str(path) in msg and "column 'ticket'" in msg  # the file and the column
    assert "ticket.body" in msg and "ticket.meta.id" in msg  # the nested keys to choose from
    assert "--text-column ticket.body" in msg  # the fix, with the field that holds text
    with pytest.raises(LlmclfError) as err:
        load_splits(str(path), "ticket.body", "triage")
    assert "column 'triage'" in str(err.value) and "--label-column triage.topic" in str(err.value)


def test_a_column_of_lists_is_not_text(tmp_path):
    path = tmp_path / "tags.jsonl"
    path.write_text("".join(json.dumps({"text": ["a", "b"], "label": "x"}) + "\n" for _ in range(4)))
    with pytest.raises(LlmclfError, match=r"column 'text' holds lists, not text \(row\(s\) 1, 2, 3, 4\)"):
        clean_frame(frame_of(path), str(path), "text", "label")


def test_an_unknown_field_lists_the_fields_there_are(tmp_path):
    path = nested_jsonl(tmp_path / "tickets.jsonl")
    with pytest.raises(LlmclfError) as err:
        load_splits(str(path), "ticket.text", "triage.topic")
    msg = str(err.value)
    assert "['ticket.text'] not found" in msg and "['ticket', 'triage']" in msg
    assert "ticket.body" in msg and "triage.topic" in msg


def test_a_row_without_the_field_is_a_missing_text_at_its_row(tmp_path):
    path = nested_jsonl(tmp_path / "tickets.jsonl")
    lines = path.read_text().splitlines()
    lines[4] = json.dumps({"ticket": {"meta": {"id": 4}}, "triage": {"topic": "World"}})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        LlmclfError, match=r"1 empty or missing text\(s\) in column 'ticket.body' at row\(s\) 5"
    ):
        load_splits(str(path), "ticket.body", "triage.topic")


def test_a_column_whose_name_has_a_dot_is_still_that_column(tmp_path):
    path = tmp_path / "dotted.csv"
    pd.DataFrame({"body.text": [r["text"] for r in ROWS], "label": [r["label"] for r in ROWS]}).to_csv(
        path, index=False
    )
    got = clean_frame(frame_of(path), str(path), "body.text", "label")
    assert got["text"].tolist() == [r["text"] for r in ROWS]


def test_the_column_message_names_only_the_flags_asked_for(tmp_path):
    path = tmp_path / "plain.csv"
    pd.DataFrame({"body": ["a", "b"]}).to_csv(path, index=False)
    with pytest.raises(LlmclfError) as err:  # predict: a text column only
        clean_frame(frame_of(path), str(path), "text", None)
    assert "--text-column" in str(err.value) and "--label-column" not in str(err.value)
    with pytest.raises(LlmclfError) as err:
        clean_frame(frame_of(path), str(path), "body", "label")
    assert "['label'] not found" in str(err.value) and "--label-column" in str(err.value)
    assert "--text-column" not in str(err.value)


def test_evaluation_labels_differing_only_in_case_say_so(tmp_path):
    train = tmp_path / "train.csv"
    pd.DataFrame({"text": [r["text"] for r in ROWS], "label": [r["label"] for r in ROWS]}).to_csv(
        train, index=False
    )
    evaluation = tmp_path / "eval.csv"
    pd.DataFrame({"text": ["a new text", "another one"], "label": ["business", " World "]}).to_csv(
        evaluation, index=False
    )
    with pytest.raises(LlmclfError) as err:
        load_splits(str(train), "text", "label", eval_data=str(evaluation))
    msg = str(err.value)
    assert "never seen in training: ['business']" in msg
    assert "Only case or spaces differ ({'business': 'Business'})" in msg


def _labelled(labels):
    return pd.DataFrame({"text": [f"text number {i}" for i in range(len(labels))], "label": labels})


@pytest.mark.parametrize(
    "labels",
    [
        [f"{0.5 * (i % 10):.1f}" for i in range(200)],  # half-star ratings: 10 fractional classes
        [i % 77 for i in range(300)],  # many integer class ids (banking77)
        ["Science, Technology", "Sports", "World"] * 20,  # a comma inside a class name, parts not alone
        ["a|b", "a", "c"] * 20,  # "b" never occurs alone
    ],
    ids=["few fractional classes", "77 integer ids", "comma in a name", "part not alone"],
)
def test_labels_that_are_classes_pass(labels):
    out = clean_frame(_labelled(labels), "d.csv", "text", "label")
    assert len(out) == len(labels) and out["label"].nunique() == len(set(labels))


def test_scores_in_memory_name_the_frame_index():
    frame = _labelled([i / 7 for i in range(60)])
    frame.index = [f"r{i}" for i in range(60)]
    with pytest.raises(LlmclfError, match=r"60 distinct numbers.*index r1, r2, r3.*label_column="):
        clean_frame(frame, "frame", "text", "label", in_memory=True)


@pytest.mark.parametrize("sep", [",", ";", "|"])
def test_joined_labels_are_named_with_their_separator(sep):
    frame = _labelled(["pos", "neg", f"pos{sep} neg", "neg"] * 5)
    with pytest.raises(
        LlmclfError, match=rf"1 label\(s\) such as 'pos{re.escape(sep)} neg' \(at row\(s\) 3\)"
    ):
        clean_frame(frame, "d.csv", "text", "label")
