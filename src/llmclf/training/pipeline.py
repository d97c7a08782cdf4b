"""The whole recipe as one flow of named steps: load data → define the task → load model → tokenise →
choose the feature layer → choose the backend (and build the activation cache) → evaluate before → fit
the probe head → train → evaluate after (with the lexical part; multi-label: thresholds tuned) → save.

Each step takes plain arguments from the config; the config object stops here. The task (single-label,
multi-label, regression) is decided once, in `define_task`: the `Task` it returns says what the head's
outputs mean, and the steps ask it rather than testing the task themselves.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmclf import distributed, runfolder, runtime
from llmclf.config import SINGLE_LABEL, RunConfig, TrainConfig
from llmclf.data import to_dataset
from llmclf.datafiles import InMemory
from llmclf.inference.task import Task
from llmclf.model.anatomy import auto_share
from llmclf.model.provenance import identify
from llmclf.progress import Timings
from llmclf.reports.run_report import build_report
from llmclf.training import backend as backends
from llmclf.training import checkpoints, estimate, fsdp
from llmclf.training.backend import Backend, Encoded
from llmclf.training.callbacks import TENSORBOARD_DIR, send_tensorboard_to
from llmclf.training.data_steps import (
    define_task,
    load_data,
    plan_epochs,
    prepare_output,
    seed_everything,
    task_info,
    tokenise,
)
from llmclf.training.feature_layer import FeatureLayer
from llmclf.training.heads import add_lexical, evaluate_before, fit_probe, tune_thresholds
from llmclf.training.model_steps import (
    ModelChoice,
    adapt,
    cut_at_feature_layer,
    fold_target_scale,
    head_input_info,
    load_model,
    lora_info,
    merge_for_inference,
    planned_work,
    resolve_model,
)
from llmclf.training.saving import save_memory_copies, save_run
from llmclf.training.trainer import WeightedLossTrainer, build_trainer, require_validation, training_arguments
from llmclf.version import __version__

log = logging.getLogger("llmclf")


@dataclass
class RunResult:
    """What `llmclf.train` returns: the run folder, the test metrics before and after, the wall time."""

    output: Path
    metrics: dict
    seconds: float
    written: bool = True
    """Whether this process wrote the run folder (under a launcher, rank 0 only)."""


def run_training(
    config: RunConfig,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    resume: str | None = None,
    memory: dict[str, InMemory] | None = None,
) -> RunResult:
    """Train, evaluate before and after, and write the run folder. Returns the metrics.

    `resume`: `last` or a checkpoint folder, to continue an interrupted run in `config.output`;
    `quiet`: no progress bars (the notes go to the `llmclf` logger in any case); `memory`: data given in
    memory (`llmclf.train(data=frame)`) by keyword, `data` / `eval_data`, each named in `config` by its
    marker (data.path / data.eval_data); the run folder keeps a copy of each.
    """
    fsdp.check_launch()  # an FSDP version llmclf does not run is refused before anything is written
    with distributed.session():  # under torchrun / accelerate launch: join the process group, then leave
        return _run(config, overwrite, quiet or not distributed.is_main(), resume, memory or {})


def _run(
    config: RunConfig, overwrite: bool, quiet: bool, resume: str | None, memory: dict[str, InMemory]
) -> RunResult:
    started, timings = time.perf_counter(), Timings()
    out = prepare_output(config.output, overwrite, resume)
    seed_everything(config.train.seed)
    splits, weights = load_data(config, memory)
    config = plan_epochs(config, len(splits.train))
    tc, task = config.train, define_task(config, splits)
    require_validation(len(splits.val) > 0, tc.eval_steps, tc.early_stopping_patience)  # before the slow load
    with timings("load_model"):
        choice = resolve_model(config)
        fingerprint = checkpoints.run_fingerprint(config, splits, choice.source, choice.quantized)
        start = checkpoints.begin_run(out, fingerprint, resume)
        model, tokenizer = load_model(config, task, choice)
        # what a later load checks the base model against (hub: the exact revision downloaded)
        identity = identify(config.model.name, revision=getattr(model.config, "_commit_hash", None))
    runtime.release_memory()  # the loading's transient copies
    with timings("tokenise"):
        encoded = tokenise(tokenizer, splits, config.data.max_length, task)
    depth = auto_share(sum(len(ids) for ids in encoded.ids["train"]))  # lora.layers auto, decided once
    if distributed.is_main():
        estimate.announce(planned_work(model, encoded, config, depth), choice.precision)
    with timings("feature_layer"):
        zero_shot, layer = cut_at_feature_layer(config, model, tokenizer, encoded, task, choice, start, depth)
    if layer.choice is not None and distributed.is_main():
        checkpoints.save_layer(out, layer.choice.info())  # a resumed run cuts where this one did
    model, top_layers = adapt(model, config, depth)
    backend = backends.choose(
        model,
        tokenizer,
        encoded,
        top_layers=top_layers,
        precision=choice.precision,
        source=choice.source,
        quantized=choice.quantized,
        train=tc,
        quiet=quiet,
        timings=timings,
        known=layer.take_lower(),
    )
    trainer = new_trainer(backend, encoded, weights, config, task, choice.precision, out, fingerprint, quiet)
    backend.adopt(trainer)  # under FSDP the Trainer shards the model here, before anything runs it
    with timings("eval_before"):
        before = evaluate_before(backend, encoded, task, start, out, zero_shot, layer.zero_shot_probs)
    probe = probe_head(backend, encoded, weights, tc, task, layer, timings)
    with timings("train"):
        train_output = fine_tune(backend, trainer, start.checkpoint)
    runtime.release_memory()  # the activations of the longest batches
    merged = merge_for_inference(backend, choice.quantized)
    with timings("eval_after"):
        # The whole model, as `Classifier` runs it: the reported metrics are those of the saved classifier.
        probs = backend.score(encoded.ids["test"], "evaluating after training")
    lexical = None
    if tc.lexical == "auto" and task.name == SINGLE_LABEL:  # it mixes class probabilities
        with timings("lexical"):
            lexical, probs = add_lexical(backend, splits, encoded, weights, tc.seed, probs)
    task = tune_thresholds(backend, encoded, task)  # multi-label: each label's, on validation
    after = task.metrics(encoded.labels["test"], probs)
    fold_target_scale(backend.model, task)
    state = backend.trained_state()
    metrics = {"before": before, "after": after}
    main = distributed.is_main()
    if main:  # the others wait for its writes when the session ends
        timings.seconds["total"] = time.perf_counter() - started
        info = run_info(config, choice, identity, trainer, train_output, backend, probe, timings, merged)
        info.update(task_info(task, config), lexical=None if lexical is None else lexical.record())
        info["data_in_memory"] = save_memory_copies(out, memory)
        info.update(head_input_info(layer, zero_shot), lora_layers=lora_info(top_layers, config, depth))
        if lexical is not None and lexical.weight > 0:
            lexical.save(out / runfolder.LEXICAL)
        save_run(out, config, trainer, tokenizer, state, splits, weights, encoded, metrics, probs, info, task)
        log.info("Report: %s", build_report(out))  # report.md, report.html and the PNGs, from the files
    del trainer, model, backend  # a caller going on (e.g. to Classifier.load) starts from here
    runtime.release_memory()
    return RunResult(out, metrics, time.perf_counter() - started, written=main)


def probe_head(
    backend: Backend,
    encoded: Encoded,
    weights: list[float] | None,
    tc: TrainConfig,
    task: Task,
    layer: FeatureLayer,
    timings: Timings,
) -> dict | None:
    """The head started from a linear probe where train.head_init is `probe` (else None), fitted on the
    layer pass's features of the training split where that pass ran them all."""
    features = layer.take_train_features()  # handed over once: let go when this step ends
    if tc.head_init != "probe":
        return None
    with timings("probe"):
        probe = fit_probe(backend, encoded, weights, tc.seed, task, features)
    del features
    runtime.release_memory()  # the features and scikit-learn's copies of them
    return probe


