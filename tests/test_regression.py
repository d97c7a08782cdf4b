"""Regression (`--task regression`): one number per text, through train -> reload -> predict / evaluate ->
serve -> export -> plain transformers' pipeline(), on the tiny model; and the bad input it refuses."""

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
from llmclf.config import build_config
from llmclf.data import load_splits
from llmclf.errors import LlmclfError
from llmclf.inference.classifier import Classifier
from llmclf.inference.metrics import regression_metrics
from llmclf.model.layer_choice import quantile_bins, score_layers_regression
from llmclf.training.probe import init_head_from_ridge
from llmclf.training.trainer import WeightedLossTrainer

PREDICT = ["--quiet", "predict"]
# the shared small settings sample per class; a regression run splits by fractions instead
REGRESSION = (
    "--task",
    "regression",
    "--label-column",
    "rating",
    "--val-fraction",
    "0.1",
    "--test-fraction",
    "0.1",
)


def rating_rows(seed: int = 0) -> list[dict]:
    """The demo texts with a number that follows their topic (1, 3, 5, 7) plus noise: learnable."""
    rows = read_demo_rows()
    topics = sorted({r["label"] for r in rows})
    rng = random.Random(seed)
    return [
        {"text": r["text"], "rating": round(2.0 * topics.index(r["label"]) + 1 + rng.gauss(0, 0.3), 3)}
        for r in rows
    ]


@pytest.fixture(scope="module")
def rating_csv(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("ratings") / "ratings.csv", rating_rows(), ["text", "rating"])


def train_regression(data, model, out, *extra: str) -> int:
    """`llmclf train` with the shared settings, split by fractions (regression refuses per-class sizes)."""
    argv = ["--quiet", "train", "--data", str(data), "--model", str(model), "--output", str(out)]
    return main([*argv, *FRACTION_ARGS, *REGRESSION, *extra])


