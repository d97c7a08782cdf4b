import json

import numpy as np
import pandas as pd
import pytest

from conftest import read_demo_rows, write_csv
from llmclf.data import (
    class_weights,
    clean_frame,
    load_splits,
    order_labels,
    read_table,
    split_data,
    tokenize_texts,
)
from llmclf.errors import LlmclfError


def frame(n_per_class: dict[str, int]) -> pd.DataFrame:
    rows = [(f"{label} text number {i}", label) for label, n in n_per_class.items() for i in range(n)]
    return pd.DataFrame(
        {"text": [t for t, _ in rows], "label": [lab for _, lab in rows], "row": np.arange(1, len(rows) + 1)}
    )


def test_all_formats_read_the_same_rows(tmp_path, small_csv):
    expected = pd.read_csv(small_csv, dtype=str, keep_default_na=False)
    expected.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    expected.to_parquet(tmp_path / "d.parquet")
    import datasets

    datasets.Dataset.from_pandas(expected).save_to_disk(str(tmp_path / "saved"))
    for spec in (small_csv, tmp_path / "d.jsonl", tmp_path / "d.parquet", tmp_path / "saved"):
        got = clean_frame(next(iter(read_table(str(spec)).frames.values())), str(spec), "text", "label")
        assert got["text"].tolist() == expected["text"].tolist()
        assert got["label"].tolist() == expected["label"].tolist()


def test_missing_column_lists_the_columns(small_csv):
    with pytest.raises(LlmclfError) as err:
        load_splits(str(small_csv), "content", "label")
    assert "['content']" in str(err.value) and "['id', 'text', 'label']" in str(err.value)


def test_empty_texts_and_missing_labels_name_rows_and_drop_only_on_request(tmp_path):
    rows = [{"text": f"t{i}", "label": "a" if i % 2 else "b"} for i in range(20)]
    rows[2]["text"] = "   "
    rows[5]["label"] = ""
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(LlmclfError) as err:
        load_splits(str(path), "text", "label")
    msg = str(err.value)
    assert "row(s) 3" in msg and "row(s) 6" in msg and "--drop-invalid" in msg and str(path) in msg
    splits = load_splits(str(path), "text", "label", drop_invalid=True)
    assert sum(len(s) for s in (splits.train, splits.val, splits.test)) == 18
    assert any("dropped 2 invalid row(s)" in n for n in splits.notes)


def test_nan_like_strings_are_texts_not_missing(tmp_path):
    path = write_csv(tmp_path / "na.csv", [{"text": "NA", "label": "x"}, {"text": "nan", "label": "y"}])
    got = clean_frame(read_table(str(path)).frames["all"], "f", "text", "label")
    assert got["text"].tolist() == ["NA", "nan"]


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"text,label\nfine,a\ncaf\xe9 au lait,b\n")
    with pytest.raises(LlmclfError, match=r"line 3 is not valid UTF-8"):
        read_table(str(path))


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(LlmclfError, match="unreadable format '.xlsx'"):
        read_table(str(tmp_path / "data.xlsx"))
    with pytest.raises(LlmclfError, match="Data file not found"):
        read_table(str(tmp_path / "missing.csv"))


