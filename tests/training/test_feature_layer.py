"""model.feature_layer: the head reads a chosen decoder layer and the layers above it are cut away, in
training, in the reloaded classifier and in the exported model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import build_tiny_model, plain_transformers, saved_probs, train_tiny
from llmclf.errors import LlmclfError
from llmclf.model.layer_choice import candidate_layers, choose, layer_states, truncate


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-4"), layers=4)


def test_choose_picks_the_planted_informative_layer():
    """Five layers of noise, one of which also carries the class: that one is chosen, by a clear margin."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 60)
    states = rng.normal(size=(5, len(labels), 32)).astype(np.float32)
    centres = rng.normal(size=(4, 32)) * 1.5
    states[2] += centres[labels]  # layer candidates[2] knows the class
    candidates = [10, 12, 14, 16, 18]
    picked = choose(states, labels, candidates, total=18)
    assert picked.layer == 14
    others = [s for k, s in enumerate(picked.scores) if k != 2]
    assert picked.scores[2] > 0.9 and max(others) < 0.5  # chance is 0.25


def test_two_classes_of_noise_score_near_chance():
    """scikit-learn's own leave-one-out score says 1.0 for two classes of pure noise; ours must not."""
    from llmclf.model.layer_choice import score_layers

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    noise = rng.normal(size=(1, 400, 24)).astype(np.float32)
    planted = noise + 2.0 * np.eye(24, dtype=np.float32)[labels * 3][None]
    chance, informed = score_layers(np.concatenate([noise, planted]), labels)
    assert chance < 0.62 and informed > 0.85


def test_candidates_cover_the_top_two_thirds_and_the_last_layer():
    assert candidate_layers(30) == [12, 14, 16, 18, 20, 22, 24, 26, 28, 30]
    assert candidate_layers(7) == [3, 5, 7]
    assert candidate_layers(2) == [2]


def test_layer_states_are_what_a_cut_model_feeds_its_head(four_layers):
    """Layer 2's normed state at the last real token equals the pooled output of the model cut after
    layer 2 (and layer 4's that of the whole model), for texts of different lengths (right padding)."""
    from transformers import AutoModelForSequenceClassification

    whole = AutoModelForSequenceClassification.from_pretrained(four_layers, num_labels=2).eval()
    ids = [[5, 9, 11, 40, 7], [8, 3], [100, 101, 102]]
    states = layer_states(whole, ids, [2, 4], pad_id=0, batch_size=2)
    cut = AutoModelForSequenceClassification.from_pretrained(four_layers, num_labels=2).eval()
    assert truncate(cut, 2) == 2 and cut.config.num_hidden_layers == 2 and len(cut.model.layers) == 2
    for k, model in enumerate((cut, whole)):
        for i, row in enumerate(ids):
            with torch.inference_mode():
                hidden = model.model(input_ids=torch.tensor([row])).last_hidden_state[0, -1]
            np.testing.assert_allclose(states[k, i], hidden.numpy(), atol=1e-5)


def _run_info(run):
    return json.loads((run / "run_info.json").read_text())


@pytest.fixture(scope="module")
def cut_run(four_layers, small_csv, tmp_path_factory):
    run = tmp_path_factory.mktemp("cut") / "run"
    assert train_tiny(small_csv, four_layers, run, "--feature-layer", "2", "--lora-layers", "1") == 0
    return run


def test_a_run_cut_at_layer_2_trains_reloads_and_exports_2_layers(cut_run, tmp_path):
    from llmclf import Classifier
    from llmclf.cli import main

    run = cut_run
    info = _run_info(run)
    assert info["feature_layer"]["layer"] == 2 and info["feature_layer"]["of"] == 4
    assert info["feature_layer"]["chosen_by"] == "config"
    report = (run / "report.md").read_text()
    assert "linear-probe head on layer 2 of 4" in report and "the 2 layers above it were cut away" in report
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        layer_ids = {int(k.split("layers.")[1].split(".")[0]) for k in f.keys() if "layers." in k}
    assert layer_ids == {1}  # LoRA on the top layer of the cut model: nothing of layers 3-4 is saved
    preds, probs = saved_probs(run)
    clf = Classifier.load(run)
    assert clf.model.config.num_hidden_layers == 2
    np.testing.assert_allclose(clf.predict_proba(preds["text"].tolist()), probs, atol=1e-4)
    export = tmp_path / "export"
    assert main(["--quiet", "export", str(run), "--output", str(export)]) == 0
    assert json.loads((export / "config.json").read_text())["num_hidden_layers"] == 2
    plain = plain_transformers(export, preds["text"].tolist()[:6], tmp_path)
    np.testing.assert_allclose(plain["probs"], clf.model_proba(preds["text"].tolist()[:6]), atol=1e-4)


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-6"), layers=6)


