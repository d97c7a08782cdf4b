"""The GPU path's settings: `auto` resolution of quantisation, precision and attention kernel (with the
machine faked through monkeypatch), their config/flag plumbing, and gradient checkpointing on CPU."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import on_device, train_tiny
from llmclf import hardware, modeling
from llmclf.cli import build_parser, train_overrides
from llmclf.config import build_config
from llmclf.errors import LlmclfError
from llmclf.training import training_arguments

LABELS = ["a", "b", "c"]


def fake_machine(monkeypatch, *, cuda: bool, bf16: bool = True, installed: tuple[str, ...] = ()) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in ("flash_attn", "bitsandbytes"):
            return object() if name in installed else None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize(
    ("cuda", "bf16", "expected"),
    [(False, False, "fp32"), (True, True, "bf16"), (True, False, "fp16")],
)
def test_precision_auto(monkeypatch, cuda, bf16, expected):
    fake_machine(monkeypatch, cuda=cuda, bf16=bf16)
    assert hardware.resolve_precision("auto") == expected


def test_precision_explicit_choices_are_checked(monkeypatch):
    fake_machine(monkeypatch, cuda=False)
    assert hardware.resolve_precision("fp32") == "fp32"
    assert hardware.resolve_precision("bf16") == "bf16"  # runs on CPU, slowly
    with pytest.raises(LlmclfError, match="fp16 needs a CUDA GPU"):
        hardware.resolve_precision("fp16")
    fake_machine(monkeypatch, cuda=True, bf16=False)
    with pytest.raises(LlmclfError, match="no bf16 support"):
        hardware.resolve_precision("bf16")
    assert hardware.resolve_precision("fp16") == "fp16"


@pytest.mark.parametrize(
    ("cuda", "installed", "precision", "expected"),
    [
        (False, ("flash_attn",), "fp32", "sdpa"),
        (True, ("flash_attn",), "bf16", "flash_attention_2"),
        (True, ("flash_attn",), "fp16", "flash_attention_2"),
        (True, ("flash_attn",), "fp32", "sdpa"),  # FlashAttention runs in half precision only
        (True, (), "bf16", "sdpa"),
    ],
)
def test_attention_auto(monkeypatch, cuda, installed, precision, expected):
    fake_machine(monkeypatch, cuda=cuda, installed=installed)
    assert hardware.resolve_attn_implementation("auto", precision) == expected


def test_attention_explicit_flash_says_what_is_missing(monkeypatch):
    fake_machine(monkeypatch, cuda=True)
    with pytest.raises(LlmclfError, match="pip install flash-attn"):
        hardware.resolve_attn_implementation("flash_attention_2", "bf16")
    fake_machine(monkeypatch, cuda=False, installed=("flash_attn",))
    with pytest.raises(LlmclfError, match="needs a CUDA GPU"):
        hardware.resolve_attn_implementation("flash_attention_2", "bf16")
    assert hardware.resolve_attn_implementation("eager", "fp32") == "eager"


@pytest.mark.parametrize(
    ("cuda", "installed", "expected"),
    [(True, ("bitsandbytes",), True), (True, (), False), (False, ("bitsandbytes",), False)],
)
def test_quantize_auto_is_4bit_on_cuda_with_bitsandbytes(monkeypatch, cuda, installed, expected):
    fake_machine(monkeypatch, cuda=cuda, installed=installed)
    assert modeling.resolve_quantize("auto") is expected


def test_flags_reach_the_config():
    args = build_parser().parse_args(
        ["train", "--precision", "bf16", "--attn-implementation", "eager", "--gradient-checkpointing"]
    )
    config = build_config(train_overrides(args))
    assert config.model.precision == "bf16" and config.model.attn_implementation == "eager"
    assert config.train.gradient_checkpointing is True
    for flag in ("bf16", "fp16"):  # the Trainer's spellings set the same field
        assert (
            build_config(train_overrides(build_parser().parse_args(["train", f"--{flag}"]))).model.precision
            == flag
        )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--bf16", "--fp16"])
    defaults = build_config({})
    assert defaults.model.precision == "auto" and defaults.model.attn_implementation == "auto"
    assert defaults.train.gradient_checkpointing is False


@pytest.mark.parametrize(
    ("overlay", "message"),
    [
        ({"model": {"precision": "fp8"}}, "model.precision='fp8'"),
        ({"model": {"attn_implementation": "xformers"}}, "model.attn_implementation='xformers'"),
        ({"train": {"gradient_checkpointing": "yes"}}, "train.gradient_checkpointing='yes'"),
    ],
)
def test_bad_values_are_refused(overlay, message):
    with pytest.raises(LlmclfError, match=message.replace("(", r"\(")):
        build_config(overlay)


def test_training_arguments_take_precision_and_checkpointing(tmp_path):
    args = training_arguments(
        str(tmp_path),
        epochs=1,
        lr=1e-4,
        batch_size=8,
        eval_batch_size=8,
        weight_decay=0.0,
        seed=1,
        has_val=False,
        n_train=16,
        precision="bf16",
        gradient_checkpointing=True,
    )
    assert args.bf16 and not args.fp16
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    plain = training_arguments(
        str(tmp_path), epochs=1, lr=1e-4, batch_size=8, eval_batch_size=8, weight_decay=0.0, seed=1,
        has_val=False, n_train=16,
    )  # fmt: skip
    assert not plain.bf16 and not plain.fp16 and not plain.gradient_checkpointing


def test_half_precision_base_trains_fp32_weights(tiny_model_dir):
    """bf16 base weights; LoRA and the head's trainable copy in fp32 (master weights)."""
    loaded = modeling.load_classifier(
        str(tiny_model_dir), LABELS, precision="bf16", attn_implementation="eager"
    )
    assert loaded.model.config._attn_implementation == "eager"
    model = modeling.add_lora(loaded.model, r=4, alpha=8, dropout=0.0, targets="auto", seed=0)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    assert any("score" in n for n in trainable)
    assert torch.bfloat16 in set(frozen.values())
    ids = on_device(
        model, loaded.tokenizer(["one text", "another, longer text"], padding=True, return_tensors="pt")
    )
    with hardware.autocast("bf16"):
        logits = model(**ids).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_gradient_checkpointing_on_cpu_gives_the_same_run(tmp_path, tiny_model_dir, small_csv, trained_run):
    out = tmp_path / "gc"
    assert train_tiny(small_csv, tiny_model_dir, out, "--gradient-checkpointing") == 0
    info = json.loads((out / "run_info.json").read_text())
    assert info["precision"] == "fp32" and info["attn_implementation"] == "sdpa"
    # Recomputing activations changes memory, not the maths: same losses and predictions.
    first = json.loads((trained_run / "run_info.json").read_text())
    losses = [e["loss"] for e in info["log_history"] if "loss" in e]
    assert losses and np.allclose(losses, [e["loss"] for e in first["log_history"] if "loss" in e], atol=1e-4)
    columns = [c for c in pd.read_csv(out / "predictions_test.csv").columns if c.startswith("prob_")]
    np.testing.assert_allclose(
        pd.read_csv(out / "predictions_test.csv")[columns].to_numpy(),
        pd.read_csv(trained_run / "predictions_test.csv")[columns].to_numpy(),
        atol=1e-4,
    )


