"""Text pairs (`--text-pair-column`): two texts per row go to the tokenizer as a pair, through train ->
reload -> predict / evaluate -> serve -> export -> plain transformers' pipeline(), on the tiny model."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from conftest import read_demo_rows, saved_probs, train_tiny, write_csv
from llmclf.cli import main
from llmclf.data import load_splits
from llmclf.errors import LlmclfError
from llmclf.inference.classifier import Classifier
from llmclf.model.prompt import PAIR_SEPARATOR

SECOND = "second"  # the pair column's name in the test data
PREDICT = ["--quiet", "predict", "--prediction-column", "guess"]


def pair_rows(per_label: int = 45, seed: int = 0) -> list[dict]:
    """Pairs of demo texts labelled `same` (both of one topic) or `different`."""
    rows = read_demo_rows()
    by_topic: dict[str, list[str]] = {}
    for row in rows:
        by_topic.setdefault(row["label"], []).append(row["text"])
    rng, topics, out = random.Random(seed), sorted(by_topic), []
    for i in range(per_label):
        first = topics[i % len(topics)]
        a, b = rng.sample(by_topic[first], 2)
        out.append({"text": a, SECOND: b, "label": "same"})
        other = topics[(i + 1 + i // len(topics)) % len(topics)]
        other = other if other != first else topics[(i + 2) % len(topics)]
        out.append(
            {"text": rng.choice(by_topic[first]), SECOND: rng.choice(by_topic[other]), "label": "different"}
        )
    return out


@pytest.fixture(scope="module")
def pair_csv(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("pairs") / "pairs.csv", pair_rows(), ["text", SECOND, "label"])


@pytest.fixture(scope="module")
def pair_run(pair_csv, tiny_model_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("pair-run") / "run"
    assert train_tiny(pair_csv, tiny_model_dir, run, "--text-pair-column", SECOND) == 0
    return run


@pytest.fixture(scope="module")
def clf(pair_run) -> Classifier:
    return Classifier.load(pair_run)


def test_a_pair_run_reloads_to_its_probabilities_and_reads_the_second_text(pair_run, clf):
    preds, probs = saved_probs(pair_run)
    assert {"text", "pair", "label", "predicted"} <= set(preds.columns)
    texts, pairs = preds["text"].tolist(), preds["pair"].tolist()
    np.testing.assert_allclose(clf.predict_proba(texts, pairs=pairs), probs, atol=1e-5)
    # The second text counts: other second texts give other probabilities.
    shifted = pairs[1:] + pairs[:1]
    assert np.abs(clf.model_proba(texts, pairs=shifted) - clf.model_proba(texts, pairs=pairs)).max() > 1e-4
    # The tokenizer joins the two with the separator: "A" + "B" never reads as one text.
    plain = [
        clf.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("alpha", PAIR_SEPARATOR, "beta")
    ]
    joined, wanted = clf.tokenizer("alpha", "beta")["input_ids"], sum(plain, [])
    assert any(joined[i : i + len(wanted)] == wanted for i in range(len(joined)))
    with pytest.raises(LlmclfError, match="trained on text pairs"):
        clf.predict(texts[:2])
    with pytest.raises(LlmclfError, match="2 texts but 1 pairs"):
        clf.predict(texts[:2], pairs=pairs[:1])
    with pytest.raises(LlmclfError, match=r"Second texts \(pairs\) \[1\] are empty"):
        clf.predict(texts[:2], pairs=[pairs[0], "  "])


def test_the_command_line_predicts_and_evaluates_pairs(pair_run, clf, tmp_path, capsys):
    preds, probs = saved_probs(pair_run)
    data = preds[["text", "pair", "label"]].rename(columns={"pair": SECOND})
    data.to_csv(tmp_path / "in.csv", index=False)
    out = tmp_path / "out.csv"
    assert main([*PREDICT, str(pair_run), "--input", str(tmp_path / "in.csv"), "--output", str(out)]) == 0
    written = pd.read_csv(out)
    assert written["guess"].tolist() == preds["predicted"].tolist()
    np.testing.assert_allclose(
        written[[c for c in written if c.startswith("prob_")]].to_numpy(), probs, atol=1e-5
    )

    a, b = preds["text"].iloc[0], preds["pair"].iloc[0]
    capsys.readouterr()
    assert main(["--quiet", "predict", str(pair_run), "--text", a, "--pair", b]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["text"] == a and line["pair"] == b and line["label"] == preds["predicted"].iloc[0]
    assert main(["--quiet", "predict", str(pair_run), "--text", a]) != 0
    assert "give one --pair (the second text) per --text" in capsys.readouterr().err

    report = tmp_path / "eval.json"
    assert (
        main(
            [
                "--quiet",
                "evaluate",
                str(pair_run),
                "--data",
                str(tmp_path / "in.csv"),
                "--output",
                str(report),
            ]
        )
        == 0
    )
    after = json.loads((pair_run / "metrics.json").read_text())["after"]
    assert json.loads(report.read_text())["accuracy"] == pytest.approx(after["accuracy"])

    data.drop(columns=[SECOND]).to_csv(tmp_path / "no-pairs.csv", index=False)
    assert (
        main(
            [
                "--quiet",
                "predict",
                str(pair_run),
                "--input",
                str(tmp_path / "no-pairs.csv"),
                "--output",
                str(out),
            ]
        )
        != 0
    )
    err = capsys.readouterr().err
    assert f"['{SECOND}'] not found" in err and "--text-pair-column" in err


def test_the_server_takes_pairs(clf):
    from fastapi.testclient import TestClient

    from llmclf.serve.app import ServeOptions, create_app
    from llmclf.serve.batcher import ClassifierPredictor

    options = ServeOptions(max_texts=8, max_length=clf.max_length)
    app = create_app(clf.labels, ClassifierPredictor(clf, clf.max_length, 80.0), options)
    pairs = [["Stocks fell after the report.", "Markets slid."], ["The team won.", "Shares rose."]]
    want = clf.predict_proba([p[0] for p in pairs], pairs=[p[1] for p in pairs])
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for _ in range(500):
            if client.get("/health").status_code == 200:
                break
        got = client.post("/classify", json={"pairs": pairs}).json()["predictions"]
        for row, p in zip(want, got, strict=True):
            assert [p["probabilities"][label] for label in clf.labels] == pytest.approx(
                row.tolist(), abs=1e-6
            )
        one = client.post("/predict", json={"inputs": pairs[0]}).json()  # TEI: one pair, one ranked list
        assert one[0]["label"] == clf.labels[int(want[0].argmax())]
        assert len(client.post("/predict", json={"inputs": pairs}).json()) == 2
        refused = client.post("/classify", json={"texts": ["a single text"]})
        assert refused.status_code == 422 and "takes text pairs in 'pairs'" in refused.json()["message"]
        blank = client.post("/classify", json={"pairs": [["ok", "fine"], ["ok", " "]]})
        assert blank.status_code == 400 and blank.json()["index"] == [1]
        odd = client.post("/classify", json={"pairs": [["only one"]]})
        assert odd.status_code == 422 and odd.json()["error"] == "invalid_pair"
        single = client.post("/predict", json={"inputs": "a single text"})
        assert single.status_code == 422 and "trained on text pairs" in single.json()["message"]


def test_the_export_runs_pairs_in_plain_transformers(pair_run, clf, tmp_path):
    preds, _ = saved_probs(pair_run)
    texts, pairs = preds["text"].tolist()[:5], preds["pair"].tolist()[:5]
    export = tmp_path / "export"
    assert main(["--quiet", "export", str(pair_run), "--output", str(export)]) == 0
    card = (export / "README.md").read_text()
    assert "'text_pair':" in card
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["llmclf"] = None
        from transformers import pipeline
        clf = pipeline("text-classification", model={str(export)!r}, top_k=None)
        rows = json.loads(sys.argv[1])
        out = [clf({{"text": a, "text_pair": b}}, truncation=True) for a, b in rows]
        json.dump(out, open({str(tmp_path / "p.json")!r}, "w"))
    """)
    subprocess.run(
        [sys.executable, "-c", script, json.dumps(list(zip(texts, pairs)))], check=True, timeout=300
    )
    got = json.loads((tmp_path / "p.json").read_text())
    want = clf.model_proba(texts, pairs=pairs)
    for row, ranked in zip(want, got, strict=True):
        scores = {r["label"]: r["score"] for r in ranked}
        assert [scores[label] for label in clf.labels] == pytest.approx(row.tolist(), abs=1e-4)


