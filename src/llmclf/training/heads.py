"""The pipeline's steps around the classifier head: the evaluation before training (zero-shot or the
random head), the linear-probe head fine-tuning starts from, and the lexical part mixed in after."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from llmclf import distributed, labelsets
from llmclf.data import Splits, inputs
from llmclf.inference.lexical import MIX_WEIGHT, LexicalHead, choose_weight, fit_lexical, lexical_inputs
from llmclf.inference.metrics import compute_metrics
from llmclf.inference.task import Task
from llmclf.model.label_words import set_head
from llmclf.reports import console
from llmclf.training import checkpoints
from llmclf.training.backend import Backend, Encoded
from llmclf.training.probe import init_head_from_label_probes, init_head_from_probe, init_head_from_ridge

log = logging.getLogger("llmclf")
SPLITS = ("train", "val", "test")


def evaluate_before(
    backend: Backend,
    encoded: Encoded,
    task: Task,
    start: checkpoints.ResumePoint,
    out: Path,
    zero_shot: torch.Tensor | None = None,
    zero_shot_probs: np.ndarray | None = None,
) -> dict:
    """Test metrics before training, or those an interrupted run saved: zero-shot where the labels are
    words under a prompt template (`zero_shot`: the label words' output embeddings, put into the head
    for this pass only; `zero_shot_probs`: their probabilities, scored on the whole model before it was
    cut at its feature layer), else the random head's (chance level)."""
    if start.before is not None:  # the same model and test split
        log.info("Reusing the metrics before training saved by the interrupted run.")
        before = start.before
    else:
        kept = (
            None if zero_shot is None or zero_shot_probs is not None else set_head(backend.model, zero_shot)
        )
        probs = zero_shot_probs
        if probs is None:
            probs = backend.score_frozen(
                encoded.ids["test"], encoded.rows["test"], "evaluating before training"
            )
        if kept is not None:
            set_head(backend.model, kept)  # training starts from the head the config asks for
        if zero_shot is not None:
            log.info("Before training: zero-shot, the model's next-word scores for the label names.")
        before = task.metrics(encoded.labels["test"], probs)
        if distributed.is_main():
            checkpoints.save_before(out, before)
    log.info("%s\n", console.compare(None, before, title="Test metrics before training"))
    return before


def fit_probe(
    backend: Backend,
    encoded: Encoded,
    weights: list[float] | None,
    seed: int,
    task: Task,
    known: np.ndarray | None = None,
) -> dict:
    """Start the head from a linear probe on the frozen features instead of from random weights.
    `known`: the training texts' features where the layer choice's pass computed them all."""
    features = known if known is not None else backend.features(encoded.ids["train"], encoded.rows["train"])
    if task.regression:
        return fit_ridge(backend, encoded, features, task)
    if task.multi_label:
        probe = init_head_from_label_probes(backend.model, features, encoded.labels["train"], seed)
        probs = backend.probe_probs(encoded.rows["test"])  # the probes' test figure, where nearly free
        if probs is not None:
            probe["test_micro_f1"] = task.metrics(encoded.labels["test"], probs)["micro_f1"]
        log.info("Linear probes per label on the frozen features: %s", probe)
        return probe
    fitted = init_head_from_probe(backend.model, features, encoded.labels["train"], weights, seed)
    probe = {
        "train_accuracy": fitted.train_accuracy,
        "cv_log_loss": fitted.cv_log_loss,
        "temperature": round(fitted.temperature, 4),
    }
    probs = backend.probe_probs(encoded.rows["test"])  # what LoRA adds on top, where nearly free
    if probs is not None:
        probe["test_accuracy"] = float((probs.argmax(axis=1) == np.asarray(encoded.labels["test"])).mean())
    log.info("%s", console.probe_line(probe))
    return probe


def fit_ridge(backend: Backend, encoded: Encoded, features: np.ndarray, task: Task) -> dict:
    """The regression head from a ridge fit on the frozen features (the probe's counterpart)."""
    fitted = init_head_from_ridge(backend.model, features, encoded.labels["train"])
    ridge = {
        "train_r2": fitted.train_r2,
        "cv_mse": fitted.cv_mse * task.scale.scale**2,
        "alpha": fitted.alpha,
    }
    outputs = backend.probe_probs(encoded.rows["test"])  # the ridge head's test predictions, where cheap
    if outputs is not None:
        ridge["test_mse"] = task.metrics(encoded.labels["test"], outputs)["mse"]
    log.info(
        "Ridge head on the frozen features: training R² %.3f, leave-one-out MSE %.4g%s",
        ridge["train_r2"],
        ridge["cv_mse"],
        f", test MSE {ridge['test_mse']:.4g}" if "test_mse" in ridge else "",
    )
    return ridge


def tune_thresholds(backend: Backend, encoded: Encoded, task: Task) -> Task:
    """A multi-label task with each label's threshold tuned for F1 on the validation split (0.5 where
    there is none, or the label has no positive there); other tasks as they are."""
    if not task.multi_label:
        return task
    if not encoded.ids["val"]:
        log.info("note: no validation split to tune the labels' thresholds on; each label is decided at 0.5")
        return task
    probs = backend.score(encoded.ids["val"], "tuning the labels' thresholds on the validation split")
    thresholds = labelsets.tune_thresholds(probs, np.asarray(encoded.labels["val"]))
    log.info(
        "Thresholds per label (validation F1): %s", dict(zip(task.labels, np.round(thresholds, 3).tolist()))
    )
    return dataclasses.replace(task, thresholds=tuple(thresholds))


def add_lexical(
    backend: Backend,
    splits: Splits,
    encoded: Encoded,
    weights: list[float] | None,
    seed: int,
    test_probs: np.ndarray,
) -> tuple[LexicalHead | None, np.ndarray]:
    """Fit TF-IDF + LR on the training split and mix it in, unless the validation split shows the mix
    clearly worse than the model. Returns the lexical part and the test probabilities of the mix."""
    texts = {name: lexical_inputs(*inputs(getattr(splits, name))) for name in SPLITS}
    head = fit_lexical(texts["train"], encoded.labels["train"], len(splits.labels), weights, seed)
    if encoded.ids["val"]:
        val_probs = backend.score(encoded.ids["val"], "scoring the validation split")
        choose_weight(head, val_probs, head.log_proba(texts["val"]), encoded.labels["val"])
    else:
        head.weight = MIX_WEIGHT
        log.info(
            "note: no validation split to check the lexical mix on; mixed in with weight %.1f", MIX_WEIGHT
        )
    test_log = head.log_proba(texts["test"])
    mixed = head.combine(test_probs, test_log)
    scored = {"model": test_probs, "lexical": test_log, "mixed": mixed}
    tested = {
        name: compute_metrics(encoded.labels["test"], p.argmax(axis=1), splits.labels)
        for name, p in scored.items()
    }
    test = {name: m["accuracy"] if m["n"] else None for name, m in tested.items()}
    head.info["test_accuracy"] = test
    head.info["test_macro_f1"] = {name: m["macro_f1"] if m["n"] else None for name, m in tested.items()}
    log.info(
        "Lexical part (TF-IDF + LR, C=%g): weight %.1f; test accuracy: model %s, TF-IDF %s, mixed %s",
        head.info["C"],
        head.weight,
        *(f"{v:.3f}" if v is not None else "-" for v in test.values()),
    )
    return head, mixed
