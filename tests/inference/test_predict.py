"""Length-aware inference batches: a count on CPU, a token budget on a GPU, every row exactly once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmclf.batches import GPU_BATCH_MAX, GPU_BATCH_TOKENS, length_batches
from llmclf.cli.parser import build_parser
from llmclf.config import build_config
from llmclf.errors import LlmclfError
from llmclf.inference.predict import predict_proba
from llmclf.model.loading import load_classifier

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object only: no GPU needed here
LENGTHS = np.random.default_rng(0).lognormal(np.log(40), 0.6, size=3000).astype(int).clip(1, 512)


def check_partition(batches, n):
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(n))  # every row once, none lost


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_explicit_batch_size_is_a_count_of_texts_longest_first(device):
    batches = length_batches(LENGTHS, 7, device)
    check_partition(batches, len(LENGTHS))
    assert all(len(b) == 7 for b in batches[:-1]) and 0 < len(batches[-1]) <= 7
    firsts = [LENGTHS[b[0]] for b in batches]
    assert firsts == sorted(firsts, reverse=True)  # longest first, so each batch pads to its first row
    assert all(LENGTHS[b].max() == LENGTHS[b[0]] for b in batches)


def test_auto_on_cpu_is_32_texts():
    batches = length_batches(LENGTHS, "auto", CPU)
    check_partition(batches, len(LENGTHS))
    assert [len(b) for b in batches[:-1]] == [32] * (len(batches) - 1)


def test_auto_on_a_gpu_fills_a_token_budget():
    batches = length_batches(LENGTHS, "auto", CUDA)
    check_partition(batches, len(LENGTHS))
    padded = [len(b) * LENGTHS[b].max() for b in batches]
    assert max(padded) <= GPU_BATCH_TOKENS and all(len(b) <= GPU_BATCH_MAX for b in batches)
    # Short texts share big batches: far fewer passes than 32 at a time.
    assert len(batches) < len(LENGTHS) / 32 / 4
    # A text longer than the budget still gets a batch of its own.
    check_partition(length_batches([GPU_BATCH_TOKENS * 2, 3, 3], "auto", CUDA), 3)


def test_auto_and_a_count_give_the_same_probabilities(tiny_model_dir):
    loaded = load_classifier(str(tiny_model_dir), ["a", "b", "c"], for_training=False)
    texts = [f"text number {i} " + "word " * (i % 13) for i in range(70)]
    auto = predict_proba(loaded.model, loaded.tokenizer, texts, batch_size="auto", progress=False)
    five = predict_proba(loaded.model, loaded.tokenizer, texts, batch_size=5, progress=False)
    np.testing.assert_allclose(auto, five, atol=1e-5)


def test_eval_batch_size_takes_auto_or_a_positive_count():
    assert build_config({}).train.eval_batch_size == "auto"
    assert build_config({"train": {"eval_batch_size": 64}}).train.eval_batch_size == 64
    with pytest.raises(LlmclfError, match="eval_batch_size"):
        build_config({"train": {"eval_batch_size": 0}})
    parser = build_parser()
    assert parser.parse_args(["predict", "run", "--text", "x", "--batch-size", "auto"]).batch_size == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--eval-batch-size", "many"])
