"""The layer choice's pass keeps the activation cache's states of the texts it runs, so the cache runs its
frozen layers only over the other texts: the states are those the cache computes, and a run gives the
results it gives without the sharing."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import build_tiny_model, train_tiny
from llmclf.model import layer_cache
from llmclf.model.layer_cache import ActivationCache, LowerStates, lower_states
from llmclf.model.layer_choice import layer_states

IDS = [[5, 9, 11, 40, 7], [8, 3], [100, 101, 102], [12, 13, 14, 15, 16, 17, 18], [60]]


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-6"), layers=6)


@pytest.fixture(scope="module")
def model(six_layers):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(six_layers, num_labels=3).eval()


def _alone(model, ids, start):
    """A text's input to layer `start` as the cache computes it, the text alone in its batch, in bf16."""
    with torch.inference_mode():
        states = lower_states(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), start)
    return states[0].to(torch.bfloat16)


def test_the_layer_pass_keeps_each_texts_input_to_the_asked_layers(model):
    keep = {1: [None] * len(IDS), 4: [None] * len(IDS)}
    layer_states(model, IDS, [4, 6], pad_id=0, batch_size=2, inputs_of=keep)
    for start, rows in keep.items():
        for ids, kept in zip(IDS, rows, strict=True):
            assert kept.dtype == torch.bfloat16 and kept.shape == (len(ids), 64)  # its own tokens, no padding
            torch.testing.assert_close(kept, _alone(model, ids, start), atol=2e-2, rtol=2e-2)


def test_the_cache_takes_the_known_rows_and_runs_its_layers_over_the_others(model, monkeypatch):
    ran: list[int] = []
    real = layer_cache.lower_states

    def counted(model, input_ids, attention_mask, start):
        ran.append(input_ids.shape[0])
        return real(model, input_ids, attention_mask, start)

    plain = ActivationCache.build(model, IDS, 3, pad_id=0, batch_size=2)
    monkeypatch.setattr(layer_cache, "lower_states", counted)
    known = LowerStates(3, {0: plain.rows([0])[0] + 1, 3: plain.rows([3])[0] + 1})  # marked: +1
    shared = ActivationCache.build(model, IDS, 3, pad_id=0, batch_size=2, known=known)
    assert sum(ran) == len(IDS) - 2 and shared.kept == 2
    for i in range(len(IDS)):
        expected = plain.rows([i])[0] + (1 if i in known.rows else 0)
        assert torch.equal(shared.rows([i])[0], expected)
    ran.clear()
    other_start = ActivationCache.build(model, IDS, 2, pad_id=0, batch_size=2, known=known)
    assert sum(ran) == len(IDS) and other_start.kept == 0  # states of another layer are not taken


def test_the_deepest_candidates_starts_are_kept_within_the_memory_budget(model, monkeypatch):
    from llmclf.training import feature_layer

    ids = [[1, 2, 3], [4, 5]]  # 5 tokens: one start's states are 5 x 64 x 2 bytes
    start_of = {2: 1, 4: 3, 6: 5}.get
    for budget, kept in ((10**6, [5, 3, 1]), (2 * 5 * 64 * 2, [5, 3]), (5 * 64 * 2 - 1, None)):
        monkeypatch.setattr(feature_layer, "SHARED_BYTES", budget)
        keep = feature_layer._starts_to_keep(model, ids, [2, 4, 6], start_of)
        assert (None if keep is None else list(keep)) == kept
        assert keep is None or all(rows == [None, None] for rows in keep.values())


def _probs(run):
    frame = pd.read_csv(run / "predictions_test.csv")
    return frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy()


def test_a_run_shares_the_pass_and_gives_the_results_it_gives_without(
    six_layers, small_csv, tmp_path, monkeypatch
):
    from llmclf.training import feature_layer

    shared = tmp_path / "shared"
    assert train_tiny(small_csv, six_layers, shared, "--lora-layers", "1", "--lexical", "off") == 0
    monkeypatch.setattr(feature_layer, "SHARED_BYTES", 0)  # nothing fits: the cache runs every text
    alone = tmp_path / "alone"
    assert train_tiny(small_csv, six_layers, alone, "--lora-layers", "1", "--lexical", "off") == 0
    info = {run.name: json.loads((run / "run_info.json").read_text()) for run in (shared, alone)}
    counts = json.loads((shared / "data_summary.json").read_text())["counts"]
    train_rows = sum(counts["train"].values())
    assert info["shared"]["feature_layer"] == info["alone"]["feature_layer"]
    assert info["shared"]["activation_cache"]["rows_from_layer_choice"] == train_rows  # the sampled texts
    assert info["alone"]["activation_cache"]["rows_from_layer_choice"] == 0
    np.testing.assert_allclose(_probs(shared), _probs(alone), atol=1e-3)


