"""Reuse of a trained run: Classifier API, predict/evaluate/export commands."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from conftest import plain_transformers, read_demo_rows, saved_probs, train_tiny, write_csv
from llmclf import Classifier
from llmclf.cli import main
from llmclf.errors import LlmclfError


@pytest.fixture(scope="module")
def clf(trained_run):
    return Classifier.load(trained_run)


def test_reload_in_a_fresh_process_gives_the_training_probabilities(trained_run, tmp_path):
    script = textwrap.dedent(f"""
        import json, sys
        import pandas as pd
        from llmclf import Classifier
        clf = Classifier.load({str(trained_run)!r})
        texts = pd.read_csv({str(trained_run / "predictions_test.csv")!r}, keep_default_na=False)["text"].tolist()
        json.dump(clf.predict_proba(texts).tolist(), open({str(tmp_path / "p.json")!r}, "w"))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    _, expected = saved_probs(trained_run)
    np.testing.assert_allclose(json.loads((tmp_path / "p.json").read_text()), expected, atol=1e-5)


def test_api(clf, trained_run):
    assert clf.labels == ["Business", "Sci/Tech", "Sports", "World"]
    preds, expected = saved_probs(trained_run)
    texts = preds["text"].tolist()
    probs = clf.predict_proba(texts)
    assert probs.shape == (40, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert clf.predict(texts) == preds["predicted"].tolist()
    assert clf.predict("one text only") == [clf.labels[int(clf.predict_proba(["one text only"]).argmax())]]


def test_batched_equals_one_at_a_time_and_padding_side_does_not_matter(clf):
    texts = [r["text"] for r in read_demo_rows()[:24]] + ["short", "a bit longer text here"]
    batched = clf.predict_proba(texts, batch_size=8)
    single = np.vstack([clf.predict_proba([t], batch_size=1) for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    side = clf.tokenizer.padding_side
    try:
        clf.tokenizer.padding_side = "left" if side == "right" else "right"
        np.testing.assert_allclose(clf.predict_proba(texts, batch_size=8), batched, atol=1e-5)
    finally:
        clf.tokenizer.padding_side = side


def test_export_loads_with_plain_transformers(trained_run, tmp_path, clf):
    out = tmp_path / "export"
    assert main(["--quiet", "export", str(trained_run), "--output", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    texts = [r["text"] for r in read_demo_rows()[:16]]
    got = plain_transformers(out, texts, tmp_path)  # a fresh process, llmclf unimportable
    assert [got["id2label"][str(i)] for i in range(4)] == clf.labels
    # The export is the model part; the run's lexical part (TF-IDF + LR) stays with llmclf.
    np.testing.assert_allclose(got["probs"], clf.model_proba(texts), atol=1e-5)


def test_predict_command_keeps_order_and_columns(trained_run, tmp_path, clf):
    rows = [{"id": i, "body": r["text"], "extra": f"x{i}"} for i, r in enumerate(read_demo_rows()[:57])]
    src = write_csv(tmp_path / "in.csv", rows)
    for suffix in (".csv", ".jsonl", ".parquet"):
        dst = tmp_path / f"out{suffix}"
        assert (
            main(
                [
                    "--quiet",
                    "predict",
                    str(trained_run),
                    "--input",
                    str(src),
                    "--output",
                    str(dst),
                    "--text-column",
                    "body",
                    "--batch-size",
                    "5",
                ]
            )
            == 0
        )
        out = {
            ".csv": pd.read_csv,
            ".jsonl": lambda p: pd.read_json(p, lines=True),
            ".parquet": pd.read_parquet,
        }[suffix](dst)
        assert len(out) == 57
        assert out["id"].astype(int).tolist() == list(range(57)) and out["extra"].tolist() == [
            r["extra"] for r in rows
        ]
        assert list(out.columns) == ["id", "body", "extra", "label"] + [f"prob_{lab}" for lab in clf.labels]
        assert out["label"].tolist() == clf.predict([r["body"] for r in rows])


def test_predict_text_prints_label_and_probabilities(trained_run, capsys):
    assert (
        main(
            ["--quiet", "predict", str(trained_run), "--text", "Shares fell sharply", "--text", "A late goal"]
        )
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [x["text"] for x in lines] == ["Shares fell sharply", "A late goal"]
    for x in lines:
        assert set(x["probabilities"]) == {"Business", "Sci/Tech", "Sports", "World"}
        assert x["label"] == max(x["probabilities"], key=x["probabilities"].get)


def test_predict_refuses_to_overwrite_an_existing_label_column(trained_run, tmp_path, capsys):
    src = write_csv(tmp_path / "l.csv", read_demo_rows()[:3])
    code = main(["predict", str(trained_run), "--input", str(src), "--output", str(tmp_path / "o.csv")])
    assert code == 2 and "--prediction-column" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


def test_evaluate_reproduces_training_metrics(trained_run, tmp_path):
    out = tmp_path / "m.json"
    assert (
        main(
            [
                "--quiet",
                "evaluate",
                str(trained_run),
                "--data",
                str(trained_run / "predictions_test.csv"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    got = json.loads(out.read_text())
    after = json.loads((trained_run / "metrics.json").read_text())["after"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "confusion_matrix", "per_class"):
        assert got[key] == after[key]


def test_evaluate_lists_unknown_labels(trained_run, tmp_path, capsys):
    rows = read_demo_rows()[:10] + [{"text": "Rain expected tomorrow", "label": "Weather"}]
    src = write_csv(tmp_path / "u.csv", rows)
    assert main(["evaluate", str(trained_run), "--data", str(src)]) == 2
    assert "['Weather']" in capsys.readouterr().err


def test_incomplete_run_folder_is_explained(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("{}")
    assert main(["predict", str(tmp_path / "half"), "--text", "x"]) == 2
    assert "missing" in capsys.readouterr().err


def test_the_caller_can_override_the_precision_the_run_recorded(trained_run):
    texts = ["Shares fell sharply", "A late goal won the derby"]
    recorded = Classifier.load(trained_run)
    assert recorded.precision == "fp32"  # as trained
    half = Classifier.load(trained_run, precision="bf16")
    assert half.precision == "bf16"
    assert np.abs(half.predict_proba(texts) - recorded.predict_proba(texts)).max() < 3e-2


def test_auto_precision_records_why_it_chose(tmp_path, tiny_model_dir, small_csv, monkeypatch):
    from llmclf import runtime

    evidence = {"key": {"cpu": "test"}, "seconds": {"fp32": 0.004, "bf16": 0.006}, "choice": "fp32"}
    monkeypatch.setattr(runtime, "cpu_bf16", lambda: True)
    monkeypatch.setattr(runtime, "cpu_precision_evidence", lambda: evidence)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    out = tmp_path / "run"
    assert train_tiny(small_csv, tiny_model_dir, out, "--precision", "auto", "--epochs", "1") == 0
    info = json.loads((out / "run_info.json").read_text())
    assert info["precision"] == "fp32" and info["precision_choice"] == evidence  # bf16 timed slower here


def test_no_texts_and_blank_texts(clf):
    # Both used to fail deep inside: predict([]) with IndexError, predict([""]) with a reshape error.
    assert clf.predict([]) == [] and clf.predict_proba([]).shape == (0, len(clf.labels))
    for texts in ([""], ["fine", "  \n"]):
        with pytest.raises(LlmclfError, match=r"empty or blank"):
            clf.predict(texts)
