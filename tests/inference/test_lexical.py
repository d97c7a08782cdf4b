"""The lexical part of a classifier (TF-IDF + LR mixed with the model): fitting, the weight chosen on
validation, saving and checked loading, and end to end through train → reload → predict → report."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import read_demo_rows, train_tiny
from llmclf.errors import LlmclfError
from llmclf.inference.lexical import (
    GUARD_SE,
    MIX_WEIGHT,
    WORDS_ONLY,
    LexicalHead,
    choose_weight,
    fit_lexical,
    sklearn_class_weight,
)

WORDS = {0: "stocks market profit bank", 1: "goal match team coach", 2: "virus vaccine doctor clinic"}


def planted(n_per_class: int, seed: int) -> tuple[list[str], list[int]]:
    """Texts whose class shows only in one keyword among filler words."""
    rng = np.random.default_rng(seed)
    filler = "the a of and to in on for with at by from".split()
    texts, labels = [], []
    for label, words in WORDS.items():
        for _ in range(n_per_class):
            body = list(rng.choice(filler, 8)) + [rng.choice(words.split())]
            rng.shuffle(body)
            texts.append(" ".join(body))
            labels.append(label)
    return texts, labels


def test_fit_lexical_learns_planted_keywords_and_gives_log_probabilities():
    texts, labels = planted(20, seed=0)
    head = fit_lexical(texts, labels, num_labels=3, class_weights=None, seed=0)
    test_texts, test_labels = planted(10, seed=1)
    log_p = head.log_proba(test_texts)
    assert log_p.shape == (30, 3)
    np.testing.assert_allclose(np.exp(log_p).sum(axis=1), 1.0, atol=1e-9)
    assert (log_p.argmax(axis=1) == np.asarray(test_labels)).mean() >= 0.9
    assert head.info["C"] > 0 and head.info["vocabulary"] > 10


def test_binary_head_has_one_row_per_label():
    texts, labels = planted(15, seed=0)
    keep = [i for i, y in enumerate(labels) if y < 2]
    head = fit_lexical([texts[i] for i in keep], [labels[i] for i in keep], 2, [1.0, 1.0], seed=0)
    assert head.coef.shape[0] == 2
    probs = np.exp(head.log_proba(["profit bank the a", "coach goal of"]))
    assert probs[0, 0] > 0.5 and probs[1, 1] > 0.5


def test_a_label_absent_from_training_is_never_likely():
    texts, labels = planted(10, seed=0)
    head = fit_lexical(texts, labels, num_labels=4, class_weights=None, seed=0)
    assert np.exp(head.log_proba(texts))[:, 3].max() < 1e-6


def test_the_mix_takes_over_where_the_model_is_blind_and_is_dropped_where_it_hurts():
    texts, labels = planted(20, seed=0)
    head = fit_lexical(texts, labels, 3, None, seed=0)
    val_texts, val_labels = planted(10, seed=2)
    lexical_log = head.log_proba(val_texts)
    y = np.asarray(val_labels)
    # A blind model (uniform): the equal mix follows the lexical part.
    uniform = np.full((len(y), 3), 1 / 3)
    assert choose_weight(head, uniform, lexical_log, val_labels) == MIX_WEIGHT
    assert (head.combine(uniform, lexical_log).argmax(axis=1) == y).mean() >= 0.9
    # A lexical part that points confidently at the wrong class, against a model that is right: dropped.
    wrong = np.log(np.clip(np.eye(3)[(y + 1) % 3] * 0.999 + 0.0005, 1e-12, None))
    right = np.eye(3)[y] * 0.8 + 0.1 / 1
    right = right / right.sum(axis=1, keepdims=True)
    assert choose_weight(head, right, wrong, val_labels) == 0.0
    assert (head.combine(right, wrong).argmax(axis=1) == y).all()  # the model alone
    rows = {row["weight"]: row["balanced_accuracy"] for row in head.info["validation"]}
    assert rows[MIX_WEIGHT] < rows[0.0] - head.info["guard"]["margin"]


def test_the_guard_drops_the_mix_for_a_drop_the_validation_shows_not_for_its_noise():
    """Two texts of 25 that the mix gets wrong and the model right are noise (kept); the same share of
    250 texts is a drop (dropped)."""
    texts, labels = planted(20, seed=0)
    head = fit_lexical(texts, labels, 3, None, seed=0)
    for n, kept in ((25, True), (250, False)):
        y = np.arange(n) % 3
        model = np.full((n, 3), 0.1)
        model[np.arange(n), y] = 0.8  # right on every text
        lexical = np.log(np.full((n, 3), 1 / 3))
        wrong = (y + 1) % 3
        few = np.arange(n) < n * 2 // 25  # 8% of the texts: the lexical part outvotes the model there
        lexical[few] = np.log(np.clip(np.eye(3)[wrong[few]] * 0.9999, 1e-9, None))
        weight = choose_weight(head, model, lexical, y.tolist())
        rows = {row["weight"]: row["balanced_accuracy"] for row in head.info["validation"]}
        assert rows[0.0] - rows[MIX_WEIGHT] == pytest.approx(0.08, abs=0.01)  # the same drop, in share
        assert (weight == MIX_WEIGHT) is kept, (n, head.info["guard"])
        assert head.info["guard"]["standard_errors"] == GUARD_SE


def test_the_paired_standard_error_counts_only_disagreements():
    from llmclf.inference.lexical import paired_standard_error

    y = np.array([0, 0, 1, 1])
    assert paired_standard_error(y, y, y) == 0.0
    one = np.array([1, 0, 1, 1])  # one text of class 0 (weight 1/4) now wrong
    assert paired_standard_error(y, y, one) == pytest.approx(0.25)


def test_a_perfect_model_keeps_its_predictions():
    texts, labels = planted(20, seed=0)
    head = fit_lexical(texts, labels, 3, None, seed=0)
    val_texts, val_labels = planted(10, seed=3)
    y = np.asarray(val_labels)
    perfect = np.eye(3)[y] * 0.98 + 0.01
    choose_weight(head, perfect, head.log_proba(val_texts), val_labels)
    mixed = head.combine(perfect, head.log_proba(val_texts))
    assert (mixed.argmax(axis=1) == y).all()


def test_class_weights_that_sum_to_one_do_not_shrink_the_fit():
    # The run's class weights sum to 1; passed as they were, scikit-learn fitted 3 balanced classes
    # with C/3 (77 classes: C/77, and the heads underfitted).
    texts, labels = planted(20, seed=0)
    plain = fit_lexical(texts, labels, 3, None, seed=0)
    weighted = fit_lexical(texts, labels, 3, [1 / 3] * 3, seed=0)
    assert weighted.info["C"] == plain.info["C"]
    np.testing.assert_allclose(weighted.coef, plain.coef, atol=1e-5)
    assert sklearn_class_weight([0.2, 0.8]) == pytest.approx({0: 0.4, 1: 1.6})
    assert sklearn_class_weight(None) is None


def test_the_probe_head_fits_balanced_weights_as_no_weights():
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from llmclf.training.probe import init_head_from_probe

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=5,
    )
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 12)
    features = rng.normal(size=(60, 16)).astype(np.float32) + np.eye(5, 16)[y] * 1.5  # (n, hidden)
    heads, scores = [], []
    for weights in (None, [0.2] * 5):
        model = LlamaForSequenceClassification(config)
        scores.append(init_head_from_probe(model, features, y.tolist(), weights, seed=0).train_accuracy)
        heads.append(model.score.weight.detach().clone())
    assert scores[0] == scores[1]
    torch.testing.assert_close(heads[0], heads[1], atol=1e-5, rtol=1e-4)


def test_save_and_load_round_trip(tmp_path):
    texts, labels = planted(20, seed=0)
    head = fit_lexical(texts, labels, 3, None, seed=0)
    head.weight = 0.4
    head.save(tmp_path / "lexical")
    loaded = LexicalHead.load(tmp_path / "lexical", num_labels=3)
    assert loaded.weight == 0.4
    np.testing.assert_allclose(loaded.log_proba(texts), head.log_proba(texts), atol=1e-6)


def test_character_ngrams_match_the_spellings_words_miss():
    """A keyword seen only inflected in training ("refunded") is still matched in a new form ("refunds"):
    the word part alone has no feature for it, the character n-grams do."""
    fillers = ["please help me with my account", "my account today please", "help with my account today"]
    forms = {0: ["refunded", "refunding"], 1: ["delivered", "delivering"]}
    texts, labels = [], []
    for label, words in forms.items():
        for k in range(24):  # every filler with every form, equally in both classes: only the form tells
            texts.append(f"{fillers[k % 3]} {words[k % 2]}")
            labels.append(label)
    new = ["my refunds please", "the delivery today"]
    both = fit_lexical(texts, labels, 2, None, seed=0)
    assert both.log_proba(new).argmax(axis=1).tolist() == [0, 1]
    plain = fit_lexical(texts, labels, 2, None, seed=0, features=WORDS_ONLY)
    np.testing.assert_allclose(np.exp(plain.log_proba(new)), 0.5, atol=0.05)  # no word of `new` was seen


def test_the_lexical_part_reads_the_first_max_chars_of_a_huge_text():
    from llmclf.inference.lexical import MAX_CHARS, lexical_inputs

    texts, labels = planted(20, seed=0)
    head = fit_lexical(texts, labels, 3, None, seed=0)
    start = "the goal of the match " * (MAX_CHARS // 22 + 1)  # longer than the cut: class 1's keywords
    huge = start + "stocks market profit bank " * 40_000  # 1 MB of class 0's keywords beyond the cut
    (read,) = lexical_inputs([huge])
    assert read == huge[:MAX_CHARS]
    assert head.log_proba([read]).argmax() == 1
    pair = lexical_inputs(["short"], [huge])[0]
    assert pair == "short\n" + huge[:MAX_CHARS]


def test_a_format_1_lexical_part_still_loads(tmp_path):
    """Run folders written before the character n-grams hold the word part alone, in format 1."""
    from safetensors.numpy import save_file

    texts, labels = planted(20, seed=0)
    head = fit_lexical(texts, labels, 3, None, seed=0)
    word = dict(head.vectorizer.transformer_list)["word"]
    size = len(word.vocabulary_)
    terms = sorted(word.vocabulary_, key=word.vocabulary_.get)
    folder = tmp_path / "lexical"
    folder.mkdir()
    settings = {"format": 1, "ngrams": [1, 2], "weight": 0.5, "info": {}}
    (folder / "lexical.json").write_text(json.dumps(settings))
    (folder / "vocabulary.json").write_text(json.dumps(terms))
    arrays = {"idf": word.idf_, "coef": head.coef[:, :size], "intercept": head.intercept}
    save_file(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()},
        str(folder / "weights.safetensors"),
    )
    loaded = LexicalHead.load(folder, num_labels=3)
    assert [name for name, _ in loaded.vectorizer.transformer_list] == ["word"] and loaded.weight == 0.5
    x = word.transform(texts) @ head.coef[:, :size].T + head.intercept  # the word part's own logits
    expected = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(loaded.log_proba(texts), expected, atol=1e-5)


def _edit(path, **changes):
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **changes}))


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: _edit(d / "lexical.json", weight=7),
        lambda d: _edit(d / "lexical.json", features=[["word", 1, 9], ["char_wb", 2, 5]]),
        lambda d: _edit(d / "lexical.json", format=1),  # format 1 without its n-grams
        lambda d: _edit(d / "vocabulary.json", word=["a", "a"]),
        lambda d: _edit(d / "vocabulary.json", char_wb=["only", "three", "terms"]),
        lambda d: (d / "vocabulary.json").write_text(json.dumps(["a", "list", "of", "format", "1"])),
        lambda d: (d / "weights.safetensors").write_bytes(b"not safetensors"),
    ],
    ids=[
        "weight-out-of-range",
        "other-ngrams",
        "format-1-settings",
        "repeated-terms",
        "vocabulary-shape",
        "vocabulary-not-by-part",
        "not-safetensors",
    ],
)
def test_load_refuses_damaged_files_with_a_clear_error(tmp_path, damage):
    texts, labels = planted(20, seed=0)
    head = fit_lexical(texts, labels, 3, None, seed=0)
    head.weight = 0.5
    head.save(tmp_path / "lexical")
    damage(tmp_path / "lexical")
    with pytest.raises(LlmclfError, match="lexical part is damaged"):
        LexicalHead.load(tmp_path / "lexical", num_labels=3)


# ----------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def keyword_run(tmp_path_factory, tiny_model_dir):
    """The demo news data on the tiny random model: the model barely learns, keywords carry the task."""
    from conftest import write_csv

    root = tmp_path_factory.mktemp("lexical")
    data = write_csv(root / "news.csv", read_demo_rows(), ["text", "label"])
    assert train_tiny(data, tiny_model_dir, root / "run") == 0
    return root / "run"


def test_training_mixes_in_the_lexical_part_and_reload_predicts_the_same(keyword_run):
    from conftest import saved_probs
    from llmclf import Classifier

    info = json.loads((keyword_run / "run_info.json").read_text())
    lexical = info["lexical"]
    assert 0 < lexical["weight"] <= 1
    tested = lexical["test_accuracy"]
    metrics = json.loads((keyword_run / "metrics.json").read_text())
    assert metrics["after"]["accuracy"] == pytest.approx(tested["mixed"])
    assert tested["mixed"] > tested["model"]  # the tiny random model alone is near chance
    manifest = json.loads((keyword_run / "llmclf_manifest.json").read_text())
    assert {"lexical/lexical.json", "lexical/vocabulary.json", "lexical/weights.safetensors"} <= set(
        manifest["files"]
    )
    preds, written = saved_probs(keyword_run)
    clf = Classifier.load(keyword_run)
    assert clf.lexical is not None and clf.lexical.weight == lexical["weight"]
    np.testing.assert_allclose(clf.predict_proba(preds["text"].tolist()), written, atol=1e-5)
    model_only = clf.model_proba(preds["text"].tolist())
    assert np.abs(model_only - written).max() > 1e-3  # the mix is not the model alone


def test_a_changed_lexical_file_stops_the_load(keyword_run, tmp_path):
    from llmclf import Classifier

    copy = tmp_path / "run"
    shutil.copytree(keyword_run, copy)
    settings = copy / "lexical" / "lexical.json"
    data = json.loads(settings.read_text())
    data["weight"] = 1.0 if data["weight"] != 1.0 else 0.5
    settings.write_text(json.dumps(data))
    with pytest.raises(LlmclfError, match="lexical"):
        Classifier.load(copy)


def test_lexical_off_and_the_recipe_keep_the_model_alone(tmp_path, tiny_model_dir, small_csv):
    import yaml

    for extra, name in ((["--lexical", "off"], "off"), (["--preset", "recipe"], "recipe")):
        out = tmp_path / name
        assert train_tiny(small_csv, tiny_model_dir, out, *extra) == 0
        assert json.loads((out / "run_info.json").read_text())["lexical"] is None
        assert not (out / "lexical").exists()
        assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lexical"] == "off"


def test_report_and_model_card_show_each_part(keyword_run, tmp_path):
    from llmclf.cli import main

    assert main(["--quiet", "report", str(keyword_run)]) == 0
    report = (keyword_run / "report.md").read_text()
    assert (
        "TF-IDF + logistic regression alone" in report
        and f"with the TF-IDF part (weight {MIX_WEIGHT})" in report
    )
    out = tmp_path / "export"
    assert main(["--quiet", "export", str(keyword_run), "--output", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "This model alone scored accuracy" in card


def test_a_lexical_part_missing_from_the_manifest_stops_the_load(keyword_run, tmp_path):
    from llmclf import Classifier
    from llmclf.manifest import write_manifest
    from llmclf.training.saving import MANIFESTED

    copy = tmp_path / "run"
    shutil.copytree(keyword_run, copy)
    shutil.rmtree(copy / "lexical")  # run_info.json still says there is one
    write_manifest(copy, names=[name for name in MANIFESTED if name != "lexical"])
    with pytest.raises(LlmclfError, match="does not list lexical/"):
        Classifier.load(copy)
