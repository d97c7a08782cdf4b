"""FSDP (fsdp.py): what llmclf refuses under FSDP, and the real launch on a CUDA GPU.

The 2-process CPU launch, compared with DDP, is in test_distributed.py. The GPU test below runs only where
CUDA is present; its command line needs nothing but this interpreter's packages (no make, no network).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TRAIN_ARGS, propagating
from llmclf.cli import main
from llmclf.errors import LlmclfError
from llmclf.training import fsdp

ROOT = Path(__file__).resolve().parents[1]


def train_command(data: Path, model: Path, out: Path) -> list[str]:
    return ["train", "--data", str(data), "--model", str(model), "--output", str(out)]


@pytest.fixture
def fsdp_env(monkeypatch):
    """The variables `accelerate launch` gives its workers with examples/accelerate/fsdp.yaml."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")


def test_fsdp_1_is_refused_with_the_setting_to_change(
    fsdp_env, monkeypatch, tmp_path, tiny_model_dir, small_csv, capsys
):
    monkeypatch.setenv("FSDP_VERSION", "1")
    args = train_command(small_csv, tiny_model_dir, tmp_path / "r")
    assert main([*args, *TRAIN_ARGS]) == 2
    err = capsys.readouterr().err
    assert "FSDP2 only" in err and "fsdp_version: 2" in err
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_fsdp_with_4bit_is_refused(fsdp_env, tmp_path, tiny_model_dir, small_csv, capsys):
    args = train_command(small_csv, tiny_model_dir, tmp_path / "r")
    assert main([*args, *TRAIN_ARGS, "--quantize", "4bit"]) == 2
    err = capsys.readouterr().err
    assert "FSDP with a 4-bit model" in err and "--quantize none" in err and "ddp.yaml" in err
    assert not (tmp_path / "r" / "adapter").exists()


def test_quantize_auto_means_full_precision_under_fsdp(fsdp_env, caplog):
    # auto resolved to 4-bit (as on a GPU with bitsandbytes): FSDP loads the model in full precision instead
    with caplog.at_level(logging.INFO, logger="llmclf"), propagating("llmclf"):
        assert fsdp.check_supported("auto", True) is False
    assert "full precision" in caplog.text
    with pytest.raises(LlmclfError, match="4-bit"):
        fsdp.check_supported("4bit", True)
    assert fsdp.check_supported("none", False) is False


def test_without_fsdp_nothing_changes(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setenv("FSDP_VERSION", "1")  # ignored when FSDP is not asked
    assert fsdp.check_supported("4bit", True) is True
    assert fsdp.check_supported("auto", False) is False


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("precision", "atol"),
    [
        ("fp32", 1e-4),  # the same arithmetic in training's evaluation and in Classifier.load
        # bf16: FSDP computes in bf16 with fp32 LoRA weights; Classifier.load folds LoRA into bf16 weights
        ("auto", 3e-2),
    ],
)
def test_fsdp_one_cuda_process(tmp_path, tiny_model_dir, small_csv, precision, atol):
    """`accelerate launch` with examples/accelerate/fsdp.yaml, 1 process on the GPU: FSDP2 over NCCL."""
    out = tmp_path / "fsdp-gpu"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "examples" / "accelerate" / "fsdp.yaml"),
        "--num_processes",
        "1",
        "-m",
        "llmclf",
        "train",
        "--data",
        str(small_csv),
        "--model",
        str(tiny_model_dir),
        "--output",
        str(out),
        "--precision",
        precision,
        *TRAIN_ARGS,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])

    info = json.loads((out / "run_info.json").read_text())
    assert info["fsdp"] is True and info["world_size"] == 1
    assert info["quantized"] is False  # --quantize auto: full precision under FSDP
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoints").exists()
    # 80 training rows, 8 per step, one process -> 10 steps/epoch, 2 epochs, validation after each.
    assert max(entry.get("step", 0) for entry in info["log_history"]) == 20
    assert sum("eval_balanced_accuracy" in entry for entry in info["log_history"]) == 2

    predictions = pd.read_csv(out / "predictions_test.csv")
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(predictions) == metrics["before"]["n"] == metrics["after"]["n"] == 40
    assert not predictions["text"].duplicated().any()
    labels = json.loads((out / "labels.json").read_text())
    probs = predictions[[f"prob_{label}" for label in labels]].to_numpy()
    hits = (np.array(labels)[probs.argmax(axis=1)] == predictions["label"]).mean()
    assert hits == pytest.approx(metrics["after"]["accuracy"])

    from llmclf.inference.classifier import Classifier

    again = Classifier.load(out).predict_proba(predictions["text"].tolist())
    np.testing.assert_allclose(again, probs, atol=atol)
