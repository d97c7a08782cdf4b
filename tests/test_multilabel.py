"""Multi-label (`--task multi-label`): any number of labels per text, through train -> reload -> predict /
evaluate -> serve -> export -> plain transformers' pipeline(), on the tiny model; and the bad input it
refuses."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import FRACTION_ARGS, read_demo_rows, write_csv
from llmclf.cli import main
from llmclf.data import load_splits
from llmclf.errors import LlmclfError
from llmclf.inference.classifier import Classifier
from llmclf.inference.metrics import multilabel_metrics
from llmclf.labelsets import pos_weights, split_label_sets, tune_thresholds
from llmclf.training.probe import init_head_from_label_probes
from llmclf.training.trainer import WeightedLossTrainer, split_batch

SEP = "|"
MULTI = ("--task", "multi-label", "--label-column", "topics", "--label-separator", SEP)


def topic_rows(n: int = 400, seed: int = 0) -> list[dict]:
    """Two demo texts joined, labelled with both their topics (one label where they share it)."""
    rows = read_demo_rows()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(rows, 2)
        out.append({"text": f"{a['text']} {b['text']}", "topics": SEP.join(sorted({a["label"], b["label"]}))})
    return out


def fraction_args() -> list[str]:
    """The shared small settings without the per-class sizes (multi-label splits by fractions)."""
    return FRACTION_ARGS + ["--max-length", "96", "--val-fraction", "0.15", "--test-fraction", "0.15"]


@pytest.fixture(scope="module")
def topics_csv(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("topics") / "topics.csv", topic_rows(), ["text", "topics"])


@pytest.fixture(scope="module")
def topics_run(topics_csv, tiny_model_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("topics-run") / "run"
    argv = [
        "--quiet",
        "train",
        "--data",
        str(topics_csv),
        "--model",
        str(tiny_model_dir),
        "--output",
        str(run),
    ]
    assert main([*argv, *fraction_args(), *MULTI]) == 0
    return run


@pytest.fixture(scope="module")
def clf(topics_run) -> Classifier:
    return Classifier.load(topics_run)


def saved(run):
    preds = pd.read_csv(run / "predictions_test.csv", keep_default_na=False)
    labels = json.loads((run / "labels.json").read_text())
    return preds, labels, preds[[f"prob_{label}" for label in labels]].to_numpy()


def test_a_multi_label_run_writes_label_sets_thresholds_and_its_metrics(topics_run):
    metrics = json.loads((topics_run / "metrics.json").read_text())
    keys = {"n", "micro_f1", "macro_f1", "subset_accuracy", "hamming_loss", "per_label"}
    assert keys <= set(metrics["before"]) and keys <= set(metrics["after"])
    preds, labels, probs = saved(topics_run)
    assert labels == ["Business", "Sci/Tech", "Sports", "World"]
    info = json.loads((topics_run / "run_info.json").read_text())
    assert info["task"] == "multi-label" and set(info["thresholds"]) == set(labels)
    assert all(0 < t < 1 for t in info["thresholds"].values())
    # the written predictions are each probability against its label's threshold, joined by the separator
    limits = np.array([info["thresholds"][label] for label in labels])
    want = [SEP.join(np.array(labels)[row >= limits]) for row in probs]
    assert preds["predicted"].tolist() == want
    truth = np.array([[label in set(t.split(SEP)) for label in labels] for t in preds["label"]])
    again = multilabel_metrics(truth, probs >= limits, labels)
    assert again["micro_f1"] == pytest.approx(metrics["after"]["micro_f1"])
    assert metrics["after"]["micro_f1"] > metrics["before"]["micro_f1"]
    summary = json.loads((topics_run / "data_summary.json").read_text())
    assert set(summary["pos_weights"]) == set(labels) and summary["class_weights"] is None
    for split in ("train", "val", "test"):  # every label in every split
        assert all(n > 0 for n in summary["counts"][split].values())


def test_a_multi_label_run_reloads_to_its_probabilities_and_labels(topics_run, clf):
    preds, labels, probs = saved(topics_run)
    texts = preds["text"].tolist()
    assert clf.predict_proba(texts) == pytest.approx(probs, abs=1e-5)
    assert [SEP.join(p) for p in clf.predict(texts)] == preds["predicted"].tolist()
    metrics, _ = clf.evaluate(texts, [t.split(SEP) for t in preds["label"]])
    saved_after = json.loads((topics_run / "metrics.json").read_text())["after"]
    assert metrics["micro_f1"] == pytest.approx(saved_after["micro_f1"])
    with pytest.raises(LlmclfError, match="not known to this classifier"):
        clf.evaluate(texts[:1], [["Weather"]])


def test_the_command_line_predicts_and_evaluates_label_sets(topics_run, tmp_path, capsys):
    preds, labels, probs = saved(topics_run)
    data = tmp_path / "in.csv"
    preds[["text", "label"]].rename(columns={"label": "topics"}).to_csv(data, index=False)
    out = tmp_path / "out.csv"
    assert main(["--quiet", "predict", str(topics_run), "--input", str(data), "--output", str(out)]) == 0
    written = pd.read_csv(out, keep_default_na=False)
    assert written["label"].tolist() == preds["predicted"].tolist()
    assert written[[f"prob_{label}" for label in labels]].to_numpy() == pytest.approx(probs, abs=1e-5)
    capsys.readouterr()
    assert main(["--quiet", "predict", str(topics_run), "--text", preds["text"][0]]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert SEP.join(line["labels"]) == preds["predicted"][0] and set(line["probabilities"]) == set(labels)
    report = tmp_path / "eval.json"
    assert main(["--quiet", "evaluate", str(topics_run), "--data", str(data), "--output", str(report)]) == 0
    after = json.loads((topics_run / "metrics.json").read_text())["after"]
    assert json.loads(report.read_text())["micro_f1"] == pytest.approx(after["micro_f1"])
    bad = tmp_path / "bad.csv"
    bad.write_text(f"text,topics\nfine,Sports{SEP}World\nother,Sports{SEP}Weather\n")
    capsys.readouterr()
    assert main(["--quiet", "evaluate", str(topics_run), "--data", str(bad)]) != 0
    assert "'Weather'" in capsys.readouterr().err


def test_the_server_answers_with_label_sets(clf):
    from fastapi.testclient import TestClient

    from llmclf.serve.app import ServeOptions, create_app
    from llmclf.serve.batcher import ClassifierPredictor

    options = ServeOptions(max_texts=8, max_length=clf.max_length)
    app = create_app(clf.labels, ClassifierPredictor(clf, clf.max_length, 80.0), options)
    texts = ["Stocks fell after the report. The team won the final.", "Rain is due in the north."]
    want_probs, want_labels = clf.predict_proba(texts), clf.predict(texts)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for _ in range(500):
            if client.get("/health").status_code == 200:
                break
        got = client.post("/classify", json={"texts": texts}).json()["predictions"]
        assert [p["labels"] for p in got] == want_labels
        assert [got[0]["probabilities"][label] for label in clf.labels] == pytest.approx(
            want_probs[0].tolist(), abs=1e-5
        )
        sig = client.post(
            "/predict", json={"inputs": texts[0], "parameters": {"function_to_apply": "sigmoid"}}
        )
        assert sig.status_code == 200 and len(sig.json()) == len(clf.labels)
        soft = client.post(
            "/predict", json={"inputs": texts[0], "parameters": {"function_to_apply": "softmax"}}
        )
        assert soft.status_code == 422 and "sigmoid" in soft.json()["message"]


def test_the_export_applies_a_sigmoid_in_plain_transformers(topics_run, clf, tmp_path):
    preds, labels, probs = saved(topics_run)
    texts = preds["text"].tolist()[:5]
    export = tmp_path / "export"
    assert main(["--quiet", "export", str(topics_run), "--output", str(export)]) == 0
    assert json.loads((export / "config.json").read_text())["problem_type"] == "multi_label_classification"
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["llmclf"] = None
        from transformers import pipeline
        clf = pipeline("text-classification", model={str(export)!r}, top_k=None)
        json.dump(clf(json.loads(sys.argv[1]), truncation=True), open({str(tmp_path / "p.json")!r}, "w"))
    """)
    subprocess.run([sys.executable, "-c", script, json.dumps(texts)], check=True, timeout=300)
    got = json.loads((tmp_path / "p.json").read_text())
    for row, ranked in zip(probs[:5], got, strict=True):
        scores = {r["label"]: r["score"] for r in ranked}  # sigmoid per label: they need not sum to 1
        assert [scores[label] for label in labels] == pytest.approx(row.tolist(), abs=1e-4)


