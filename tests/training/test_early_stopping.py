"""Validation every N steps (`--eval-steps`) and early stopping (`--early-stopping-patience`)."""

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file
from transformers import EarlyStoppingCallback, TrainerCallback

from conftest import train_tiny
from llmclf.cli import main
from llmclf.config import TrainConfig, build_config
from llmclf.data import to_dataset
from llmclf.errors import LlmclfError
from llmclf.model.loading import add_lora, load_classifier
from llmclf.training import checkpoints
from llmclf.training.trainer import build_trainer, require_validation, training_arguments

STEPS_PER_EPOCH = 10  # the shared settings: 4 classes x 20 training texts, batches of 8


def history(run):
    return json.loads((run / "run_info.json").read_text())["log_history"]


def evaluations(log):
    return [(e["step"], e["eval_balanced_accuracy"]) for e in log if "eval_balanced_accuracy" in e]


def outcome(log):
    """The Trainer's end-of-training summary entry, which says how training ended."""
    (summary,) = [e for e in log if "train_runtime" in e]
    return summary


def adapter(folder):
    return load_file(folder / "adapter_model.safetensors")


def same_weights(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_patience_stops_training_early_and_keeps_the_best(tmp_path, tiny_model_dir, small_csv, monkeypatch):
    # Keep the checkpoints the run leaves (the best and the newest) to compare the saved adapter with them.
    monkeypatch.setattr(checkpoints, "finish", lambda out, keep_last: None)
    out = tmp_path / "run"
    # No warm-up: it would span the first 20 of the 200 steps the 20 epochs bound, so the first steps
    # would barely move the weights. At lr 2e-3 the tiny model's validation plateaus within a few steps.
    extra = ["--eval-steps", "1", "--early-stopping-patience", "1", "--epochs", "20", "--warmup-ratio", "0"]
    assert train_tiny(small_csv, tiny_model_dir, out, *extra) == 0
    log = history(out)
    last_step = max(e["step"] for e in log)
    assert last_step < 5 * STEPS_PER_EPOCH  # well before the 200 steps of 20 epochs
    assert max(e["epoch"] for e in log) < 5
    evals = evaluations(log)
    assert [step for step, _ in evals] == list(range(1, last_step + 1))  # every step validated
    summary = outcome(log)
    assert summary["stopped_early"] is True
    best = max(value for _, value in evals)
    first_best = next(step for step, value in evals if value == best)
    assert summary["best_metric"] == best and summary["best_step"] == first_best
    # patience 1: it stopped at the first validation after the best that did not improve on it
    assert last_step == first_best + 1
    # The saved classifier is the best step's, not the last step's.
    saved = adapter(out / "adapter")
    root = out / "checkpoints"
    assert same_weights(saved, adapter(root / f"checkpoint-{first_best}"))
    assert not same_weights(saved, adapter(root / f"checkpoint-{last_step}"))


def test_eval_steps_validates_every_n_steps_and_at_each_epoch_end(tmp_path, tiny_model_dir, small_csv):
    out = tmp_path / "run"
    assert train_tiny(small_csv, tiny_model_dir, out, "--eval-steps", "3", "--epochs", "2") == 0
    log = history(out)
    evals = evaluations(log)
    # every 3 steps, and at the ends of the epochs (steps 10 and 20), each step once
    assert [step for step, _ in evals] == [3, 6, 9, 10, 12, 15, 18, 20]
    summary = outcome(log)
    assert summary["stopped_early"] is False and summary["step"] == 2 * STEPS_PER_EPOCH  # no patience
    best = max(value for _, value in evals)
    assert summary["best_metric"] == best
    assert summary["best_step"] == next(step for step, value in evals if value == best)


def test_per_epoch_validation_stays_the_default(trained_run):
    log = history(trained_run)  # the shared run: 2 epochs, no --eval-steps
    assert [step for step, _ in evaluations(log)] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert outcome(log)["stopped_early"] is False


NO_VALIDATION = ["--quantize", "none", "--precision", "fp32", "--val-fraction", "0", "--max-length", "64"]


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--early-stopping-patience", "2"], "--early-stopping-patience needs a validation split"),
        (["--eval-steps", "5"], "--eval-steps needs a validation split"),
    ],
)
def test_validation_flags_without_a_validation_split_are_refused(
    flags, named, tmp_path, tiny_model_dir, small_csv, capsys
):
    out = tmp_path / "run"
    args = ["train", "--data", str(small_csv), "--model", str(tiny_model_dir), "--output", str(out)]
    assert main([*args, *NO_VALIDATION, *flags]) != 0
    err = capsys.readouterr().err
    assert named in err and "--val-fraction" in err and "--val-per-class" in err
    assert "Traceback" not in err and "Loading" not in err  # refused before the model loads
    assert not (out / "metrics.json").exists()  # nothing was trained


def test_a_run_without_validation_split_trains(tmp_path, tiny_model_dir, small_csv, capsys):
    # transformers 5's tokenizer fails on an empty list: the empty validation split crashed tokenising.
    out = tmp_path / "run"
    args = ["train", "--data", str(small_csv), "--model", str(tiny_model_dir), "--output", str(out)]
    assert main([*args, *NO_VALIDATION]) == 0
    assert "no validation split to check the lexical mix on" in capsys.readouterr().err
    assert (out / "metrics.json").is_file()