def test_mixed_label_types_get_one_mapping(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [{"text": f"text {i}", "label": [1, "1", 2.0, "2", 10][i % 5]} for i in range(50)]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    splits = load_splits(str(path), "text", "label")
    assert splits.labels == ["1", "2", "10"]  # numeric order, one name per class


def test_label_order():
    assert order_labels({"10", "2", "1"}) == ["1", "2", "10"]
    assert order_labels({"b", "a"}) == ["a", "b"]
    assert order_labels({"Sports", "World"}, ["World", "Sports", "Business"]) == ["World", "Sports"]


def test_per_class_sampling_is_exact_disjoint_and_seeded():
    pool = frame({"a": 50, "b": 30, "c": 40})
    kwargs = dict(source="t", labels=["a", "b", "c"], train_per_class=10, val_per_class=3, test_per_class=5)
    s1, s2 = split_data(pool, seed=1, **kwargs), split_data(pool, seed=1, **kwargs)
    assert s1.counts() == {
        "train": {"a": 10, "b": 10, "c": 10},
        "val": {"a": 3, "b": 3, "c": 3},
        "test": {"a": 5, "b": 5, "c": 5},
    }
    texts = [set(s.text) for s in (s1.train, s1.val, s1.test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert s1.train["text"].tolist() == s2.train["text"].tolist()
    assert s1.train["text"].tolist() != split_data(pool, seed=2, **kwargs).train["text"].tolist()
    assert s1.train["label"].tolist() != sorted(s1.train["label"])  # shuffled, not grouped by class


def test_fraction_split_is_stratified():
    s = split_data(frame({"a": 100, "b": 20}), source="t", labels=["a", "b"], seed=0)
    assert s.counts() == {"train": {"a": 80, "b": 16}, "val": {"a": 10, "b": 2}, "test": {"a": 10, "b": 2}}


def test_too_few_examples_names_the_class():
    with pytest.raises(LlmclfError) as err:
        split_data(
            frame({"a": 50, "b": 7}),
            source="f.csv",
            labels=["a", "b"],
            train_per_class=5,
            val_per_class=2,
            test_per_class=2,
        )
    assert "'b' has 7" in str(err.value) and "9 examples per class" in str(err.value)


def test_single_class_is_refused():
    with pytest.raises(LlmclfError, match="only one class"):
        split_data(frame({"a": 10}), source="f", labels=["a"])


def test_duplicates_are_removed_and_counted():
    pool = frame({"a": 30, "b": 30})
    pool = pd.concat([pool, pool.iloc[:5].assign(label="b")])  # 5 duplicates with conflicting labels
    s = split_data(pool, source="f", labels=["a", "b"], seed=0)
    assert sum(len(x) for x in (s.train, s.val, s.test)) == 60
    assert any("removed 5 duplicate text(s)" in n and "5 had conflicting labels" in n for n in s.notes)


def test_eval_data_is_the_test_split(tmp_path):
    rows = read_demo_rows()
    train_rows, eval_rows = rows[:300], rows[300:]
    eval_rows = eval_rows + train_rows[:3]  # 3 texts also in training: removed from test, counted
    train_path = write_csv(tmp_path / "train.csv", train_rows)
    eval_path = write_csv(tmp_path / "eval.csv", eval_rows)
    s = load_splits(str(train_path), "text", "label", eval_data=str(eval_path), val_fraction=0.1)
    assert len(s.test) == len(rows) - 300
    assert not set(s.test.text) & (set(s.train.text) | set(s.val.text))
    assert any("removed 3 text(s)" in n for n in s.notes)
    write_csv(tmp_path / "eval2.csv", [{"text": "new", "label": "Weather"}, *eval_rows])
    with pytest.raises(LlmclfError, match=r"never seen in training: \['Weather'\]"):
        load_splits(str(train_path), "text", "label", eval_data=str(tmp_path / "eval2.csv"))


def test_dataset_with_own_splits_uses_its_test_split(tmp_path):
    import datasets

    rows = read_demo_rows()
    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:400]),
            "test": datasets.Dataset.from_list(rows[400:]),
        }
    )
    ds = ds.class_encode_column("label")
    ds.save_to_disk(str(tmp_path / "dd"))
    s = load_splits(str(tmp_path / "dd"), "text", "label")
    assert len(s.test) == 80 and len(s.train) + len(s.val) == 400
    assert set(s.labels) == {"World", "Sports", "Business", "Sci/Tech"}  # ClassLabel names, not 0..3


def test_class_weights_are_normalised_inverse_frequency():
    w = class_weights(["a"] * 30 + ["b"] * 10, ["a", "b"])
    assert w == pytest.approx([0.25, 0.75])
    assert class_weights(["a", "b", "c"] * 5, ["a", "b", "c"]) == pytest.approx([1 / 3] * 3)


def test_truncation_is_counted(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, n = tokenize_texts(tok, ["short", "a much longer text " * 20], max_length=10)
    assert n == 1 and len(ids[1]) == 10 and len(ids[0]) < 10


def test_hub_dataset_failure_is_explained(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LlmclfError, match="neither a local file nor a dataset"):
        read_table("some_user/news")
