"""The prompt template lives in the tokenizer: every path that tokenises frames the text alike, the
template survives truncation, saving and export, and a plain transformers load frames texts the same."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import plain_transformers, read_demo_rows, train_tiny
from llmclf.cli import main
from llmclf.config import load_config
from llmclf.errors import LlmclfError
from llmclf.model.loading import load_tokenizer
from llmclf.model.prompt import apply_template, resolve_template, template_ids

SENTENCE = resolve_template("sentence")


@pytest.fixture
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def test_the_template_frames_the_text_and_survives_truncation(tokenizer):
    plain = tokenizer("stocks fell sharply today")["input_ids"]
    apply_template(tokenizer, SENTENCE)
    pieces = template_ids(tokenizer)
    prefix, suffix = pieces["llmclf_prefix"], pieces["llmclf_suffix"]
    assert prefix and suffix
    assert prefix == tokenizer('This sentence : "', add_special_tokens=False)["input_ids"]
    framed = tokenizer("stocks fell sharply today")["input_ids"]
    assert framed == prefix + plain + suffix
    # truncation cuts the text, never the template
    cut = tokenizer(
        "stocks fell sharply today " * 20, truncation=True, max_length=len(prefix) + len(suffix) + 3
    )
    ids = cut["input_ids"]
    assert len(ids) == len(prefix) + len(suffix) + 3
    assert ids[: len(prefix)] == prefix and ids[-len(suffix) :] == suffix
    # a batch, padded on the right: every row framed
    batch = tokenizer(["a b", "stocks fell sharply"], padding=True)["input_ids"]
    assert all(row[: len(prefix)] == prefix for row in batch)


def test_the_saved_tokenizer_keeps_the_template(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    apply_template(tokenizer, SENTENCE)
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("the match ended")["input_ids"] == tokenizer("the match ended")["input_ids"]
    with pytest.raises(LlmclfError, match="already holds a prompt template"):
        apply_template(again, SENTENCE)  # never framed twice


def test_the_template_goes_inside_the_tokenizers_own_special_tokens(tokenizer):
    from tokenizers.processors import TemplateProcessing

    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    plain = tokenizer("stocks fell", add_special_tokens=False)["input_ids"]
    apply_template(tokenizer, "Text: {text} Topic:")
    pieces = template_ids(tokenizer)
    assert tokenizer("stocks fell")["input_ids"] == [
        bos,
        *pieces["llmclf_prefix"],
        *plain,
        *pieces["llmclf_suffix"],
    ]


@pytest.mark.parametrize("value", ["no placeholder", "{text} and {text}", ""])
def test_a_template_without_one_placeholder_is_refused(value):
    with pytest.raises(LlmclfError, match="model.prompt_template"):
        load_config(overrides={"model": {"prompt_template": value}})


def test_the_recipe_preset_keeps_the_text_as_it_is():
    assert load_config(overrides={"preset": "recipe", "model": {}}).model.prompt_template == "none"


@pytest.fixture(scope="module")
def framed_run(tmp_path_factory, tiny_model_dir, small_csv):
    out = tmp_path_factory.mktemp("framed") / "run"
    assert train_tiny(small_csv, tiny_model_dir, out, "--prompt-template", "sentence") == 0
    return out


def test_a_framed_run_reloads_with_its_template_and_predicts_as_in_training(framed_run):
    import pandas as pd

    from llmclf import Classifier

    clf = Classifier.load(framed_run)
    assert template_ids(clf.tokenizer)["llmclf_suffix"]
    saved = pd.read_csv(framed_run / "predictions_test.csv")
    probs = clf.model_proba(saved["text"].tolist())
    model_cols = [c for c in saved.columns if c.startswith("prob_")]
    assert len(model_cols) == len(clf.labels)
    # the saved probabilities are the classifier's (model + lexical part where kept)
    np.testing.assert_allclose(
        clf.predict_proba(saved["text"].tolist()), saved[model_cols].to_numpy(), atol=1e-5
    )
    assert probs.shape == (len(saved), len(clf.labels))


def test_the_export_frames_texts_in_plain_transformers(framed_run, tmp_path):
    from llmclf import Classifier

    out = tmp_path / "export"
    assert main(["--quiet", "export", str(framed_run), "--output", str(out)]) == 0
    texts = [r["text"] for r in read_demo_rows()[:12]]
    got = plain_transformers(out, texts, tmp_path)
    clf = Classifier.load(framed_run)
    assert got["ids"] == clf.tokenizer(texts[0])["input_ids"]
    np.testing.assert_allclose(got["probs"], clf.model_proba(texts), atol=1e-5)


def test_auto_frames_a_decoders_texts_and_leaves_an_encoders_alone(tiny_model_dir):
    from types import SimpleNamespace

    from torch import nn

    from llmclf.model.loading import load_classifier

    decoder = load_classifier(str(tiny_model_dir), ["a", "b"], for_training=False).model
    encoder = SimpleNamespace(score=None, classifier=nn.Linear(4, 2))  # what anatomy.is_encoder looks at
    assert resolve_template("auto", decoder) == SENTENCE
    assert resolve_template("auto", encoder) is None
    assert load_config().model.prompt_template == "auto"
