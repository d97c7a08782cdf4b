"""model.pooling: a decoder's head reads the last real token, or the mean of the text's tokens, the same in
every path that runs the model (full forward, activation cache, layer scoring, reloaded classifier)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from conftest import build_tiny_model, saved_probs, train_tiny
from llmclf.errors import LlmclfError
from llmclf.model.layer_cache import lower_states, pooled_from_states
from llmclf.model.layer_choice import MEAN_MARGIN, choose, layer_states, truncate
from llmclf.model.pooling import masked_mean, pool, pooling_of, use_pooling


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-4"), layers=4)


def _model(path, labels=3):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=labels).eval()
    model.config.pad_token_id = 0
    return model


ROWS = [[5, 9, 11, 40, 7, 13], [8, 3], [100, 101, 102]]


def _padded(rows, left=False):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span], mask[i, span] = torch.tensor(r), 1
    return ids, mask


def test_pool_reads_the_last_real_token_or_the_mean_of_the_real_tokens():
    states = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    torch.testing.assert_close(pool(states, right, "last"), torch.stack([states[0, 2], states[1, 1]]))
    torch.testing.assert_close(pool(states, left, "last"), states[:, 3])
    torch.testing.assert_close(
        pool(states, right, "mean"), torch.stack([states[0, :3].mean(0), states[1, :2].mean(0)])
    )
    torch.testing.assert_close(
        pool(states, left, "mean"), torch.stack([states[0, 1:].mean(0), states[1, 2:].mean(0)])
    )
    torch.testing.assert_close(masked_mean(states, None)[:, 0], states.mean(dim=1))


@pytest.mark.parametrize("left", [False, True])
def test_mean_pooling_feeds_the_head_the_mean_of_the_normed_real_tokens(four_layers, left):
    """Each text's logits are the head on the mean of its final normed states over its real tokens: the
    same padded (either side) as alone, and back to the last token's exactly after `last`."""
    model = _model(four_layers)
    ids, mask = _padded(ROWS, left)
    with torch.inference_mode():
        plain = model(input_ids=ids, attention_mask=mask).logits
        use_pooling(model, "mean")
        assert pooling_of(model) == "mean"
        pooled = model(input_ids=ids, attention_mask=mask).logits
        for i, row in enumerate(ROWS):
            alone = torch.tensor([row])
            normed = model.model(input_ids=alone).last_hidden_state  # every position holds the mean now
            use_pooling(model, "last")
            by_hand = model.score(model.model(input_ids=alone).last_hidden_state.mean(dim=1))[0]
            use_pooling(model, "mean")
            torch.testing.assert_close(normed[0, 0], normed[0, -1])
            torch.testing.assert_close(pooled[i], by_hand, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model(input_ids=alone).logits[0], by_hand, atol=1e-5, rtol=1e-5)
        use_pooling(model, "mean")  # idempotent: one set of hooks
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, pooled)
        use_pooling(model, "last")
        assert pooling_of(model) == "last"
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, plain, atol=0, rtol=0)
    assert not torch.allclose(pooled, plain, atol=1e-3)  # the pooling did change something


def test_the_activation_cache_path_gives_the_full_forward_under_mean_pooling(four_layers):
    """Lower states cached per token (the final norm swapped out), the upper pass then pools the mean:
    the head's input equals the full model's."""
    model = _model(four_layers)
    use_pooling(model, "mean")
    ids, mask = _padded(ROWS)
    with torch.inference_mode():
        states = lower_states(model, ids, mask, start=2)
        assert not torch.allclose(states[0, 0], states[0, 1])  # per token, not pooled
        from_cache = model.score(pooled_from_states(model, states, mask, start=2))
        full = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(from_cache, full, atol=1e-5, rtol=1e-5)


def test_layer_states_score_both_poolings_as_a_cut_model_feeds_its_head(four_layers):
    """(poolings * layers, texts, hidden), pooling-major: layer 2's mean rows are what the model cut after
    layer 2 with mean pooling feeds its head."""
    whole = _model(four_layers)
    states = layer_states(whole, ROWS, [2, 4], pad_id=0, batch_size=2, poolings=("last", "mean"))
    assert states.shape == (4, len(ROWS), 64)
    cut = _model(four_layers)
    truncate(cut, 2)
    for k, (model, pooling) in enumerate([(cut, "last"), (whole, "last"), (cut, "mean"), (whole, "mean")]):
        for i, row in enumerate(ROWS):
            with torch.inference_mode():
                hidden = model.model(input_ids=torch.tensor([row])).last_hidden_state[0]
            want = hidden[-1] if pooling == "last" else hidden.mean(dim=0)
            np.testing.assert_allclose(states[k, i], want.numpy(), atol=1e-5)