@pytest.fixture(scope="module")
def auto_run(six_layers, small_csv, tmp_path_factory):
    run = tmp_path_factory.mktemp("auto") / "run"
    assert train_tiny(small_csv, six_layers, run, "--lora-layers", "1") == 0
    return run


def test_auto_scores_the_candidates_and_records_the_choice(auto_run):
    chosen = _run_info(auto_run)["feature_layer"]
    assert chosen["chosen_by"] == "cross-validation" and chosen["candidates"] == [4, 6]
    assert len(chosen["scores"]) == 2 and all(0 <= s <= 1 for s in chosen["scores"])
    best = max(zip(chosen["scores"], chosen["candidates"]))[1]  # the deeper layer on a tie, as `choose`
    assert chosen["layer"] == best
    assert json.loads((auto_run / "feature_layer.json").read_text()) == chosen  # for a resumed run


def _interrupted_copy(run, tmp_path, record):
    """The finished run made to look interrupted (no metrics.json), its recorded layer replaced."""
    out = tmp_path / "interrupted"
    shutil.copytree(run, out)
    (out / "metrics.json").unlink()
    (out / "feature_layer.json").write_text(json.dumps(record))
    return out


def test_a_resumed_run_cuts_at_the_layer_the_interrupted_run_chose(
    auto_run, six_layers, small_csv, tmp_path, monkeypatch
):
    """The recorded layer is taken, not chosen again (its checkpoints hold LoRA for that cut): shown by
    recording the other candidate, which a new choice would not pick, with the layer pass disabled."""
    from llmclf.training import feature_layer

    chosen = _run_info(auto_run)["feature_layer"]
    other = 4 if chosen["layer"] == 6 else 6
    out = _interrupted_copy(auto_run, tmp_path, {**chosen, "layer": other})

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the layers were scored again")

    monkeypatch.setattr(feature_layer, "_choose_layer", no_second_pass)
    assert train_tiny(small_csv, six_layers, out, "--lora-layers", "1", "--resume") == 0
    assert _run_info(out)["feature_layer"]["layer"] == other
    assert clf_layers(out) == other


def clf_layers(run):
    from llmclf.inference.classifier import Classifier

    return Classifier.load(run).model.config.num_hidden_layers


@pytest.mark.parametrize(
    "edit",
    [
        {"layer": 5},  # not a candidate
        {"layer": "6"},
        {"of": 30},  # another model's record
        {"scores": [0.5]},
        {"candidates": [2, 4, 6]},
    ],
)
def test_a_damaged_layer_record_stops_the_resume(auto_run, six_layers, small_csv, tmp_path, capsys, edit):
    out = _interrupted_copy(auto_run, tmp_path, {**_run_info(auto_run)["feature_layer"], **edit})
    assert train_tiny(small_csv, six_layers, out, "--lora-layers", "1", "--resume") != 0
    err = capsys.readouterr().err
    assert "feature_layer.json" in err and "Start a new run" in err


def test_an_unreadable_layer_record_stops_the_resume(auto_run, six_layers, small_csv, tmp_path, capsys):
    out = _interrupted_copy(auto_run, tmp_path, {})
    (out / "feature_layer.json").write_text("[1, 2")
    assert train_tiny(small_csv, six_layers, out, "--lora-layers", "1", "--resume") != 0
    err = capsys.readouterr().err
    assert "feature_layer.json" in err and "Start a new run" in err


def test_a_layer_beyond_the_model_is_refused_before_training(four_layers, small_csv, tmp_path, capsys):
    assert train_tiny(small_csv, four_layers, tmp_path / "run", "--feature-layer", "9") != 0
    err = capsys.readouterr().err
    assert "--feature-layer 9" in err and "4 decoder layers" in err
    assert not (tmp_path / "run" / "adapter").exists()