# ------------------------------------------------------------------------------------------ bad input
def test_label_lists_are_read_from_a_separator_or_from_lists(tmp_path):
    rows = topic_rows(60)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"text": r["text"], "topics": r["topics"].split(SEP)}) for r in rows)
    )
    from_lists = load_splits(str(jsonl), "text", "topics", task="multi-label")
    csv = write_csv(tmp_path / "d.csv", rows, ["text", "topics"])
    from_text = load_splits(str(csv), "text", "topics", task="multi-label", label_separator=SEP)
    assert from_lists.labels == from_text.labels == ["Business", "Sci/Tech", "Sports", "World"]
    assert from_lists.train["label"].tolist() == from_text.train["label"].tolist()
    assert all(isinstance(labels, tuple) and labels for labels in from_text.train["label"])


def test_an_empty_label_list_and_a_separator_that_never_occurs_are_named(tmp_path):
    rows = [{"text": f"text {i}", "topics": "a,b" if i % 2 else "a"} for i in range(20)]
    rows[4]["topics"] = "a,,b"
    data = write_csv(tmp_path / "e.csv", rows, ["text", "topics"])
    with pytest.raises(LlmclfError, match=r"empty label list or an empty label .* row\(s\) 5"):
        load_splits(str(data), "text", "topics", task="multi-label")
    jsonl = tmp_path / "e.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"text": f"t {i}", "topics": ["a", "b"] if i else []}) for i in range(9))
    )
    with pytest.raises(LlmclfError, match=r"row\(s\) 1"):
        load_splits(str(jsonl), "text", "topics", task="multi-label")
    joined = write_csv(
        tmp_path / "j.csv", [{"text": f"t {i}", "topics": "a;b"} for i in range(9)], ["text", "topics"]
    )
    with pytest.raises(LlmclfError, match="--label-separator"):  # joined by ';', not the default ','
        load_splits(str(joined), "text", "topics", task="multi-label")