def test_choose_picks_the_pooling_that_carries_the_class_and_the_last_token_on_a_tie():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 60)
    states = rng.normal(size=(4, len(labels), 32)).astype(np.float32)  # (last, mean) x layers (10, 12)
    states[2] += rng.normal(size=(4, 32))[labels] * 1.5  # the mean at layer 10 knows the class
    picked = choose(states, labels, [10, 12], total=12, poolings=("last", "mean"))
    assert (picked.layer, picked.pooling) == (10, "mean")
    assert len(picked.scores) == len(picked.mean_scores) == 2 and picked.mean_scores[0] > 0.9
    same = np.concatenate([states[:2], states[:2]])  # both poolings alike: the last token is kept
    assert choose(same, labels, [10, 12], total=12, poolings=("last", "mean")).pooling == "last"
    assert choose(states, labels, [10, 12], total=12, poolings=("mean",)).pooling == "mean"


def test_auto_takes_the_mean_only_where_it_beats_the_last_token_by_the_margin(monkeypatch):
    """Scores 0.80 (last) against 0.81 (mean): within MEAN_MARGIN, the exportable last token is kept;
    against 0.83 the mean is taken, at its own best layer."""
    from llmclf.model import layer_choice

    states = np.zeros((4, 8, 2), dtype=np.float32)
    for mean_best, want in ((0.81, ("last", 12)), (0.83, ("mean", 10))):
        fake = [0.70, 0.80, mean_best, 0.75]  # (last 10, last 12, mean 10, mean 12)
        monkeypatch.setattr(layer_choice, "score_layers", lambda *a, fake=fake: fake)
        picked = choose(states, np.zeros(8), [10, 12], total=12, poolings=("last", "mean"))
        assert (picked.pooling, picked.layer) == want
    assert layer_choice.MEAN_MARGIN == 0.02
    info = picked.info()
    assert info["pooling"] == "mean" and len(info["mean_scores"]) == 2


def test_each_thread_pools_with_its_own_batchs_mask(four_layers):
    """The server runs the model from several threads: each call's mean uses its own attention mask."""
    model = _model(four_layers)
    use_pooling(model, "mean")
    batches = [_padded(ROWS), _padded(ROWS[1:]), _padded([ROWS[0]]), _padded(ROWS, left=True)]
    with torch.inference_mode():
        want = [model(input_ids=i, attention_mask=m).logits for i, m in batches]
    got: dict[int, list] = {}

    def work(k):
        with torch.inference_mode():
            got[k] = [model(input_ids=batches[k][0], attention_mask=batches[k][1]).logits for _ in range(20)]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, logits in enumerate(want):
        for out in got[k]:
            torch.testing.assert_close(out, logits, atol=1e-5, rtol=1e-5)


