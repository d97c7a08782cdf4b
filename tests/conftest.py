"""Shared fixtures: a tiny random Llama model with an offline BPE tokenizer, small data, one trained run.

The tiny model has the real architecture of the default model (Llama) at 2 layers and hidden size 64,
so every code path (pad token, last-token pooling, LoRA on q/k/v/o, 4-bit NF4) is exercised in seconds.
Its tokenizer has no pad token on purpose, like Llama's.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from llmclf.data import demo_data_path  # noqa: E402


def read_demo_rows() -> list[dict[str, str]]:
    with demo_data_path().open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> Path:
    fields = fields or list(rows[0])
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def build_tiny_model(out: Path, layers: int = 2) -> Path:
    """A 2-layer (or `layers`-layer) Llama (hidden 64) with a BPE tokenizer trained on the demo texts, without a pad token
    (like Llama's), saved in `out`. Also used by tools/same_run.py."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([r["text"] for r in read_demo_rows()], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    assert tokenizer.pad_token is None  # like Llama: llmclf must supply one
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def small_csv(tmp_path_factory) -> Path:
    """40 rows per class of the demo data, in a CSV of its own with an extra column."""
    rows = read_demo_rows()
    random.Random(0).shuffle(rows)
    picked: list[dict] = []
    for label in sorted({r["label"] for r in rows}):
        picked += [r for r in rows if r["label"] == label][:40]
    for i, row in enumerate(picked):
        row["id"] = f"r{i}"
    return write_csv(tmp_path_factory.mktemp("data") / "small.csv", picked, ["id", "text", "label"])


TRAIN_ARGS = [
    # What `auto` gives on CPU, pinned, so that on a GPU machine these tests check the same exact
    # (fp32) behaviour; the GPU defaults (4-bit, bf16) are tested in test_gpu.py.
    "--quantize",
    "none",
    "--precision",
    "fp32",
    "--train-per-class",
    "20",
    "--val-per-class",
    "5",
    "--test-per-class",
    "10",
    "--epochs",
    "2",
    "--lr",
    "2e-3",
    "--batch-size",
    "8",
    "--max-length",
    "64",
    "--seed",
    "7",
]


PER_CLASS_FLAGS = ("--train-per-class", "--val-per-class", "--test-per-class")
FRACTION_ARGS = [
    arg
    for k, arg in enumerate(TRAIN_ARGS)
    if arg not in PER_CLASS_FLAGS and TRAIN_ARGS[k - 1] not in PER_CLASS_FLAGS
]
"""TRAIN_ARGS without the per-class sizes: for the tasks that split by fractions (multi-label, regression)."""


def saved_probs(run: Path):
    """A run's written test predictions and their probability columns, shape (rows, labels)."""
    import pandas as pd

    preds = pd.read_csv(run / "predictions_test.csv", keep_default_na=False)
    labels = json.loads((run / "labels.json").read_text())
    return preds, preds[[f"prob_{label}" for label in labels]].to_numpy()


def on_device(model, batch: dict) -> dict:
    """The batch's tensors on the model's device: CUDA when the suite runs on a GPU machine."""
    device = next(model.parameters()).device
    return {key: value.to(device) for key, value in batch.items()}


def train_tiny(data: Path, model: Path, out: Path, *extra: str) -> int:
    """The real `llmclf train` entry point on the tiny model with the shared small settings."""
    from llmclf.cli import main

    return main(
        [
            "--quiet",
            "train",
            "--data",
            str(data),
            "--model",
            str(model),
            "--output",
            str(out),
            *TRAIN_ARGS,
            *extra,
        ]
    )


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model_dir, small_csv) -> Path:
    """One real `llmclf train` run on the tiny model, shared by the tests that only read its output."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert train_tiny(small_csv, tiny_model_dir, out) == 0
    return out


@contextlib.contextmanager
def propagating(name: str):
    """Let pytest's caplog see a logger's records: the CLI stops `llmclf` from propagating to the root."""
    logger = logging.getLogger(name)
    before, logger.propagate = logger.propagate, True
    try:
        yield
    finally:
        logger.propagate = before


def plain_transformers(export_dir: Path, texts: list[str], work: Path) -> dict:
    """An exported folder run by plain transformers in a fresh process with llmclf made unimportable:
    {"probs": softmax of the logits, "id2label": the config's labels, "ids": the first text's token ids}."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["llmclf"] = None
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        model = AutoModelForSequenceClassification.from_pretrained({str(export_dir)!r}).eval()
        tok = AutoTokenizer.from_pretrained({str(export_dir)!r})
        texts = json.loads(sys.argv[1])
        with torch.inference_mode():
            logits = model(**tok(texts, padding=True, truncation=True, return_tensors="pt")).logits
        json.dump({{"probs": torch.softmax(logits, -1).tolist(), "id2label": model.config.id2label,
                    "ids": tok(texts[0])["input_ids"]}}, open({str(work / "e.json")!r}, "w"))
    """)
    subprocess.run([sys.executable, "-c", script, json.dumps(texts)], check=True, timeout=300)
    return json.loads((work / "e.json").read_text())
