"""Encoders (BERT family) as backbones: the whole pipeline on a tiny random BERT with its own pooling
([CLS] -> pooler -> dropout -> classifier), the probe head copied exactly into a head with a bias, and
every layer adapted without the activation cache."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_demo_rows, saved_probs, train_tiny
from llmclf.cli import main
from llmclf.errors import LlmclfError
from llmclf.inference.classifier import Classifier
from llmclf.inference.predict import head_inputs, predict_proba
from llmclf.model.anatomy import is_encoder, resolve_top_layers, trainable_head
from llmclf.model.loading import add_lora, load_classifier, lora_targets
from llmclf.training import probe as probes

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_wordpiece(out: Path) -> object:
    """A lower-casing WordPiece tokenizer trained on the demo texts, [CLS] text [SEP], saved in `out`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=800, special_tokens=SPECIALS)
    wordpiece.train_from_iterator([r["text"] for r in read_demo_rows()], trainer=trainer)
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    tokenizer.save_pretrained(out)
    return tokenizer


def build_tiny_encoder(out: Path, family: str = "bert") -> Path:
    """A 2-layer encoder (hidden 32) saved as its bare model, like the MiniLM package's `BertModel`
    folder: loading it for classification adds a random head."""
    from transformers import (
        BertConfig,
        BertModel,
        DistilBertConfig,
        DistilBertModel,
        RobertaConfig,
        RobertaModel,
    )

    tokenizer = build_wordpiece(out)
    torch.manual_seed(0)
    # A wide initialisation: with the usual 0.02 a random encoder gives every text nearly the same [CLS]
    # state (std 2e-4), and the probe, fitted on standardised features, gets weights in the hundreds.
    common = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "initializer_range": 0.3}
    if family == "distilbert":
        config = DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, **common)
        DistilBertModel(config).save_pretrained(out)
        return out
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    if family == "roberta":
        RobertaModel(RobertaConfig(max_position_embeddings=130, **sizes, **common)).save_pretrained(out)
    else:
        BertModel(BertConfig(max_position_embeddings=128, **sizes, **common)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, tiny_bert_dir, small_csv) -> Path:
    """The real `llmclf train` on the tiny BERT, defaults otherwise (all-linear LoRA, probe head,
    lexical part, `--lora-layers auto`)."""
    out = tmp_path_factory.mktemp("runs") / "bert"
    assert train_tiny(small_csv, tiny_bert_dir, out) == 0
    return out


def texts_and_labels(n_per_class: int, labels: list[str] | None = None) -> tuple[list[str], list[str]]:
    """`n_per_class` demo texts of each of `labels` (default: every label), shuffled."""
    rows = read_demo_rows()
    random.Random(1).shuffle(rows)
    labels = labels or sorted({r["label"] for r in rows})
    chosen = [r for label in labels for r in [r for r in rows if r["label"] == label][:n_per_class]]
    return [r["text"] for r in chosen], [r["label"] for r in chosen]


@pytest.mark.parametrize(
    ("family", "labels"),
    [("bert", None), ("bert", ["Sports", "World"]), ("roberta", None), ("distilbert", None), ("llama", None)],
)
def test_probe_head_computes_the_probe(family, labels, tmp_path, tiny_model_dir, monkeypatch):
    """The head initialised from the probe gives, through the model's own forward pass, the probe's own
    probabilities: the features are what the head's output layer sees, the intercept is copied."""
    source = tiny_model_dir if family == "llama" else build_tiny_encoder(tmp_path, family)
    texts, names = texts_and_labels(12, labels)
    label_set = sorted(set(names))
    loaded = load_classifier(str(source), label_set)
    model = add_lora(loaded.model, r=4, alpha=8, dropout=0.0, targets="all-linear", seed=0)
    assert is_encoder(model) == (family != "llama")
    ids = loaded.tokenizer(texts, truncation=True, max_length=64)["input_ids"]
    features = head_inputs(model, loaded.tokenizer, ids, batch_size=5)
    fitted = {}

    def spy(x, *args, **kwargs):
        fitted["x"], fitted["probe"] = x, real_fit(x, *args, **kwargs)
        return fitted["probe"]

    real_fit = probes._fit
    monkeypatch.setattr(probes, "_fit", spy)
    index = {label: i for i, label in enumerate(label_set)}
    probes.init_head_from_probe(model, features, [index[n] for n in names], None, seed=0, soften=False)
    head = trainable_head(model)
    assert (head.bias is not None) == (family != "llama")
    expected = fitted["probe"].predict_proba(fitted["x"])
    got = predict_proba(model, loaded.tokenizer, input_ids=ids, batch_size=5, progress=False)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_encoder_lora_targets_leave_the_head_to_modules_to_save(tmp_path):
    for family, head_linears in (("bert", []), ("roberta", ["dense", "out_proj"]), ("distilbert", [])):
        source = build_tiny_encoder(tmp_path / family, family)
        model = load_classifier(str(source), ["a", "b"]).model
        targets = lora_targets(model, "all-linear")
        assert targets and not any("classifier" in name for name in targets)
        if family == "bert":
            assert "bert.pooler.dense" in targets  # the pooler is adapted (and merged on export)
        peft_model = add_lora(model, r=2, alpha=4, dropout=0.0, targets="all-linear", seed=0)
        trained = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
        assert trained and all("classifier" in n for n in trained), trained
        assert not any(f"classifier.{name}.lora" in n for n in trained for name in head_linears)