@pytest.fixture(scope="module")
def rating_run(rating_csv, tiny_model_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("rating-run") / "run"
    assert train_regression(rating_csv, tiny_model_dir, run) == 0
    return run


@pytest.fixture(scope="module")
def clf(rating_run) -> Classifier:
    return Classifier.load(rating_run)


def test_a_regression_run_writes_numbers_and_its_metrics(rating_run, rating_csv):
    metrics = json.loads((rating_run / "metrics.json").read_text())
    assert set(metrics) == {"before", "after"}
    for stage in metrics.values():
        assert {"n", "mse", "mae", "pearson", "spearman"} <= set(stage)
        assert "accuracy" not in stage
    preds = pd.read_csv(rating_run / "predictions_test.csv")
    assert list(preds.columns) == ["text", "label", "score"]
    # the saved metrics are those of the saved predictions, in the column's own units
    again = regression_metrics(preds["label"], preds["score"])
    assert again["mse"] == pytest.approx(metrics["after"]["mse"], rel=1e-6)
    assert metrics["after"]["mse"] < metrics["before"]["mse"]  # training learned something
    assert metrics["after"]["pearson"] > 0.3  # the topic is in the text; the tiny model finds some of it
    source = pd.read_csv(rating_csv).set_index("text")["rating"]
    assert preds["label"].tolist() == pytest.approx(source[preds["text"]].tolist())  # true values kept
    info = json.loads((rating_run / "run_info.json").read_text())
    assert info["task"] == "regression" and info["lexical"] is None
    train = json.loads((rating_run / "data_summary.json").read_text())["targets"]["train"]
    assert info["target_scale"] == pytest.approx(train["std"])
    assert set(info["probe"]) >= {"train_r2", "cv_mse", "alpha"}
    assert json.loads((rating_run / "labels.json").read_text()) == ["score"]
    assert "task: regression" in (rating_run / "config.yaml").read_text()


def test_a_regression_run_reloads_to_its_numbers(rating_run, clf):
    preds = pd.read_csv(rating_run / "predictions_test.csv")
    texts = preds["text"].tolist()
    assert clf.task == "regression"
    assert clf.predict(texts) == pytest.approx(preds["score"].tolist(), rel=2e-5, abs=1e-5)
    assert clf.scores(texts).shape == (len(texts),)
    with pytest.raises(LlmclfError, match="regression model"):
        clf.predict_proba(texts)
    metrics, scores = clf.evaluate(texts, preds["label"].tolist())
    saved = json.loads((rating_run / "metrics.json").read_text())["after"]
    assert metrics["mse"] == pytest.approx(saved["mse"], rel=1e-5)
    assert scores == pytest.approx(preds["score"].to_numpy(), rel=2e-5, abs=1e-5)


def test_the_command_line_predicts_and_evaluates_numbers(rating_run, clf, tmp_path, capsys):
    preds = pd.read_csv(rating_run / "predictions_test.csv")
    data = tmp_path / "in.csv"
    preds[["text", "label"]].rename(columns={"label": "rating"}).to_csv(data, index=False)
    out = tmp_path / "out.csv"
    assert main([*PREDICT, str(rating_run), "--input", str(data), "--output", str(out)]) == 0
    written = pd.read_csv(out)
    assert list(written.columns) == ["text", "rating", "score"]
    assert written["score"].tolist() == pytest.approx(preds["score"].tolist(), rel=2e-5, abs=1e-5)
    capsys.readouterr()
    assert main([*PREDICT, str(rating_run), "--text", preds["text"][0]]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert (
        line["score"] == pytest.approx(preds["score"][0], rel=2e-5, abs=1e-5) and "probabilities" not in line
    )
    report = tmp_path / "eval.json"
    assert main(["--quiet", "evaluate", str(rating_run), "--data", str(data), "--output", str(report)]) == 0
    saved = json.loads((rating_run / "metrics.json").read_text())["after"]
    assert json.loads(report.read_text())["mse"] == pytest.approx(saved["mse"], rel=1e-5)
    assert "MSE" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    bad.write_text("text,rating\nfine text,2.5\nanother,n/a\n")
    capsys.readouterr()
    assert main(["--quiet", "evaluate", str(rating_run), "--data", str(bad)]) != 0
    assert "'n/a') at row(s) 2" in capsys.readouterr().err


def test_the_server_answers_with_scores(clf):
    from fastapi.testclient import TestClient

    from llmclf.serve.app import ServeOptions, create_app
    from llmclf.serve.batcher import ClassifierPredictor

    options = ServeOptions(max_texts=8, max_length=clf.max_length)
    app = create_app(clf.labels, ClassifierPredictor(clf, clf.max_length, 80.0), options)
    texts = ["Stocks fell after the report.", "The team won the final."]
    want = clf.scores(texts)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for _ in range(500):
            if client.get("/health").status_code == 200:
                break
        got = client.post("/classify", json={"texts": texts}).json()["predictions"]
        assert [p["score"] for p in got] == pytest.approx(want.tolist(), abs=1e-6)
        assert "probabilities" not in got[0]
        one = client.post("/predict", json={"inputs": texts[0]}).json()  # TEI: [{"label", "score"}]
        assert one == [
            {"label": "score", "score": pytest.approx(float(want[0]), abs=5e-5)}
        ]  # one text, not two
        none = client.post("/predict", json={"inputs": texts, "parameters": {"function_to_apply": "none"}})
        assert none.status_code == 200 and len(none.json()) == 2
        soft = client.post("/predict", json={"inputs": texts, "parameters": {"function_to_apply": "softmax"}})
        assert soft.status_code == 422 and "function_to_apply none" in soft.json()["message"]


def test_the_export_outputs_the_numbers_in_plain_transformers(rating_run, clf, tmp_path):
    preds = pd.read_csv(rating_run / "predictions_test.csv")
    texts = preds["text"].tolist()[:5]
    export = tmp_path / "export"
    assert main(["--quiet", "export", str(rating_run), "--output", str(export)]) == 0
    assert json.loads((export / "config.json").read_text())["problem_type"] == "regression"
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["llmclf"] = None
        from transformers import pipeline
        clf = pipeline("text-classification", model={str(export)!r})
        out = clf(json.loads(sys.argv[1]), truncation=True)
        json.dump(out, open({str(tmp_path / "p.json")!r}, "w"))
    """)
    subprocess.run([sys.executable, "-c", script, json.dumps(texts)], check=True, timeout=300)
    got = json.loads((tmp_path / "p.json").read_text())
    # pipeline() applies no function to a regression model's output: the scores are the run's numbers
    assert [g["score"] for g in got] == pytest.approx(clf.scores(texts).tolist(), abs=1e-4)


# ------------------------------------------------------------------------------------------ bad input
def test_values_that_are_not_numbers_are_named_by_row(tmp_path):
    data = write_csv(
        tmp_path / "d.csv",
        [{"text": f"text {i}", "rating": v} for i, v in enumerate(["1.5", "2", "three", "4", "", "inf"])],
        ["text", "rating"],
    )
    with pytest.raises(LlmclfError) as error:
        load_splits(str(data), "text", "rating", task="regression", drop_invalid=False)
    assert "row(s) 5" in str(error.value) and "--drop-invalid" in str(error.value)  # the empty one first
    with pytest.raises(LlmclfError) as error:
        load_splits(str(data), "text", "rating", task="regression", drop_invalid=True)
    message = str(error.value)
    assert "row(s) 3, 6" in message and "'three'" in message and "--task single-label" in message


def test_regression_refuses_per_class_sizes_and_constant_targets(tmp_path):
    with pytest.raises(LlmclfError, match="no classes to sample per class"):
        build_config({"task": "regression", "data": {"train_per_class": 10}})
    with pytest.raises(LlmclfError, match="allowed values are single-label, multi-label, regression"):
        build_config({"task": "ordinal"})
    data = write_csv(
        tmp_path / "c.csv", [{"text": f"t {i}", "rating": 3} for i in range(20)], ["text", "rating"]
    )
    with pytest.raises(LlmclfError, match="at least two different values"):
        load_splits(str(data), "text", "rating", task="regression")


def test_scores_under_single_label_suggest_regression(tmp_path):
    fractional = [{"text": f"t {i}", "rating": i / 7} for i in range(40)]
    whole = [{"text": f"t {i}", "rating": 3 * i} for i in range(80)]
    for name, rows in (("f.csv", fractional), ("w.csv", whole)):
        data = write_csv(tmp_path / name, rows, ["text", "rating"])
        with pytest.raises(LlmclfError, match="--task regression"):
            load_splits(str(data), "text", "rating")
        splits = load_splits(str(data), "text", "rating", task="regression")  # what the error suggests
        assert splits.labels == ["score"] and len(splits.train) + len(splits.val) + len(splits.test) == len(
            rows
        )


def test_a_separate_evaluation_file_is_the_test_split_without_leaked_texts(tmp_path):
    rows = [{"text": f"text {i}", "rating": float(i)} for i in range(30)]
    data = write_csv(tmp_path / "d.csv", rows, ["text", "rating"])
    held = write_csv(tmp_path / "e.csv", rows[:3] + [{"text": "new", "rating": 1.5}], ["text", "rating"])
    splits = load_splits(str(data), "text", "rating", task="regression", eval_data=str(held))
    assert splits.test["label"].tolist() == [1.5] and splits.test["text"].tolist() == ["new"]
    assert any("also in train/val" in note for note in splits.notes)
    assert splits.counts()["test"] == {"score": 1}


# ------------------------------------------------------------------------------------------- the parts
def test_the_ridge_head_reproduces_the_ridge_fit():
    rng = np.random.default_rng(0)
    # a constant-ish dimension stands in for the intercept a decoder's head lacks
    features = np.concatenate([rng.normal(size=(200, 15)), 40 + 0.01 * rng.normal(size=(200, 1))], axis=1)
    targets = features[:, :3] @ np.array([1.0, -2.0, 0.5]) + 3.0 + 0.05 * rng.normal(size=200)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.score = torch.nn.Linear(16, 1, bias=False)

    model = Model()
    fitted = init_head_from_ridge(model, features.astype(np.float32), targets.tolist())
    predicted = model.score(torch.from_numpy(features).float()).detach().numpy()[:, 0]
    assert fitted.train_r2 > 0.95 and fitted.alpha > 0
    assert np.mean((predicted - targets) ** 2) < 0.1  # the head itself predicts, intercept included


def test_the_layer_choice_scores_numbers_by_their_ridge_error():
    rng = np.random.default_rng(1)
    targets = rng.normal(size=120)
    noise = rng.normal(size=(120, 9))
    informative = np.concatenate([targets[:, None] + 0.1 * rng.normal(size=(120, 1)), noise[:, 1:]], axis=1)
    scores = score_layers_regression(np.stack([noise, informative]), targets)
    assert scores[1] > 0.9 > scores[0]
    bins = quantile_bins(np.arange(100.0))
    assert sorted(np.bincount(bins).tolist()) == [10] * 10


def test_the_loss_is_mean_squared_error_and_a_split_batch_adds_up():
    trainer = WeightedLossTrainer.__new__(WeightedLossTrainer)
    trainer.task, trainer.class_weights, trainer._loss_denominator = "regression", None, None
    logits = torch.tensor([[1.0], [2.0], [4.0]])
    labels = torch.tensor([0.0, 2.0, 2.0])
    assert trainer._loss(logits, labels).item() == pytest.approx((1 + 0 + 4) / 3)
    trainer._loss_denominator = torch.tensor(3.0)  # two parts of one batch of three
    parts = trainer._loss(logits[:1], labels[:1]) + trainer._loss(logits[1:], labels[1:])
    assert parts.item() == pytest.approx((1 + 0 + 4) / 3)


def test_validation_scores_numbers_in_their_units_and_keeps_the_lowest_error(tmp_path):
    from transformers import EvalPrediction

    from llmclf.training.trainer import RegressionMetrics, validation_schedule

    metrics = RegressionMetrics(2.0)(
        EvalPrediction(np.array([[1.0], [2.0], [3.5]]), np.array([1.0, 2.0, 3.0]))
    )
    assert metrics["mse"] == pytest.approx(((2 * 0.5) ** 2) / 3)  # in the column's units: outputs x 2
    assert metrics["mae"] == pytest.approx(1.0 / 3) and metrics["pearson"] > 0.9
    schedule = validation_schedule(True, None, None, task="regression")
    assert (schedule["metric_for_best_model"], schedule["greater_is_better"]) == ("mse", False)
    assert validation_schedule(True, None)["greater_is_better"] is True
