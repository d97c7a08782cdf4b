"""End to end: the real `llmclf train` entry point on the tiny model, and what it writes."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from safetensors import safe_open

from conftest import TRAIN_ARGS, read_demo_rows, train_tiny, write_csv
from llmclf.cli import main
from llmclf.errors import LlmclfError

FILES = [
    "config.yaml",
    "labels.json",
    "run_info.json",
    "metrics.json",
    "data_summary.json",
    "predictions_test.csv",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "tokenizer/tokenizer.json",
]
METRIC_KEYS = {"accuracy", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix"}


def test_run_folder_holds_everything(trained_run):
    for name in FILES:
        assert (trained_run / name).is_file(), name
    assert not (trained_run / "checkpoints").exists()
    labels = json.loads((trained_run / "labels.json").read_text())
    assert labels == ["Business", "Sci/Tech", "Sports", "World"]
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert set(metrics) == {"before", "after"}
    for stage in metrics.values():
        assert METRIC_KEYS <= set(stage)
        assert stage["n"] == 40 and sum(map(sum, stage["confusion_matrix"])) == 40
        assert set(stage["per_class"]) == set(labels)
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert config["data"]["train_per_class"] == 20 and config["train"]["lr"] == 2e-3
    summary = json.loads((trained_run / "data_summary.json").read_text())
    assert summary["counts"]["train"] == dict.fromkeys(labels, 20)
    assert summary["class_weights"] == pytest.approx(dict.fromkeys(labels, 0.25))


def test_predictions_file_matches_metrics(trained_run):
    preds = pd.read_csv(trained_run / "predictions_test.csv", keep_default_na=False)
    labels = json.loads((trained_run / "labels.json").read_text())
    assert list(preds.columns) == ["text", "label", "predicted"] + [f"prob_{lab}" for lab in labels]
    assert len(preds) == 40
    probs = preds[[f"prob_{lab}" for lab in labels]].to_numpy()
    assert probs.sum(axis=1) == pytest.approx([1.0] * 40, abs=1e-6)
    assert (preds["predicted"] == [labels[i] for i in probs.argmax(axis=1)]).all()
    after = json.loads((trained_run / "metrics.json").read_text())["after"]
    assert after["accuracy"] == pytest.approx((preds["predicted"] == preds["label"]).mean())


def test_adapter_holds_the_trained_head(trained_run, tiny_model_dir):
    from safetensors.torch import load_file

    with safe_open(trained_run / "adapter/adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    head = [k for k in keys if "score" in k]
    assert head, keys  # pitfall 2: without the head a reload gets a random one
    assert any("lora_A" in k for k in keys)
    tensor = load_file(trained_run / "adapter/adapter_model.safetensors")[head[0]]
    assert tensor.shape == (4, 64)  # (num_labels, hidden)


def test_training_changed_the_model(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    assert before["confusion_matrix"] != after["confusion_matrix"]
    log = json.loads((trained_run / "run_info.json").read_text())["log_history"]
    assert any("eval_accuracy" in entry for entry in log)  # validation each epoch
    assert sum("eval_accuracy" in entry for entry in log) == 2  # two epochs


def test_integer_labels_and_4bit_qlora(tmp_path, tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    names = {"World": 1, "Sports": 2, "Business": 3, "Sci/Tech": 4}
    rows = [{"content": r["text"], "label": names[r["label"]]} for r in read_demo_rows()[:200]]
    data = write_csv(tmp_path / "ints.csv", rows)
    out = tmp_path / "run4"
    code = main(
        [
            "--quiet",
            "train",
            "--data",
            str(data),
            "--text-column",
            "content",
            "--model",
            str(tiny_model_dir),
            "--output",
            str(out),
            "--quantize",
            "4bit",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--max-length",
            "48",
        ]
    )
    assert code == 0
    assert json.loads((out / "labels.json").read_text()) == ["1", "2", "3", "4"]
    info = json.loads((out / "run_info.json").read_text())
    assert info["quantized"] is True and info["lora_merged"] is False  # merging would round the 4-bit base
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["after"]["n"] == 20  # 10% of 200, stratified: 5 per class


def test_same_seed_same_metrics(tmp_path, tiny_model_dir, small_csv, trained_run):
    out = tmp_path / "again"
    assert train_tiny(small_csv, tiny_model_dir, out) == 0
    assert json.loads((out / "metrics.json").read_text()) == json.loads(
        (trained_run / "metrics.json").read_text()
    )


def test_non_empty_output_is_refused(trained_run, small_csv, tiny_model_dir, capsys):
    code = main(
        ["train", "--data", str(small_csv), "--model", str(tiny_model_dir), "--output", str(trained_run)]
    )
    assert code == 2
    assert "not empty" in capsys.readouterr().err


def test_cli_errors_exit_2_without_traceback(tmp_path, tiny_model_dir):
    bad = write_csv(tmp_path / "bad.csv", [{"body": "x", "label": "a"}, {"body": "y", "label": "b"}])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmclf",
            "train",
            "--data",
            str(bad),
            "--model",
            str(tiny_model_dir),
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "column(s) ['text'] not found" in proc.stderr and "['body', 'label']" in proc.stderr


def test_notes_go_to_stderr_and_the_result_to_stdout(tmp_path, tiny_model_dir, small_csv, capsys):
    args = ["train", "--data", str(small_csv), "--model", str(tiny_model_dir), *TRAIN_ARGS, "--epochs", "1"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    assert "Run folder:" in out and "Confusion matrix" in out  # the result
    assert "Class balance" not in out and "Loading" not in out and "Tokenising" not in out
    assert "Class balance" in err and "Tokenising 140 texts" in err and "Head initialised" in err
    assert main(["--quiet", *args, "--output", str(tmp_path / "b")]) == 0
    out, err = capsys.readouterr()
    assert "Run folder:" in out  # printed even with --quiet
    assert "Class balance" not in err and "Tokenising" not in err


def test_the_python_api_trains_like_the_command_and_prints_nothing(tmp_path, tiny_model_dir, small_csv):
    # A fresh process, as a library user has: no handler of the command line's on the llmclf logger.
    config = {
        "data": {
            "path": str(small_csv),
            "train_per_class": 20,
            "val_per_class": 5,
            "test_per_class": 10,
            "max_length": 64,
        },
        "model": {"name": str(tiny_model_dir), "quantize": "none", "precision": "fp32"},
        "train": {"epochs": 1, "lr": 2e-3, "batch_size": 8, "seed": 7},
        "output": str(tmp_path / "run"),
    }
    script = (
        "import json, sys, llmclf\n"
        f"result = llmclf.train(llmclf.load_config(None, {config!r}), quiet=True)\n"
        "sys.stderr.write(json.dumps({'out': str(result.output), 'after': result.metrics['after']['accuracy'],"
        " 'written': result.written}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == ""  # a library prints no results or notes of its own
    reply = json.loads(done.stderr.strip().splitlines()[-1])
    assert reply["written"] and reply["out"] == str(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["after"]["accuracy"] == reply["after"]


def test_a_lone_fingerprint_of_a_failed_run_does_not_block_the_retry(tmp_path):
    from llmclf.training.data_steps import prepare_output

    run = tmp_path / "run"
    run.mkdir()
    (run / "fingerprint.json").write_text("{}")  # what a run that failed while loading its model leaves
    assert prepare_output(str(run), overwrite=False) == run and not any(run.iterdir())
    (run / "fingerprint.json").write_text("{}")
    (run / "notes.txt").write_text("the user's")
    with pytest.raises(LlmclfError, match="is not empty"):
        prepare_output(str(run), overwrite=False)
    assert (run / "notes.txt").read_text() == "the user's"


def test_auto_epochs_scale_with_the_training_split():
    """About 80 optimizer steps, at least one pass and at most eight; a set number is kept as it is."""
    from llmclf.config import TrainConfig

    assert TrainConfig().epochs == 1.0  # the default: auto gained nothing on the suite's small data
    auto = TrainConfig(epochs="auto")
    assert auto.epochs_for(1800) == 1  # 113 steps in one pass: the 2,000-text suite datasets
    assert auto.epochs_for(1280) == 1 and auto.epochs_for(1279) == 1 and auto.epochs_for(1264) == 2
    assert auto.epochs_for(223) == 6  # 14 steps a pass: medical_abstracts
    assert auto.epochs_for(16) == 8 and auto.epochs_for(0) == 8
    assert TrainConfig(epochs=3).epochs_for(223) == 3 and TrainConfig(epochs=0.5).epochs_for(10) == 0.5
    with pytest.raises(LlmclfError, match="train.epochs"):
        TrainConfig(epochs="many")


def test_auto_epochs_are_resolved_and_saved_with_the_run(tmp_path, tiny_model_dir, small_csv):
    """80 training texts at batch 8 are 10 steps a pass: `--epochs auto` makes 8 passes, validates after
    each, and the run's config.yaml holds the number, not the word."""
    out = tmp_path / "auto"
    assert train_tiny(small_csv, tiny_model_dir, out, "--epochs", "auto") == 0  # the last --epochs counts
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 8
    log = json.loads((out / "run_info.json").read_text())["log_history"]
    assert sum("eval_accuracy" in entry for entry in log) == 8
