"""Frozen-layer activation caching: same numbers as the full model, same training, reuse from disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import on_device, train_tiny
from llmclf.errors import LlmclfError
from llmclf.model.anatomy import check_layers
from llmclf.model.layer_cache import ActivationCache, logits_from_states, lower_states
from llmclf.model.loading import add_lora, load_classifier
from llmclf.training import backend

TEXTS = ["the market fell sharply today", "a new phone", "the team won the cup final at home", "rain"]


def test_cached_forward_equals_full_forward(tiny_model_dir):
    loaded = load_classifier(str(tiny_model_dir), ["a", "b", "c"], for_training=False)
    model = add_lora(loaded.model, r=4, alpha=8, dropout=0.0, targets="auto", seed=0, top_layers=1)
    # Make the LoRA update non-zero so the top layer really differs from the base model.
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.eval()
    tok = loaded.tokenizer
    batch = on_device(model, tok.pad({"input_ids": tok(TEXTS)["input_ids"]}, return_tensors="pt"))
    start = check_layers(model, 1)
    assert start == 1
    with torch.no_grad():
        full = model(**batch).logits
        lengths = batch["attention_mask"].sum(1)
        ids = tok(TEXTS)["input_ids"]
        cache = ActivationCache.build(model, ids, start, pad_id=tok.pad_token_id, dtype=torch.float32)
        states, mask = cache.batch(range(len(TEXTS)))
        cached = logits_from_states(
            model, **on_device(model, {"states": states, "attention_mask": mask}), start=start
        )
        # The lower pass itself: right-padded rows equal each text run alone.
        alone = on_device(
            model, {"ids": torch.tensor([ids[2]]), "mask": torch.ones(1, len(ids[2]), dtype=torch.long)}
        )
        alone = lower_states(model, alone["ids"], alone["mask"], start).cpu()
    assert torch.allclose(cache.rows([2])[0], alone[0], atol=1e-5)
    assert mask.sum(1).tolist() == lengths.tolist()
    assert torch.allclose(full, cached, atol=1e-5), (full, cached)


def test_lora_layers_beyond_depth_is_refused(tiny_model_dir):
    loaded = load_classifier(str(tiny_model_dir), ["a", "b"], for_training=False)
    with pytest.raises(LlmclfError, match="has 2 decoder layers"):
        add_lora(loaded.model, r=4, alpha=8, dropout=0.0, targets="auto", seed=0, top_layers=3)


def _losses(run):
    history = json.loads((run / "run_info.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h], [h["eval_loss"] for h in history if "eval_loss" in h]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_training_with_cache_matches_training_without(
    tiny_model_dir, small_csv, tmp_path, monkeypatch, dtype, tol
):
    monkeypatch.setattr(backend, "CACHE_DTYPE", dtype)
    common = ["--lora-layers", "1", "--lora-dropout", "0", "--head-init", "probe"]
    assert train_tiny(small_csv, tiny_model_dir, tmp_path / "off", *common, "--activation-cache", "off") == 0
    assert (
        train_tiny(small_csv, tiny_model_dir, tmp_path / "on", *common, "--activation-cache", "memory") == 0
    )
    (train_off, eval_off), (train_on, eval_on) = _losses(tmp_path / "off"), _losses(tmp_path / "on")
    assert len(train_off) == len(train_on) >= 2 and len(eval_off) == len(eval_on) == 2
    np.testing.assert_allclose(train_on, train_off, rtol=tol, atol=tol)
    np.testing.assert_allclose(eval_on, eval_off, rtol=tol, atol=tol)
    info = json.loads((tmp_path / "on" / "run_info.json").read_text())
    assert info["activation_cache"]["start_layer"] == 1
    metrics = [json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("off", "on")]
    if dtype == torch.float32:
        assert metrics[0]["after"]["confusion_matrix"] == metrics[1]["after"]["confusion_matrix"]
    # The saved adapter adapts only the top layer.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "on" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        lora = [k for k in f.keys() if "lora_" in k]
    assert lora and all(".layers.1." in k for k in lora)


def test_cached_batches_run_in_parts_train_as_whole_batches(tiny_model_dir, small_csv, tmp_path, monkeypatch):
    """--step-tokens small enough that every cached training batch runs in parts: the same run."""
    from conftest import saved_probs
    from llmclf.training import trainer as training

    split = training.split_batch
    part_counts: list[int] = []

    def counting(inputs, max_tokens):
        parts = split(inputs, max_tokens)
        part_counts.append(1 if parts is None else len(parts))
        return parts

    monkeypatch.setattr(training, "split_batch", counting)
    common = ["--lora-layers", "1", "--lora-dropout", "0"]
    assert train_tiny(small_csv, tiny_model_dir, tmp_path / "whole", *common) == 0
    assert part_counts and set(part_counts) == {1}  # the default budget holds these batches whole
    part_counts.clear()
    assert train_tiny(small_csv, tiny_model_dir, tmp_path / "parts", *common, "--step-tokens", "64") == 0
    assert part_counts and min(part_counts) >= 2
    (train_whole, eval_whole), (train_parts, eval_parts) = (
        _losses(tmp_path / "whole"),
        _losses(tmp_path / "parts"),
    )
    np.testing.assert_allclose(train_parts, train_whole, rtol=1e-5)
    np.testing.assert_allclose(eval_parts, eval_whole, rtol=1e-5)
    np.testing.assert_allclose(
        saved_probs(tmp_path / "parts")[1], saved_probs(tmp_path / "whole")[1], atol=1e-5
    )


def test_disk_cache_is_reused(tiny_model_dir, small_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCLF_CACHE", str(tmp_path / "cache"))
    args = ["--lora-layers", "1", "--activation-cache", "disk"]
    assert train_tiny(small_csv, tiny_model_dir, tmp_path / "a", *args) == 0
    files = list((tmp_path / "cache" / "activations").glob("*.safetensors"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    assert train_tiny(small_csv, tiny_model_dir, tmp_path / "b", *args, "--lr", "1e-3") == 0
    assert files[0].stat().st_mtime_ns == stamp  # read, not rewritten
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert a["before"] == b["before"]  # same frozen features, same random head
    # A different max length changes the token ids, so a second cache file appears.
    assert train_tiny(small_csv, tiny_model_dir, tmp_path / "c", *args, "--max-length", "8") == 0
    assert len(list((tmp_path / "cache" / "activations").glob("*.safetensors"))) == 2


def test_probe_head_fits_the_features(tiny_model_dir, small_csv, tmp_path):
    assert (
        train_tiny(small_csv, tiny_model_dir, tmp_path / "p", "--lora-layers", "1", "--head-init", "probe")
        == 0
    )
    probe = json.loads((tmp_path / "p" / "run_info.json").read_text())["probe"]
    assert probe["train_accuracy"] > 0.5  # 4 classes: a fitted probe is far above chance on its own data


def test_all_linear_on_top_layers(tiny_model_dir):
    loaded = load_classifier(str(tiny_model_dir), ["a", "b"], for_training=False)
    model = add_lora(loaded.model, r=4, alpha=8, dropout=0.0, targets="all-linear", seed=0, top_layers=1)
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted and all(".layers.1." in n for n in adapted)
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_disk_cache_key_separates_precisions(tiny_model_dir):
    from llmclf.model.layer_cache import cache_key

    ids = [[1, 2, 3], [4, 5]]
    keys = {p: cache_key(str(tiny_model_dir), False, 1, torch.bfloat16, p, ids) for p in ("fp32", "bf16")}
    assert keys["fp32"] != keys["bf16"]  # states computed in bf16 must not be served to an fp32 run
    assert keys["fp32"] == cache_key(str(tiny_model_dir), False, 1, torch.bfloat16, "fp32", ids)
    assert keys["fp32"] != cache_key(str(tiny_model_dir), False, 1, torch.bfloat16, "fp32", [[1, 2, 3], [4]])