def test_every_label_is_kept_in_every_split_and_the_too_rare_are_named():
    rng = np.random.default_rng(0)
    sets = [("a", "b")] * 60 + [("a", "c")] * 4 + [("a", "d")] * 2
    pool = pd.DataFrame({"text": [f"t{i}" for i in range(len(sets))], "label": sets, "row": range(1, 67)})
    notes: list[str] = []
    train, val, test = split_label_sets(
        pool, ["a", "b", "c", "d"], val_fraction=0.1, test_fraction=0.1, rng=rng, notes=notes, source="s"
    )
    assert len(train) + len(val) + len(test) == len(pool)
    for part in (train, val, test):
        assert any("c" in labels for labels in part["label"])  # 4 texts: one in each split
    assert any("d" in labels for labels in train["label"])  # 2 texts: training keeps one
    assert "['d']" in notes[0] and "too few texts" in notes[0]
    weights = pos_weights(train, ["a", "b", "c", "d"], "s")
    assert weights[0] == 1.0 and weights[1] < weights[2]  # 'a' is on every text; rarer, heavier
    with pytest.raises(LlmclfError, match=r"no training text carries label\(s\) \['e'\]"):
        pos_weights(train, ["a", "e"], "s")


# ------------------------------------------------------------------------------------------- the parts
def test_thresholds_are_tuned_for_each_labels_f1():
    truth = np.array([[1, 0], [1, 0], [0, 0], [0, 1]])
    probs = np.array([[0.3, 0.9], [0.25, 0.1], [0.1, 0.2], [0.2, 0.6]])
    thresholds = tune_thresholds(probs, truth)
    assert 0.2 < thresholds[0] <= 0.25  # catches both positives (0.3, 0.25), not 0.2
    assert thresholds[1] == pytest.approx(0.6) or 0.2 < thresholds[1] <= 0.6
    assert tune_thresholds(probs, np.zeros_like(truth)) == [0.5, 0.5]  # no positive: the default


