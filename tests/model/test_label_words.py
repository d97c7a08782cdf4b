"""Zero-shot from label words: the head holds the language model's output embeddings of the label
names, so its scores are the model's own next-word logits, and on a planted task the evaluation before
training is far above chance."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import read_demo_rows, train_tiny, write_csv
from llmclf.model.label_words import label_token_ids, zero_shot_head
from llmclf.model.loading import load_classifier


def test_labels_that_are_no_words_or_share_a_first_token_give_no_zero_shot(tiny_model_dir):
    loaded = load_classifier(str(tiny_model_dir), ["a", "b"], for_training=False)
    tok = loaded.tokenizer
    assert label_token_ids(tok, ["0", "1", "2"]) is None  # numbers are no words
    assert label_token_ids(tok, ["Sports", "Sports fans"]) is None  # the same first token
    ids = label_token_ids(tok, ["Business", "Sports", "World"])
    assert ids == [tok("Business", add_special_tokens=False)["input_ids"][0]] + [
        tok(w, add_special_tokens=False)["input_ids"][0] for w in ("Sports", "World")
    ]


def test_the_zero_shot_head_scores_are_the_language_models_next_word_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    labels = ["Business", "Sports", "World"]
    loaded = load_classifier(str(tiny_model_dir), labels, for_training=False)
    weight = zero_shot_head(loaded.model, loaded.tokenizer, labels, str(tiny_model_dir))
    assert weight is not None and weight.shape == (3, 64)
    with torch.no_grad():
        loaded.model.score.weight.copy_(weight)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = loaded.tokenizer(["stocks fell sharply today", "the match"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        head = loaded.model(**ids).logits  # (2, 3): the last real token's scores
        full = lm(**ids).logits  # (2, seq, vocab)
    last = ids["attention_mask"].sum(dim=1) - 1
    expected = full[torch.arange(2), last][:, label_token_ids(loaded.tokenizer, labels)]
    torch.testing.assert_close(head, expected, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def echo_model(tmp_path_factory, tiny_model_dir):
    """The tiny model with its attention and MLP outputs zeroed: each position's state is its token's
    embedding, so the next-word scores favour the token just read (a planted zero-shot task)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("echo")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(out)
    return out


def planted_rows(tokenizer) -> list[dict]:
    """Demo texts that end with (the first token of) their label's name after a quote."""
    rows = []
    for row in read_demo_rows():
        label = {"Sci/Tech": "Tech"}.get(row["label"], row["label"])  # first tokens B, T, S, W: distinct
        first = tokenizer(label, add_special_tokens=False)["input_ids"][0]
        words = " ".join(row["text"].split()[:6])  # short: truncation must not cut the planted end
        rows.append({"text": f'{words} "{tokenizer.decode([first])}', "label": label})
    return rows


@pytest.mark.parametrize("template", ["{text}", "none"])
def test_zero_shot_before_training_is_far_above_chance_on_a_planted_task(tmp_path, echo_model, template):
    loaded = load_classifier(str(echo_model), ["a", "b"], for_training=False)
    data = write_csv(tmp_path / "planted.csv", planted_rows(loaded.tokenizer))
    out = tmp_path / "run"
    assert train_tiny(data, echo_model, out, "--prompt-template", template, "--lexical", "off") == 0
    before = json.loads((out / "metrics.json").read_text())["before"]
    info = json.loads((out / "run_info.json").read_text())
    if template == "none":  # no prompt: the random head's chance level, said as such
        assert info["before_training"] == "random head"
        assert before["accuracy"] < 0.6
    else:
        assert info["before_training"] == "zero-shot"
        assert before["accuracy"] >= 0.9  # chance is 0.25
        report = (out / "report.md").read_text()
        assert "zero-shot before training: accuracy" in report


def test_zero_shot_reads_the_next_word_position_when_the_head_reads_the_mean(tmp_path, echo_model):
    """Under --pooling mean the label words are still scored at the last token (where the next word is
    predicted): the planted task stays far above chance before training."""
    loaded = load_classifier(str(echo_model), ["a", "b"], for_training=False)
    data = write_csv(tmp_path / "planted.csv", planted_rows(loaded.tokenizer))
    out = tmp_path / "run"
    assert (
        train_tiny(
            data, echo_model, out, "--prompt-template", "{text}", "--lexical", "off", "--pooling", "mean"
        )
        == 0
    )
    info = json.loads((out / "run_info.json").read_text())
    assert info["pooling"] == "mean" and info["before_training"] == "zero-shot"
    assert json.loads((out / "metrics.json").read_text())["before"]["accuracy"] >= 0.9
    # the zero-shot pass ran the test texts through the whole model: the cache took their lower states
    test_rows = sum(json.loads((out / "data_summary.json").read_text())["counts"]["test"].values())
    assert info["activation_cache"]["rows_from_layer_choice"] == test_rows