def new_trainer(
    backend: Backend,
    encoded: Encoded,
    weights: list[float] | None,
    config: RunConfig,
    task: Task,
    precision: str,
    out: Path,
    fingerprint: dict,
    quiet: bool,
) -> WeightedLossTrainer:
    """The Trainer for this run, over token ids or (with the activation cache) cached states; validating
    every train.eval_steps steps and stopping early where asked (both refused without a validation split)."""
    tc = config.train
    train_ds = to_dataset(encoded.ids["train"], encoded.labels["train"], rows=encoded.rows["train"])
    val_ds = (
        to_dataset(encoded.ids["val"], encoded.labels["val"], rows=encoded.rows["val"])
        if encoded.ids["val"]
        else None
    )
    args = training_arguments(
        str(out / runfolder.CHECKPOINTS),
        epochs=tc.epochs,
        lr=tc.lr,
        batch_size=tc.batch_size,
        eval_batch_size=tc.eval_batch_size,
        weight_decay=tc.weight_decay,
        seed=tc.seed,
        has_val=val_ds is not None,
        n_train=len(train_ds),
        report_to=tc.report_to,
        precision=precision,
        gradient_checkpointing=tc.gradient_checkpointing,
        quiet=quiet,
        lr_scheduler=tc.lr_scheduler,
        warmup_ratio=tc.warmup_ratio,
        eval_steps=tc.eval_steps,
        early_stopping_patience=tc.early_stopping_patience,
        task=task.name,
    )
    trainer = build_trainer(
        backend.model,
        backend.tokenizer,
        train_ds,
        val_ds,
        args,
        weights,
        quiet=quiet,
        cache=backend.cache,
        save_steps=tc.save_steps,
        step_tokens=backend.step_tokens(tc.step_tokens),
        early_stopping_patience=tc.early_stopping_patience,
        task=task.name,
        target_scale=task.scale.scale,
    )
    send_tensorboard_to(trainer, str(out / TENSORBOARD_DIR))
    trainer.fingerprint_sha = checkpoints.fingerprint_sha(fingerprint)
    return trainer


