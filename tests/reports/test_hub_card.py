"""The exported model card as Hugging Face reads it (`huggingface_hub.ModelCard` / `metadata_load`):
base model, library, pipeline tag, datasets, eval results and the widget's example text from the run's
own data; and the exported config.json named after the base model, not a GGUF file's internal name."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, metadata_load

from conftest import saved_probs
from llmclf.cli import main
from llmclf.inference.classifier import Classifier
from llmclf.reports.console import one_line
from llmclf.reports.modelcard import base_model_hub_id, card_data, hub_datasets
from llmclf.reports.run_report import read_run

GGUF_NAME = "Smollm2 135M 8k Lc100K Mix1 Ep2"  # what transformers' GGUF loader leaves in a config


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    """The real `llmclf export` of the tiny run, its base made to carry a GGUF file's internal name as a
    GGUF-converted base (the embedded default) does."""
    original = Classifier.merged_model

    def as_from_gguf(self):
        merged = original(self)
        merged.config._model_name_or_path = GGUF_NAME
        return merged

    out = tmp_path_factory.mktemp("exported") / "model"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Classifier, "merged_model", as_from_gguf)
        assert main(["--quiet", "export", str(trained_run), "--output", str(out)]) == 0
    return out


def exported_scores(exported: Path, run: Path) -> tuple[float, float]:
    """Test accuracy and macro F1 of the exported folder run by plain transformers, one text at a time."""
    import torch
    from sklearn.metrics import f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    preds, _ = saved_probs(run)
    model = AutoModelForSequenceClassification.from_pretrained(exported).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    with torch.inference_mode():
        ids = [
            int(model(**tokenizer([text], truncation=True, return_tensors="pt")).logits[0].argmax())
            for text in preds["text"]
        ]
    predicted = [model.config.id2label[i] for i in ids]
    truth = preds["label"].tolist()
    accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    return accuracy, f1_score(truth, predicted, average="macro")


def test_the_card_metadata_is_valid_for_huggingface_hub(exported, trained_run):
    card = ModelCard.load(exported / "README.md")
    data = card.data
    metrics = json.loads((trained_run / "metrics.json").read_text())["after"]
    assert data.library_name == "transformers" and data.pipeline_tag == "text-classification"
    assert data.tags == ["llmclf", "lora"]
    assert data.base_model is None  # a local folder: no hub id to name
    assert data.datasets is None  # the tiny run's data is a local CSV
    assert data.model_name == trained_run.name
    # The eval results are what the exported model scores on the test split: the tiny run mixes in a
    # lexical part (metrics.json gives the mix's figures), so they are the model's own, recomputed here
    # with plain transformers.
    info = json.loads((trained_run / "run_info.json").read_text())
    assert info["lexical"]["weight"] > 0 and metrics["accuracy"] != info["lexical"]["test_accuracy"]["model"]
    accuracy, macro_f1 = exported_scores(exported, trained_run)
    results = {r.metric_type: r for r in data.eval_results}
    assert set(results) == {"accuracy", "f1"}
    assert results["accuracy"].metric_value == pytest.approx(accuracy)
    assert results["f1"].metric_value == pytest.approx(macro_f1, abs=1e-6)
    assert results["f1"].metric_args == {"average": "macro"}
    assert all(
        r.task_type == "text-classification" and r.dataset_type == "small.csv" for r in results.values()
    )
    assert f"{metrics['n']} texts" in results["accuracy"].dataset_name

    # The widget's example is the run's first test text, on one line; so is the code's.
    preds, _ = saved_probs(trained_run)
    first = one_line(preds["text"][0])
    meta = metadata_load(exported / "README.md")
    assert meta["widget"] == [{"text": first}]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == pytest.approx(accuracy)
    assert f"clf({json.dumps(first)})" in card.text
    assert "Stocks rallied" not in card.text

    # What the card said before stays.
    for heading in (
        "## Labels",
        "## Base model and licence",
        "## Intended use",
        "## Limitations",
        "## Metrics",
    ):
        assert heading in card.text
    assert "unknown — check the base model's licence" in card.text
    assert "license" not in meta  # unknown: not guessed


def test_the_exported_config_is_named_after_the_model_not_the_gguf_file(exported, trained_run):
    from transformers import AutoConfig

    config = json.loads((exported / "config.json").read_text())
    assert GGUF_NAME not in json.dumps(config)
    assert config["_name_or_path"] == trained_run.name  # a local base: the run folder's name
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    labels = json.loads((trained_run / "labels.json").read_text())
    assert config["id2label"] == {str(i): label for i, label in enumerate(labels)}
    loaded = AutoConfig.from_pretrained(exported)  # still a config transformers reads
    assert loaded.id2label == dict(enumerate(labels))


def test_the_default_model_and_a_hub_dataset_are_named(trained_run):
    run = read_run(trained_run)
    alias = dataclasses.replace(
        run,
        run_info={**run.run_info, "base_model": "SmolLM2-135M", "base_model_identity": {"kind": "alias"}},
        config={**run.config, "data": {**run.config["data"], "path": "fancyzhx/ag_news"}},
    )
    assert base_model_hub_id(alias) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_datasets(alias) == ["fancyzhx/ag_news"]
    meta = yaml.safe_load(card_data(alias, "apache-2.0", "news").to_yaml())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["datasets"] == ["fancyzhx/ag_news"] and meta["license"] == "apache-2.0"
    assert meta["model-index"][0]["name"] == "news"
    assert meta["model-index"][0]["results"][0]["dataset"]["type"] == "fancyzhx/ag_news"

    # Where the run's classifier mixes in a lexical part, the metadata gives the exported model's own
    # scores, not the mix's (which the card's text gives, with the note).
    lexical = {"weight": 0.5, "test_accuracy": {"model": 0.5, "mixed": 0.95}, "test_macro_f1": {"model": 0.4}}
    mixed = dataclasses.replace(run, run_info={**run.run_info, "lexical": lexical})
    scores = {r.metric_type: r.metric_value for r in card_data(mixed, None, "news").eval_results}
    assert scores == {"accuracy": 0.5, "f1": 0.4}
    unknown = dataclasses.replace(run, run_info={**run.run_info, "lexical": {"weight": 0.5}})
    assert "model_name" not in yaml.safe_load(card_data(unknown, None, "news").to_yaml())

    def base(identity: dict, name: str = "x") -> str | None:
        return base_model_hub_id(
            dataclasses.replace(run, run_info={"base_model": name, "base_model_identity": identity})
        )

    assert base({"kind": "hub", "id": "Qwen/Qwen2.5-0.5B", "revision": "abc"}) == "Qwen/Qwen2.5-0.5B"
    snapshot = "/home/u/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B/snapshots/0123abc"
    assert base({"kind": "folder", "path": snapshot}) == "Qwen/Qwen2.5-0.5B"
    assert base({"kind": "folder", "path": "/data/models/my-llama"}) is None
    assert base({"kind": "gguf", "path": "/data/model.gguf"}) is None
    # Files, folders, the demo and data given in memory are no hub datasets.
    for spec in ("demo", "data/train.csv", "/abs/path", "./local", "<data>", "a/b/c"):
        local = dataclasses.replace(run, config={**run.config, "data": {"path": spec}})
        assert hub_datasets(local) == [], spec