def test_a_missing_second_text_is_named_by_row(pair_csv, tiny_model_dir, tmp_path, capsys):
    frame = pd.read_csv(pair_csv)
    frame.loc[6, SECOND] = None
    frame.to_csv(tmp_path / "gap.csv", index=False)
    assert (
        train_tiny(tmp_path / "gap.csv", tiny_model_dir, tmp_path / "run", "--text-pair-column", SECOND) != 0
    )
    err = capsys.readouterr().err
    assert f"missing second text(s) of a pair in column '{SECOND}' at row(s) 7" in err
    assert "--drop-invalid" in err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_duplicates_and_leakage_are_judged_on_the_pair(tmp_path):
    rows = [{"text": "shared first text", SECOND: f"second {i}", "label": "ab"[i % 2]} for i in range(20)]
    rows += [{"text": "shared first text", SECOND: "second 0", "label": "a"}]  # a true duplicate pair
    path = write_csv(tmp_path / "d.csv", rows, ["text", SECOND, "label"])
    splits = load_splits(
        str(path), "text", "label", text_pair_column=SECOND, val_fraction=0.2, test_fraction=0.2
    )
    assert sum(len(getattr(splits, s)) for s in ("train", "val", "test")) == 20  # one text, 20 distinct pairs
    assert any("removed 1 duplicate text pair(s)" in note for note in splits.notes)
    with pytest.raises(LlmclfError, match="text_pair_column"):
        from llmclf.config import DataConfig

        DataConfig(text_pair_column="text")


