"""The GPU path, end to end on a CUDA device: 4-bit NF4 + bf16 by default, checkpointing, fp16, the cache.

Skipped without CUDA (CI has none). Run on a GPU machine with `pytest tests/test_gpu.py`; the results of
the last such run are in docs/options.md ("Checked on a GPU"). The tiny random Llama of conftest.py is used, so
these check behaviour (what is loaded, in which dtype, on which device; that runs reload to the same
probabilities), not speed: benchmarks/gpu.py measures speed on the Llama-3-8B shape.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import saved_probs, train_tiny
from llmclf import Classifier
from llmclf.cli import main
from llmclf.model.anatomy import check_layers
from llmclf.model.layer_cache import ActivationCache, logits_from_states
from llmclf.model.loading import add_lora, load_classifier

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
bnb = pytest.importorskip("bitsandbytes") if torch.cuda.is_available() else None

# conftest's TRAIN_ARGS pin the CPU behaviour (no 4-bit, fp32); these tests check the GPU defaults.
GPU_DEFAULTS = ("--quantize", "auto", "--precision", "auto")
TEXTS = ["the market fell sharply today", "a new phone", "the team won the cup final at home", "rain"]


def run_info(run):
    return json.loads((run / "run_info.json").read_text())


def linear4bit_count(model) -> int:
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_default_run_on_cuda_is_qlora_in_bf16_and_reloads_to_the_same_probabilities(
    tmp_path, tiny_model_dir, small_csv
):
    out = tmp_path / "run"
    assert train_tiny(small_csv, tiny_model_dir, out, *GPU_DEFAULTS) == 0
    info = run_info(out)
    assert info["quantized"] is True  # --quantize auto: 4-bit NF4 on CUDA with bitsandbytes
    assert info["precision"] == "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert info["attn_implementation"] in ("sdpa", "flash_attention_2")
    assert info["activation_cache"] is not None  # the default top-layer cache ran on the GPU too
    losses = [h["loss"] for h in info["log_history"] if "loss" in h]
    assert losses and all(np.isfinite(losses))

    clf = Classifier.load(out)
    assert next(clf.model.parameters()).device.type == "cuda"
    assert linear4bit_count(clf.model) == 14  # 2 layers x 7 linears, the head (score) stays full precision
    preds, expected = saved_probs(out)
    probs = clf.predict_proba(preds["text"].tolist())
    # Same weights, same bf16 kernels, same length-sorted batches as the evaluation after training.
    np.testing.assert_allclose(probs, expected, atol=2e-3)
    metrics = json.loads((out / "metrics.json").read_text())["after"]
    assert metrics["accuracy"] == pytest.approx(float(np.mean(preds["predicted"] == preds["label"])))


def test_evaluate_command_reproduces_the_metrics_on_cuda(tmp_path, tiny_model_dir, small_csv):
    out = tmp_path / "run"
    assert train_tiny(small_csv, tiny_model_dir, out, *GPU_DEFAULTS) == 0
    assert run_info(out)["quantized"] is True
    preds, _ = saved_probs(out)
    test_csv = tmp_path / "test.csv"
    preds[["text", "label"]].to_csv(test_csv, index=False)
    metrics = tmp_path / "m.json"
    assert main(["--quiet", "evaluate", str(out), "--data", str(test_csv), "--output", str(metrics)]) == 0
    after = json.loads((out / "metrics.json").read_text())["after"]
    again = json.loads(metrics.read_text())
    assert again["accuracy"] == pytest.approx(after["accuracy"])
    assert again["confusion_matrix"] == after["confusion_matrix"]


def test_gradient_checkpointing_with_4bit_and_every_layer_adapted(tmp_path, tiny_model_dir, small_csv):
    out = tmp_path / "run"
    code = train_tiny(
        small_csv, tiny_model_dir, out, *GPU_DEFAULTS, "--gradient-checkpointing", "--lora-layers", "all"
    )
    assert code == 0
    info = run_info(out)
    assert info["quantized"] is True and info["activation_cache"] is None  # every layer trains: no cache
    assert all(np.isfinite([h["loss"] for h in info["log_history"] if "loss" in h]))
    assert Classifier.load(out).predict(["a short text"])


def test_fp16_on_a_full_precision_base_trains_fp32_weights(tmp_path, tiny_model_dir, small_csv):
    out = tmp_path / "run"
    assert train_tiny(small_csv, tiny_model_dir, out, "--quantize", "none", "--precision", "fp16") == 0
    info = run_info(out)
    assert info["quantized"] is False and info["precision"] == "fp16"
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert saved and all(t.dtype == torch.float32 for t in saved.values())  # master weights, not fp16
    preds, expected = saved_probs(out)
    np.testing.assert_allclose(
        Classifier.load(out).predict_proba(preds["text"].tolist()), expected, atol=2e-3
    )


def test_cached_forward_equals_full_forward_in_4bit_on_cuda(tiny_model_dir):
    loaded = load_classifier(
        str(tiny_model_dir), ["a", "b", "c"], quantize=True, precision="bf16", for_training=False
    )
    model = add_lora(loaded.model, r=4, alpha=8, dropout=0.0, targets="auto", seed=0, top_layers=1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a non-zero update, so the top layer differs from the base
    model.eval()
    tok = loaded.tokenizer
    ids = tok(TEXTS)["input_ids"]
    batch = {k: v.cuda() for k, v in tok.pad({"input_ids": ids}, return_tensors="pt").items()}
    start = check_layers(model, 1)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        full = model(**batch).logits.float()
        cache = ActivationCache.build(model, ids, start, pad_id=tok.pad_token_id, dtype=torch.float32)
        states, mask = cache.batch(range(len(TEXTS)))
        cached = logits_from_states(model, states.cuda(), mask.cuda(), start).float()
    assert cache.flat.device.type == "cpu"  # the cache lives in host memory, not on the GPU
    torch.testing.assert_close(cached, full, atol=3e-2, rtol=3e-2)