def test_validation_flags_are_refused_before_anything_trains_without_validation(tmp_path):
    with pytest.raises(LlmclfError, match="--eval-steps and --early-stopping-patience need a validation"):
        require_validation(False, 5, 2)
    require_validation(True, 5, 2)
    require_validation(False, None, None)
    common = dict(epochs=1, lr=1e-3, batch_size=3, eval_batch_size=3, weight_decay=0.0, seed=0, n_train=6)
    with pytest.raises(LlmclfError, match="--early-stopping-patience needs a validation split"):
        training_arguments(str(tmp_path), **common, has_val=False, early_stopping_patience=1)
    args = training_arguments(str(tmp_path), **common, has_val=True, early_stopping_patience=1)
    assert args.eval_strategy == "epoch" and args.save_strategy == "epoch"  # patience alone: per epoch
    assert args.load_best_model_at_end and args.metric_for_best_model == "balanced_accuracy"
    assert args.restore_callback_states_from_checkpoint  # a resumed run keeps its patience count


class Spy(TrainerCallback):
    """Records the steps at which the Trainer validated and saved."""

    def __init__(self):
        self.evaluated, self.saved = [], []

    def on_evaluate(self, args, state, control, **kwargs):
        self.evaluated.append(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        self.saved.append(state.global_step)


TEXTS = ["the market fell", "a new phone", "the team won", "rain in the city", "shares rose", "a late goal"]


def tiny_trainer(tiny_model_dir, tmp_path, *, epochs, eval_steps, save_steps=None, patience=None):
    """A Trainer on 12 training texts in batches of 3 (4 steps an epoch) and 6 validation texts."""
    loaded = load_classifier(str(tiny_model_dir), ["a", "b", "c"])
    model = add_lora(loaded.model, r=4, alpha=8, dropout=0.0, targets="auto", seed=0)
    ids = loaded.tokenizer(TEXTS * 2)["input_ids"]
    train = to_dataset(ids, [0, 1, 2, 0, 0, 2] * 2)
    val = to_dataset(ids[:6], [0, 1, 2, 0, 0, 2])
    args = training_arguments(
        str(tmp_path / "checkpoints"),
        **dict(epochs=epochs, lr=1e-3, batch_size=3, eval_batch_size=3, weight_decay=0.0, seed=0),
        has_val=True,
        n_train=len(train),
        quiet=True,
        eval_steps=eval_steps,
        early_stopping_patience=patience,
    )
    return build_trainer(
        model,
        loaded.tokenizer,
        train,
        val,
        args,
        None,
        quiet=True,
        save_steps=save_steps,
        early_stopping_patience=patience,
    )


def test_save_steps_adds_checkpoints_between_validations(tiny_model_dir, tmp_path):
    trainer = tiny_trainer(tiny_model_dir, tmp_path, epochs=3, eval_steps=5, save_steps=3)
    spy = Spy()
    trainer.add_callback(spy)
    trainer.train()
    # validation every 5 steps, at the epoch ends (4, 8, 12) and at the last step, each once
    assert spy.evaluated == [4, 5, 8, 10, 12]
    # a checkpoint at each validation (to keep the best) and every 3 steps (to resume)
    assert spy.saved == [3, 4, 5, 6, 8, 9, 10, 12]
    assert trainer.training_outcome()["best_step"] in spy.evaluated


def stopper(trainer):
    (found,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)]
    return found


def test_a_resumed_run_takes_up_its_early_stopping_count(tiny_model_dir, tmp_path):
    trainer = tiny_trainer(tiny_model_dir, tmp_path, epochs=10, eval_steps=1, patience=2)
    trainer.train()
    step = trainer.state.global_step
    assert step < trainer.state.max_steps and stopper(trainer).early_stopping_patience_counter == 2
    assert trainer.training_outcome()["stopped_early"] is True

    resumed = tiny_trainer(tiny_model_dir, tmp_path, epochs=10, eval_steps=1, patience=2)
    counts = []

    class AtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            counts.append(stopper(resumed).early_stopping_patience_counter)

    resumed.add_callback(AtStart())
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoints" / f"checkpoint-{step}"))
    assert counts == [2]  # not 0: the patience is not granted afresh by an interruption


@pytest.mark.parametrize("name", ["eval_steps", "early_stopping_patience"])
@pytest.mark.parametrize("value", [0, -1, 2.5, True, "3"])
def test_config_rejects_all_but_whole_numbers_above_zero(name, value):
    with pytest.raises(LlmclfError, match=f"train.{name}="):
        TrainConfig(**{name: value})
    assert getattr(TrainConfig(**{name: 4}), name) == 4
    assert getattr(build_config({"train": {name: None}}).train, name) is None


@pytest.mark.parametrize("flag", ["--eval-steps", "--early-stopping-patience"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_flags_reject_zero_and_negative_values(flag, value, capsys):
    assert main(["train", flag, value]) == 2
    assert f"={value}" in capsys.readouterr().err


def test_resume_with_another_validation_schedule_or_patience_is_refused():
    frame = pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]})
    splits = SimpleNamespace(train=frame, val=frame, test=frame, labels=["x", "y"], counts=lambda: {})

    def fingerprint(**train):
        return checkpoints.run_fingerprint(build_config({"train": train}), splits, "model", False)

    base = fingerprint()
    assert checkpoints.fingerprint_differences(base, fingerprint()) == []
    for key, value in (("eval_steps", 5), ("early_stopping_patience", 2)):
        (difference,) = checkpoints.fingerprint_differences(base, fingerprint(**{key: value}))
        assert f"setting train.{key} differs" in difference
    # a run folder from before these settings existed (no such keys) still resumes without them
    old = {**base, "settings": {k: v for k, v in base["settings"].items() if "eval_steps" not in k}}
    assert checkpoints.fingerprint_differences(old, base) == []