def test_loading_more_layers_than_the_base_has_is_refused(four_layers):
    from llmclf.model.loading import load_classifier

    with pytest.raises(LlmclfError, match="has 4 decoder layers"):
        load_classifier(str(four_layers), ["a", "b"], for_training=False, layers=7)
    loaded = load_classifier(str(four_layers), ["a", "b"], for_training=False, layers=3)
    assert len(loaded.model.model.layers) == 3


def test_the_recipe_reads_the_last_layer():
    from llmclf.config import build_config

    assert build_config({"preset": "recipe"}).model.feature_layer == "last"
    assert build_config({}).model.feature_layer == "auto"
    assert build_config({"model": {"feature_layer": "14"}}).model.feature_layer == 14
    with pytest.raises(LlmclfError, match="model.feature_layer"):
        build_config({"model": {"feature_layer": "²"}})  # a digit to str.isdigit, not a number to int()


@pytest.mark.parametrize(
    "entry",
    [
        {"layer": 3, "of": 4},  # the adapter sits on layer 2 of a 2-layer cut: a 3-layer model is not it
        {"layer": 2, "of": 6},  # recorded for another base model
        {"layer": 0, "of": 4},
        {"layer": "2", "of": 4},
        {"layer": 2},
        [2, 4],
        None,  # "not cut": the whole 4-layer model under an adapter made for the top of 2 layers
    ],
    ids=["layer raised", "other base", "zero", "string", "no of", "a list", "removed"],
)
def test_an_edited_feature_layer_is_refused_on_reload(cut_run, tmp_path, entry):
    """run_info.json is untrusted: whatever it says about the cut, the model loaded must be the one the
    adapter was trained on, or the load stops (the manifest is rewritten, as a crafted folder would)."""
    import shutil

    from llmclf import Classifier
    from llmclf.manifest import write_manifest
    from llmclf.training.saving import MANIFESTED

    run = shutil.copytree(cut_run, tmp_path / "run")
    info = _run_info(run)
    info["feature_layer"] = entry
    (run / "run_info.json").write_text(json.dumps(info))
    write_manifest(run, names=MANIFESTED)
    with pytest.raises(LlmclfError, match="feature_layer|layers"):
        Classifier.load(run)


def test_a_cut_model_with_per_layer_attention_kinds_reloads_and_saves(four_layers, tmp_path):
    """Qwen3's config lists one attention kind per layer; the cut model's list must be cut too, or
    transformers refuses to save it (the export)."""
    from transformers import AutoModelForSequenceClassification, Qwen3Config, Qwen3ForSequenceClassification

    from llmclf.model.loading import load_classifier

    config = Qwen3Config(
        vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, layer_types=["full_attention"] * 4,
    )  # fmt: skip
    Qwen3ForSequenceClassification(config).save_pretrained(tmp_path / "qwen")
    loaded = load_classifier(
        str(tmp_path / "qwen"), ["a", "b"], for_training=False, tokenizer_source=str(four_layers), layers=2
    )
    assert loaded.model.config.layer_types == ["full_attention"] * 2
    loaded.model.save_pretrained(tmp_path / "saved")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert len(again.model.layers) == 2 and again.config.num_hidden_layers == 2


def test_the_layer_sample_keeps_every_class_even_a_single_row():
    from llmclf.model.layer_choice import sample_rows

    labels = np.array([0] * 3000 + [1] * 1000 + [2])  # class 2 has one row: a stratified split would fail
    rows = sample_rows(labels, 2000, seed=0)
    assert len(rows) == 2000 and len(set(rows)) == 2000 and np.all(np.diff(rows) > 0)
    counts = np.bincount(labels[rows])
    assert counts[2] == 1 and abs(counts[0] - 1500) <= 2 and abs(counts[1] - 500) <= 2
    assert np.array_equal(sample_rows(labels[:50], 2000, seed=0), np.arange(50))


def test_an_explicit_layer_under_fsdp_is_refused(four_layers, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from llmclf.training import feature_layer, fsdp

    model = AutoModelForSequenceClassification.from_pretrained(four_layers, num_labels=2)
    monkeypatch.setattr(fsdp, "requested", lambda: True)
    with pytest.raises(LlmclfError, match="--feature-layer 2: under FSDP"):
        feature_layer._applies(2, model)
    assert feature_layer._applies("auto", model) is False  # auto: the last layer, with a note