def test_the_label_probes_fit_each_label_into_its_head_row():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 8)).astype(np.float32)
    targets = np.stack([features[:, 0] > 0, features[:, 1] > 0.5, np.ones(200, bool)], axis=1).astype(float)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.score = torch.nn.Linear(8, 3, bias=False)

    model = Model()
    fitted = init_head_from_label_probes(model, features, targets.tolist(), seed=0)
    logits = model.score(torch.from_numpy(features)).detach().numpy()
    assert fitted["train_micro_f1"] > 0.9
    assert ((logits[:, :2] > 0) == targets[:, :2].astype(bool)).mean() > 0.9


def test_the_loss_is_binary_cross_entropy_with_positive_weights_and_a_split_batch_adds_up():
    trainer = WeightedLossTrainer.__new__(WeightedLossTrainer)
    trainer.task, trainer._loss_denominator = "multi-label", None
    trainer.class_weights = torch.tensor([1.0, 3.0])
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.0], [-0.5, 1.5]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    whole = trainer._loss(logits, labels)
    want = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, labels, pos_weight=trainer.class_weights
    )
    assert whole.item() == pytest.approx(want.item())
    trainer._loss_denominator = torch.tensor(6.0)  # rows x labels
    parts = trainer._loss(logits[:1], labels[:1]) + trainer._loss(logits[1:], labels[1:])
    assert parts.item() == pytest.approx(whole.item())
    # a split batch keeps its (batch, labels) rows whole even where labels match the padded width
    batch = {
        "input_ids": torch.ones(4, 2, dtype=torch.long),
        "attention_mask": torch.ones(4, 2, dtype=torch.long),
    }
    batch["labels"] = torch.ones(4, 2)
    assert all(part["labels"].shape[1] == 2 for part in split_batch(batch, 4))


def test_recorded_thresholds_are_checked_as_untrusted_data(tmp_path):
    from llmclf.inference.classifier import recorded_thresholds

    labels = ["a", "b"]
    assert recorded_thresholds({"thresholds": {"a": 0.3, "b": 1}}, labels, tmp_path) == [0.3, 1.0]
    for bad in (
        None,
        {"a": 0.3},
        {"a": 0.3, "b": 1.5},
        {"a": "0.3", "b": 0.2},
        {"a": 0.3, "b": True},
        [0.3, 0.2],
    ):
        with pytest.raises(LlmclfError, match="thresholds is"):
            recorded_thresholds({"thresholds": bad}, labels, tmp_path)


def test_label_sets_under_single_label_suggest_multi_label(tmp_path):
    # every row joins two names, none alone: 6 labels made of 4 names
    pairs = ["a;b", "a;c", "a;d", "b;c", "b;d", "c;d"]
    rows = [{"text": f"text {i}", "topics": pairs[i % 6]} for i in range(60)]
    data = write_csv(tmp_path / "s.csv", rows, ["text", "topics"])
    with pytest.raises(LlmclfError, match="--task multi-label --label-separator ';'") as error:
        load_splits(str(data), "text", "topics")
    assert "recurring across the column's labels (4 names)" in str(error.value)
    splits = load_splits(str(data), "text", "topics", task="multi-label", label_separator=";")  # as suggested
    assert splits.labels == ["a", "b", "c", "d"]
    # class names that merely hold the character stay classes
    names = ["R&D; design", "sales; marketing", "support"]
    rows = [{"text": f"text {i}", "topics": names[i % 3]} for i in range(30)]
    assert load_splits(
        str(write_csv(tmp_path / "n.csv", rows, ["text", "topics"])), "text", "topics"
    ).labels == sorted(names)