@pytest.mark.parametrize(
    ("cache", "world", "fsdp_on", "layers", "expected"),
    [
        ("memory", 1, False, 2, "cached"),
        ("off", 1, False, 2, "uncached"),
        ("memory", 1, False, "all", "uncached"),
        ("memory", 2, False, 2, "launched"),
        ("memory", 1, True, 2, "launched"),
    ],
)
def test_the_layer_pass_keeps_states_only_where_the_backend_builds_a_cache(
    model, monkeypatch, cache, world, fsdp_on, layers, expected
):
    from llmclf import distributed
    from llmclf.config import load_config
    from llmclf.training import backend, fsdp
    from llmclf.training.model_steps import cache_start_of

    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(fsdp, "requested", lambda: fsdp_on)
    config = load_config(overrides={"lora": {"layers": layers}, "train": {"activation_cache": cache}})
    top = None if layers == "all" else layers
    assert backend.cache_use(top, config.train) == expected
    start_of = cache_start_of(model, config, 0.2)  # one decision: the pass keeps states iff a cache is built
    assert (start_of is not None) == (expected == "cached")
    if start_of is not None:
        assert start_of(6) == 4 and start_of(2) is None  # cut after layer 6: layers 4-5 adapted


def test_auto_depth_adapts_a_short_training_split_deeper_and_the_cache_starts_below_it(
    tmp_path, monkeypatch, small_csv, six_layers
):
    from llmclf.model import anatomy

    assert anatomy.auto_share(100_000) == anatomy.auto_share(10**6) == 0.2  # long splits: the top fifth
    assert anatomy.auto_share(40_000) == 0.5 and anatomy.auto_share(50_000) == 0.4
    assert anatomy.auto_share(1) == 0.5  # at most half
    assert anatomy.top_layers_of(30, "auto", 0.2) == 6 and anatomy.top_layers_of(30, "auto", 0.4) == 12
    assert anatomy.top_layers_of(30, 4, 0.5) == 4  # a number given stays as given

    def run(name):
        out = tmp_path / name
        assert train_tiny(small_csv, six_layers, out, "--feature-layer", "last", "--lexical", "off") == 0
        return json.loads((out / "run_info.json").read_text())

    short = run("short")  # the small csv: a few hundred tokens, so the top half
    assert short["lora_layers"]["adapted"] == 3 and short["lora_layers"]["auto_share"] == 0.5
    assert short["activation_cache"]["start_layer"] == 3
    monkeypatch.setattr(anatomy, "SHARE_TOKENS", 1)  # as if the split were long: the top fifth
    long = run("long")
    assert long["lora_layers"]["adapted"] == 2 and long["activation_cache"]["start_layer"] == 4


def test_the_probe_is_fitted_on_the_layer_pass_features_without_running_the_layers_again(
    six_layers, small_csv, tmp_path, monkeypatch
):
    from llmclf.training import backend, feature_layer

    real_choose = feature_layer._choose_layer
    ran: list[int] = []
    real_features = backend.CachedBackend.features

    def counted(self, ids, rows):
        ran.append(len(ids))
        return real_features(self, ids, rows)

    monkeypatch.setattr(backend.CachedBackend, "features", counted)
    args = ("--lora-layers", "2", "--lexical", "off")
    shared = tmp_path / "shared"
    assert train_tiny(small_csv, six_layers, shared, *args) == 0
    assert ran == []  # every training text was in the layer pass: its features were taken

    def without_features(*a, **k):
        choice, lower, _ = real_choose(*a, **k)
        return choice, lower, None

    monkeypatch.setattr(feature_layer, "_choose_layer", without_features)
    alone = tmp_path / "alone"
    assert train_tiny(small_csv, six_layers, alone, *args) == 0
    counts = json.loads((alone / "data_summary.json").read_text())["counts"]
    assert ran == [sum(counts["train"].values())]  # the cache's top layers ran over the training split
    info = {run.name: json.loads((run / "run_info.json").read_text()) for run in (shared, alone)}
    assert info["shared"]["feature_layer"] == info["alone"]["feature_layer"]
    # fp32, but the cache holds bf16 states: the two ways' features differ by that rounding
    for key in ("train_accuracy", "cv_log_loss", "temperature"):
        assert info["shared"]["probe"][key] == pytest.approx(info["alone"]["probe"][key], rel=1e-2, abs=1e-3)
    np.testing.assert_allclose(_probs(shared), _probs(alone), atol=5e-3)
    assert (_probs(shared).argmax(1) == _probs(alone).argmax(1)).all()


def test_the_layer_pass_features_are_handed_over_once():
    from llmclf.training.feature_layer import FeatureLayer

    features = np.ones((3, 4), dtype=np.float32)
    layer = FeatureLayer(None, train_features=features)
    assert layer.take_train_features() is features
    assert layer.take_train_features() is None and layer.train_features is None  # not held past the probe