def test_mean_pooling_is_refused_for_an_encoder(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    encoder = BertForSequenceClassification(config)
    with pytest.raises(LlmclfError, match="--pooling mean: this model is an encoder"):
        use_pooling(encoder, "mean")
    use_pooling(encoder, "last")  # its own pooling stays: nothing to do
    with pytest.raises(LlmclfError, match="model.pooling is 'max'"):
        use_pooling(encoder, "max")


@pytest.fixture(scope="module")
def mean_run(four_layers, small_csv, tmp_path_factory):
    run = tmp_path_factory.mktemp("mean") / "run"
    assert train_tiny(small_csv, four_layers, run, "--pooling", "mean", "--lora-layers", "1") == 0
    return run


def test_a_mean_pooled_run_trains_reloads_to_its_own_probabilities_and_refuses_export(
    mean_run, tmp_path, capsys, monkeypatch
):
    from llmclf import Classifier
    from llmclf.cli import main

    info = json.loads((mean_run / "run_info.json").read_text())
    assert info["pooling"] == "mean" and info["feature_layer"]["pooling"] == "mean"
    assert info["feature_layer"]["mean_scores"] and not info["feature_layer"]["scores"]  # only mean scored
    assert "mean of the text's token states" in (mean_run / "report.md").read_text()
    preds, probs = saved_probs(mean_run)
    clf = Classifier.load(mean_run)
    assert pooling_of(clf.model) == "mean"
    np.testing.assert_allclose(clf.predict_proba(preds["text"].tolist()), probs, atol=1e-4)
    use_pooling(clf.model, "last")  # the same weights read at the last token give other probabilities
    assert np.abs(clf.predict_proba(preds["text"].tolist()) - probs).max() > 1e-3

    def slow_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(Classifier, "load", slow_load)  # refused from run_info.json, before the slow load
    assert main(["export", mean_run.as_posix(), "--output", str(tmp_path / "export")]) != 0
    err = capsys.readouterr().err
    assert "mean of the text's tokens" in err and "--pooling last" in err
    assert not any((tmp_path / "export").glob("*.safetensors"))


def test_a_tampered_pooling_record_stops_the_load(mean_run, tmp_path):
    import shutil

    from llmclf import Classifier
    from llmclf.manifest import write_manifest
    from llmclf.training.saving import MANIFESTED

    run = tmp_path / "run"
    shutil.copytree(mean_run, run)
    info = json.loads((run / "run_info.json").read_text())
    (run / "run_info.json").write_text(json.dumps({**info, "pooling": "max"}))
    write_manifest(run, names=MANIFESTED)  # the manifest agrees: the value itself is checked
    with pytest.raises(LlmclfError, match="pooling is 'max'"):
        Classifier.load(run)


def test_auto_pooling_scores_both_and_records_what_the_head_reads(four_layers, small_csv, tmp_path):
    run = tmp_path / "run"
    assert train_tiny(small_csv, four_layers, run, "--lora-layers", "1") == 0
    info = json.loads((run / "run_info.json").read_text())
    chosen = info["feature_layer"]
    assert len(chosen["scores"]) == len(chosen["mean_scores"]) == len(chosen["candidates"])
    gap = max(chosen["mean_scores"]) - MEAN_MARGIN - max(chosen["scores"])
    if abs(gap) > 1e-4:  # the recorded scores are rounded to 4 digits
        assert chosen["pooling"] == ("mean" if gap > 0 else "last")
    row = chosen["mean_scores"] if chosen["pooling"] == "mean" else chosen["scores"]
    assert row[chosen["candidates"].index(chosen["layer"])] >= max(row) - 1e-4
    assert info["pooling"] == chosen["pooling"]


def test_mean_pooling_under_fsdp_is_refused_before_anything_runs(four_layers, monkeypatch):
    from llmclf.training import feature_layer, fsdp
    from llmclf.training.backend import Encoded

    monkeypatch.setattr(fsdp, "requested", lambda: True)
    encoded = Encoded(ids={"train": ROWS, "test": ROWS}, labels={"train": [0, 1, 2]}, rows={}, truncated={})
    with pytest.raises(LlmclfError, match="--pooling mean: under FSDP"):
        feature_layer.pick_feature_layer(
            "auto",
            _model(four_layers),
            encoded,
            pooling="mean",
            pad_id=0,
            zero_shot=None,
            precision="fp32",
            batch_size=2,
            seed=0,
        )


def test_a_mean_pooled_run_resumes_with_its_recorded_choice(mean_run, four_layers, small_csv, tmp_path):
    """Only the mean was scored (--pooling mean): the record has no last-token scores, and resumes."""
    import shutil

    out = tmp_path / "interrupted"
    shutil.copytree(mean_run, out)
    (out / "metrics.json").unlink()
    assert train_tiny(small_csv, four_layers, out, "--pooling", "mean", "--lora-layers", "1", "--resume") == 0
    info = json.loads((out / "run_info.json").read_text())
    assert info["pooling"] == "mean"
    assert info["feature_layer"] == json.loads((mean_run / "run_info.json").read_text())["feature_layer"]


def test_a_recorded_pooling_that_does_not_fit_stops_the_resume():
    from llmclf.training.feature_layer import recorded_choice

    record = {
        "layer": 4,
        "of": 4,
        "candidates": [2, 4],
        "scores": [],
        "pooling": "mean",
        "mean_scores": [0.5, 0.6],
    }
    assert recorded_choice(record, 4, [2, 4], "auto").pooling == "mean"
    for setting, edit in [
        ("last", {}),  # the run asks for the last token, the record says mean
        ("auto", {"pooling": "max"}),
        ("auto", {"mean_scores": []}),  # the chosen pooling's scores are missing
        ("auto", {"scores": [0.5]}),
        ("auto", {"mean_scores": [0.5, True]}),
    ]:
        with pytest.raises(LlmclfError, match="Start a new run"):
            recorded_choice({**record, **edit}, 4, [2, 4], setting)


def test_runs_written_before_the_pooling_setting_resume_as_the_last_token():
    from llmclf.training.checkpoints import fingerprint_differences

    current = {"data": {"sha256": "x"}, "labels": ["a"], "model": {"source": "m", "quantized": False}}
    saved = {**current, "settings": {"train.lr": 1e-4}}
    for value, differs in (("auto", False), ("last", False), ("mean", True)):
        now = {**current, "settings": {"train.lr": 1e-4, "model.pooling": value}}
        assert bool(fingerprint_differences(saved, now)) == differs