def fine_tune(backend: Backend, trainer: WeightedLossTrainer, checkpoint: str | None) -> Any:
    """Fine-tune; the model ends with the best epoch's weights when there is a validation split."""
    if checkpoint:
        log.info("Resuming from %s", checkpoint)
    output = trainer.train(resume_from_checkpoint=checkpoint)
    backend.model = trainer.model
    return output


def run_info(
    config: RunConfig,
    choice: ModelChoice,
    identity: dict,
    trainer: WeightedLossTrainer,
    train_output: Any,
    backend: Backend,
    probe: dict | None,
    timings: Timings,
    merged: bool,
) -> dict:
    """What ran: the resolved model, precision and launch, versions, the training log, step timings,
    whether LoRA was merged for the evaluation after training (and so for inference)."""
    cache = backend.cache
    return {
        "base_model": config.model.name,
        "resolved_source": choice.source,
        "base_model_identity": identity,
        "quantized": choice.quantized,
        "precision": choice.precision,
        "precision_choice": choice.precision_evidence,
        "attn_implementation": choice.attn,
        "world_size": distributed.world_size(),
        "fsdp": backend.sharded,
        "lora_merged": merged,
        "llmclf_version": __version__,
        "torch_version": torch.__version__,
        "train_runtime_s": train_output.metrics.get("train_runtime"),
        "train_loss": train_output.metrics.get("train_loss"),
        "log_history": trainer.state.log_history,
        "activation_cache": None
        if cache is None
        else {"start_layer": cache.start, "mib": cache.nbytes / 2**20, "rows_from_layer_choice": cache.kept},
        "probe": probe,
        "timings_s": timings.seconds,
    }