def test_the_python_api_trains_on_pairs_in_memory(pair_run, tiny_model_dir, tmp_path):
    """`llmclf.train(data=frame, text_pair_column=...)` as the command line: the same predictions, and
    the run folder keeps the pair column in its copy of the data."""
    from llmclf import train

    options = dict(
        quantize="none", precision="fp32", train_per_class=20, val_per_class=5, test_per_class=10,
        epochs=2, lr=2e-3, batch_size=8, max_length=64, seed=7,
    )  # fmt: skip
    frame = pd.DataFrame(pair_rows())
    result = train(
        data=frame, text_pair_column=SECOND, model=str(tiny_model_dir), output=str(tmp_path / "api"), quiet=True,
        **options,
    )  # fmt: skip
    kept = pd.read_json(result.output / "data.jsonl", lines=True)
    assert list(kept.columns) == ["text", SECOND, "label"] and len(kept) == len(frame)
    _, cli_probs = saved_probs(pair_run)
    _, api_probs = saved_probs(result.output)
    np.testing.assert_allclose(api_probs, cli_probs, atol=1e-5)  # same rows, seed and settings


def test_compare_tells_pair_runs_tested_on_other_pairs_apart(pair_run, tmp_path):
    """Two pair runs whose test rows share their first texts but not their second ones were tested on
    other inputs: the comparison says so."""
    import shutil

    from llmclf.reports.compare import comparison_warnings
    from llmclf.reports.run_report import read_run

    other = tmp_path / "other"
    shutil.copytree(pair_run, other)
    preds = pd.read_csv(other / "predictions_test.csv", keep_default_na=False)
    preds.loc[0, "pair"] = preds.loc[1, "pair"] + " (another second text)"
    preds.to_csv(other / "predictions_test.csv", index=False)
    same = comparison_warnings([read_run(pair_run), read_run(pair_run)], ["a", "b"])
    assert not any("different texts" in w for w in same)
    warned = comparison_warnings([read_run(pair_run), read_run(other)], ["a", "b"])
    assert any("tested on different texts" in w for w in warned)