def test_a_run_loads_with_the_settings_this_machine_can_run(monkeypatch):
    from llmclf.prediction import inference_settings

    fake_machine(monkeypatch, cuda=False)
    assert inference_settings({}, "auto") == (None, None)  # runs written before these settings existed
    assert inference_settings({"precision": "fp32"}, "eager") == ("fp32", "eager")
    assert inference_settings({"precision": "bf16"}, "flash_attention_2") == (
        "fp32",
        "sdpa",
    )  # GPU run, CPU load
    fake_machine(monkeypatch, cuda=True, installed=("flash_attn",))
    assert inference_settings({"precision": "bf16"}, "flash_attention_2") == ("bf16", "flash_attention_2")


def test_bf16_run_through_the_activation_cache(tmp_path, tiny_model_dir, small_csv):
    """The cached training path calls the top layers itself, outside `model.forward`, which is where the
    Trainer's mixed precision sits: it must take the autocast too (bf16 base, fp32 cached states)."""
    out = tmp_path / "bf16"
    assert train_tiny(small_csv, tiny_model_dir, out, "--precision", "bf16") == 0
    info = json.loads((out / "run_info.json").read_text())
    assert info["precision"] == "bf16" and info["activation_cache"] is not None
    losses = [e["loss"] for e in info["log_history"] if "loss" in e]
    assert losses and np.isfinite(losses).all()