def test_encoders_adapt_every_layer_and_refuse_a_layer_count(tiny_bert_dir, tmp_path):
    loaded = load_classifier(str(tiny_bert_dir), ["a", "b"])
    assert loaded.tokenizer.padding_side == "right"  # [CLS] first, positions from the left
    assert resolve_top_layers(loaded.model, "auto") is None
    with pytest.raises(LlmclfError, match="encoder.*--lora-layers all"):
        add_lora(loaded.model, r=2, alpha=4, dropout=0.0, targets="auto", seed=0, top_layers=1)


def test_bert_trains_reloads_predicts_serves_and_exports(bert_run, tmp_path, capsys):
    info = json.loads((bert_run / "run_info.json").read_text())
    assert info["activation_cache"] is None
    probe = info["probe"]
    assert 0 <= probe["train_accuracy"] <= 1 and 0 <= probe["test_accuracy"] <= 1
    adapter = json.loads((bert_run / "adapter" / "adapter_config.json").read_text())
    assert "bert.pooler.dense" in adapter["target_modules"]
    assert not any("classifier" in t for t in adapter["target_modules"])
    preds, expected = saved_probs(bert_run)
    texts = preds["text"].tolist()
    clf = Classifier.load(bert_run)
    np.testing.assert_allclose(clf.predict_proba(texts), expected, atol=1e-5)

    capsys.readouterr()
    assert main(["predict", str(bert_run), "--text", texts[0], "--text", texts[1]]) == 0
    printed = capsys.readouterr().out
    assert all(label in printed for label in np.asarray(clf.labels)[expected[:2].argmax(axis=1)])

    serve_matches(clf, texts[:5])

    export = tmp_path / "export"
    assert main(["--quiet", "export", str(bert_run), "--output", str(export)]) == 0
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    plain = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert type(plain).__name__ == "BertForSequenceClassification"
    with torch.inference_mode():
        batch = tokenizer(texts, truncation=True, padding=True, return_tensors="pt")
        exported = torch.softmax(plain(**batch).logits, -1).numpy()
    np.testing.assert_allclose(exported, clf.model_proba(texts), atol=1e-5)


def test_old_head_names_still_resolve(tiny_model_dir):
    model = load_classifier(str(tiny_model_dir), ["a", "b"]).model
    assert not is_encoder(model) and trainable_head(model) is model.score


def serve_matches(clf: Classifier, texts: list[str]) -> None:
    """`llmclf serve`'s app answers with the classifier's own probabilities."""
    import time

    from fastapi.testclient import TestClient

    from llmclf.serve.app import ServeOptions, create_app
    from llmclf.serve.batcher import ClassifierPredictor

    options = ServeOptions(max_texts=8, max_batch_size=4, max_length=clf.max_length)
    app = create_app(clf.labels, ClassifierPredictor(clf, clf.max_length, 80.0), options)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for _ in range(500):
            if client.get("/health").status_code == 200:
                break
            time.sleep(0.02)
        response = client.post("/classify", json={"texts": texts})
    assert response.status_code == 200, response.text
    got = [[p["probabilities"][label] for label in clf.labels] for p in response.json()["predictions"]]
    np.testing.assert_allclose(got, clf.predict_proba(texts), atol=1e-5)
