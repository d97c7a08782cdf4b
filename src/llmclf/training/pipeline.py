"""The whole recipe as one flow of named steps: load data → define the task → load model → tokenise →
choose the feature layer → choose the backend (and build the activation cache) → evaluate before → fit
the probe head → train → evaluate after (with the lexical part; multi-label: thresholds tuned) → save.

Each step takes plain arguments from the config; the config object stops here. The task (single-label,
multi-label, regression) is decided once, in `define_task`: the `Task` it returns says what the head's
outputs mean, and the steps ask it rather than testing the task themselves.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmclf import distributed, runfolder, runtime
from llmclf.config import MULTI_LABEL, REGRESSION, SINGLE_LABEL, RunConfig
from llmclf.data import Splits, class_weights, inputs, load_splits, to_dataset, tokenize_texts
from llmclf.datafiles import InMemory
from llmclf.errors import LlmclfError
from llmclf.inference.task import Task
from llmclf.labelsets import pos_weights
from llmclf.model.adapter import merge_in_place, merged_at_inference
from llmclf.model.anatomy import (
    auto_share,
    is_encoder,
    num_layers,
    resolve_top_layers,
    top_layers_of,
    trainable_head,
)
from llmclf.model.label_words import zero_shot_head
from llmclf.model.layer_choice import MAX_TEXTS
from llmclf.model.loading import add_lora, load_classifier, resolve_quantize
from llmclf.model.pooling import use_pooling
from llmclf.model.prompt import apply_template, resolve_template, separate_pairs
from llmclf.model.provenance import identify
from llmclf.model.sources import resolve_model_source
from llmclf.progress import Timings
from llmclf.reports import console
from llmclf.reports.run_report import build_report
from llmclf.targets import TargetScale
from llmclf.training import backend as backends
from llmclf.training import checkpoints, estimate, fsdp
from llmclf.training.backend import Backend, Encoded
from llmclf.training.callbacks import TENSORBOARD_DIR, send_tensorboard_to
from llmclf.training.feature_layer import FeatureLayer, pick_feature_layer
from llmclf.training.heads import SPLITS, add_lexical, evaluate_before, fit_probe, tune_thresholds
from llmclf.training.saving import save_memory_copies, save_run, target_summaries
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


@dataclass
class ModelChoice:
    """Where the base model comes from and how it runs, resolved once for the run."""

    source: str
    quantized: bool
    precision: str
    attn: str
    precision_evidence: dict | None = None
    """On a CPU with native bf16 under `auto`: the timed matmuls that chose bf16 or fp32."""


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
    probe = None
    if tc.head_init == "probe":
        with timings("probe"):
            probe = fit_probe(backend, encoded, weights, tc.seed, task, layer.train_features)
        runtime.release_memory()  # the features and scikit-learn's copies of them
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_output(output: str, overwrite: bool, resume: str | None = None) -> Path:
    path = Path(output).expanduser()
    if resume is not None:
        if overwrite:
            raise LlmclfError(
                "--resume continues the run in --output; --overwrite would delete it. Give one."
            )
        if not path.is_dir():
            raise LlmclfError(
                f"Cannot resume: run folder {path} not found. Give the --output of the interrupted run."
            )
        return path
    # A lone fingerprint is what a run that failed before its first checkpoint leaves: no reason to stop.
    leftover = {p.name for p in path.iterdir()} - {runfolder.FINGERPRINT} if path.is_dir() else set()
    if leftover and not overwrite:  # every process stops alike
        raise LlmclfError(
            f"Output folder {path} is not empty. Choose another --output, pass --resume to continue an "
            "interrupted run there, or --overwrite to replace it."
        )
    distributed.barrier()  # all have looked before the main process clears it
    if distributed.is_main():  # under a launcher only rank 0 touches the run folder
        if path.exists() and any(path.iterdir()):
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    return path


def load_data(
    config: RunConfig, memory: dict[str, InMemory] | None = None
) -> tuple[Splits, list[float] | None]:
    """Read, validate and split the data per class; weigh the classes. Shows the class balance.

    `memory`: data given in memory, found by the marker that stands for it in data.path / data.eval_data."""
    dc = config.data
    tables = {data.marker: data.table for data in (memory or {}).values()}
    splits = load_splits(
        tables.get(dc.path, dc.path),
        dc.text_column,
        dc.label_column,
        eval_data=tables.get(dc.eval_data, dc.eval_data) if dc.eval_data is not None else None,
        train_per_class=dc.train_per_class,
        val_per_class=dc.val_per_class,
        test_per_class=dc.test_per_class,
        val_fraction=dc.val_fraction,
        test_fraction=dc.test_fraction,
        drop_invalid=dc.drop_invalid,
        seed=config.train.seed,
        text_pair_column=dc.text_pair_column,
        task=config.task,
        label_separator=dc.label_separator,
    )
    weights = None
    if config.train.class_weights == "auto" and splits.task == SINGLE_LABEL:
        weights = class_weights(splits.train["label"], splits.labels)
    elif config.train.class_weights == "auto" and splits.task == MULTI_LABEL:  # each label's positives
        weights = pos_weights(splits.train, splits.labels, dc.path)
    distributed.check_identical((splits.counts(), weights), "data splits or class weights")
    for note in splits.notes:
        log.info("note: %s", note)
    if splits.task != REGRESSION:  # multi-label: texts carrying each label, and its positive weight
        texts = {name: len(getattr(splits, name)) for name in SPLITS} if splits.task == MULTI_LABEL else None
        log.info("%s\n", console.class_balance(splits.counts(), splits.labels, weights, texts))
    else:
        log.info("%s\n", console.target_summary(target_summaries(splits)))
    return splits, weights


def plan_epochs(config: RunConfig, train_texts: int) -> RunConfig:
    """The run's config with `train.epochs: auto` resolved for its training split, as it is saved."""
    epochs = config.train.epochs_for(train_texts)
    if config.train.epochs == "auto":
        log.info(
            "Epochs (auto): %g over %d training texts at batch %d",
            epochs,
            train_texts,
            config.train.batch_size,
        )
    return dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=epochs))


def task_info(task: Task, config: RunConfig) -> dict:
    """run_info.json's record of the task: its name and what a reload needs (a multi-label run's
    thresholds and separator; a regression run's target scale, already folded into the head)."""
    info: dict = {"task": task.name, "target_scale": task.scale.scale if task.regression else None}
    if task.multi_label:
        info["thresholds"] = task.threshold_map()
        info["label_separator"] = config.data.label_separator
    return info


def define_task(config: RunConfig, splits: Splits) -> Task:
    """The run's task; for regression, the training targets' scale, which the model learns them at."""
    if splits.task != REGRESSION:
        return Task(config.task, splits.labels)
    scale = TargetScale.of(splits.train["label"].tolist())
    log.info(
        "Regression: targets are learned divided by %.4g (their standard deviation in train).", scale.scale
    )
    return Task(config.task, splits.labels, scale)


def fold_target_scale(model: Any, task: Task) -> None:
    """Multiply the regression head's outputs by the target scale, so that the saved and exported model
    outputs the column's own units (an elementwise scaling: a shard under FSDP scales alike)."""
    if not task.regression:
        return
    head = trainable_head(model)
    with torch.no_grad():
        head.weight.mul_(task.scale.scale)
        if head.bias is not None:
            head.bias.mul_(task.scale.scale)


def resolve_model(config: RunConfig) -> ModelChoice:
    """The model's source (downloaded or converted once, by the main process first) and how it runs."""
    mc = config.model
    with distributed.main_process_first():  # the others then find it cached
        source = resolve_model_source(mc.name)
    quantized = fsdp.check_supported(mc.quantize, resolve_quantize(mc.quantize))
    precision = runtime.resolve_precision(mc.precision)
    attn = runtime.resolve_attn_implementation(mc.attn_implementation, precision)
    return ModelChoice(source, quantized, precision, attn, runtime.precision_evidence(mc.precision))


def load_model(config: RunConfig, task: Task, choice: ModelChoice) -> tuple[Any, Any]:
    """Base model + classification head (4-bit where chosen), its tokenizer framing texts in the prompt
    template."""
    mc = config.model
    log.info(
        "Loading %s (%s, %s, %s) ...",
        mc.name,
        "4-bit NF4" if choice.quantized else "full precision",
        choice.precision,
        choice.attn,
    )
    loaded = load_classifier(
        choice.source,
        task.labels,
        quantize=choice.quantized,
        trust_remote_code=mc.trust_remote_code,
        precision=choice.precision,
        attn_implementation=choice.attn,
        gradient_checkpointing=config.train.gradient_checkpointing,
        allow_pickle=mc.allow_pickle,
        problem_type=None if task.name == SINGLE_LABEL else task.problem_type,  # sigmoid, or no function
    )
    # framed texts everywhere the tokenizer runs, the saved and exported tokenizer included
    apply_template(loaded.tokenizer, resolve_template(mc.prompt_template, loaded.model))
    if config.data.text_pair_column:  # a separator between a pair's texts, where the tokenizer has none
        separate_pairs(loaded.tokenizer)
    return loaded.model, loaded.tokenizer


def cut_at_feature_layer(
    config: RunConfig,
    model: Any,
    tokenizer: Any,
    encoded: Encoded,
    task: Task,
    choice: ModelChoice,
    start: checkpoints.ResumePoint,
    depth: float,
) -> tuple[torch.Tensor | None, FeatureLayer]:
    """The label words' zero-shot head (None where it does not apply), then the model cut after its
    feature layer (model.feature_layer), which scores that head on the whole model first. A resumed run
    takes the layer and the metrics before training that the interrupted run saved. The head then reads
    the pooling chosen with the layer (model.pooling)."""
    zero_shot = (
        None
        if task.name != SINGLE_LABEL
        or fsdp.requested()
        or resolve_template(config.model.prompt_template, model) is None
        else zero_shot_head(model, tokenizer, task.labels, choice.source)
    )
    layer = pick_feature_layer(
        config.model.feature_layer,
        model,
        encoded,
        pooling=config.model.pooling,
        pad_id=tokenizer.pad_token_id,
        zero_shot=zero_shot if start.before is None else None,
        precision=choice.precision,
        batch_size=config.train.eval_batch_size,
        seed=config.train.seed,
        recorded=start.layer,
        regression=task.name != SINGLE_LABEL,  # numbers, or multi-hot rows: scored by ridge regression
        start_of=cache_start_of(model, config, depth),
    )
    use_pooling(model, layer.pooling)  # before anything reads the head's input (cache, probe, training)
    return zero_shot, layer


def cache_start_of(model: Any, config: RunConfig, depth: float) -> Callable[[int], int | None] | None:
    """The activation cache's first layer were the model cut after layer L (None for an L where every
    layer is adapted), where this run will build a cache; None where it will not. `depth`: the share of
    the layers `lora.layers auto` adapts."""
    layers = config.lora.layers
    try:
        if (
            is_encoder(model)
            or backends.cache_use(top_layers_of(num_layers(model), layers, depth), config.train)
            != backends.CACHED
        ):
            return None
    except LlmclfError:  # not a decoder the cache supports
        return None

    def start_of(layer: int) -> int | None:
        top = top_layers_of(layer, layers, depth)
        return layer - top if top is not None and top < layer else None

    return start_of


def lora_info(top_layers: int | None, config: RunConfig, depth: float) -> dict:
    """run_info's record of the layers LoRA adapted (None: all) and the share `lora.layers auto` chose."""
    return {"adapted": top_layers, "setting": config.lora.layers, "auto_share": depth}


def head_input_info(layer: FeatureLayer, zero_shot: torch.Tensor | None) -> dict:
    """run_info's record of what the head reads (layer, pooling) and of the evaluation before training."""
    return {
        "before_training": "zero-shot" if zero_shot is not None else "random head",
        "feature_layer": None if layer.choice is None else layer.choice.info(),
        "pooling": layer.pooling,
    }


def adapt(model: Any, config: RunConfig, depth: float) -> tuple[Any, int | None]:
    """LoRA on the (possibly cut) model, `depth` its share of the layers under `lora.layers auto`. Returns
    it and how many top layers LoRA adapts (None: all)."""
    lc = config.lora
    top_layers = resolve_top_layers(model, lc.layers, depth)
    model = add_lora(
        model,
        r=lc.r,
        alpha=lc.alpha,
        dropout=lc.dropout,
        targets=lc.targets,
        seed=config.train.seed,
        top_layers=top_layers,
    )
    return model, top_layers


def planned_work(model: Any, encoded: Encoded, config: RunConfig, depth: float) -> estimate.Work:
    """What the run will compute, for the time estimate: base parameters (4-bit ones count as two,
    being packed in pairs), tokens per split, the adapted share of the layers, the layer choice's pass
    (the whole model left uncut: an upper bound)."""
    top_layers = resolve_top_layers(model, config.lora.layers, depth)
    epochs = config.train.epochs
    parameters = sum(
        p.numel() * (2 if hasattr(p, "quant_state") else 1)
        for name, p in model.named_parameters()
        if "lora_" not in name
    )
    tokens = {name: sum(len(ids) for ids in encoded.ids[name]) for name in SPLITS}
    share = 1.0 if top_layers is None else top_layers / num_layers(model)
    validations = (math.ceil(epochs) + 1) if tokens["val"] else 0  # each epoch, and the lexical check
    sampled = min(1.0, MAX_TEXTS / max(1, len(encoded.ids["train"])))  # the layer pass's share of train
    scored = round(tokens["train"] * sampled) + tokens["test"] if config.model.feature_layer == "auto" else 0
    return estimate.Work(parameters, tokens, epochs, share, validations, scored)


def tokenise(tokenizer: Any, splits: Splits, max_length: int, task: Task) -> Encoded:
    """Token ids and targets (label ids, or scaled numbers) of every split; each text's row in the
    activation cache (train, val, test in turn)."""
    log.info("Tokenising %d texts ...", sum(len(getattr(splits, name)) for name in SPLITS))
    encoded = Encoded(ids={}, labels={}, rows={}, truncated={})
    first = 0
    for name in SPLITS:
        frame = getattr(splits, name)
        texts, pairs = inputs(frame)
        encoded.ids[name], encoded.truncated[name] = tokenize_texts(tokenizer, texts, max_length, pairs)
        encoded.labels[name] = task.targets(frame["label"].tolist())
        encoded.rows[name] = list(range(first, first + len(frame)))
        first += len(frame)
    if any(encoded.truncated.values()):
        log.info("note: texts truncated to %d tokens: %s", max_length, encoded.truncated)
    return encoded


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


def merge_for_inference(backend: Backend, quantized: bool) -> bool:
    """LoRA folded into the trained model's weights where the saved classifier will predict that way
    (`adapter.merged_at_inference`), so that what training scores from here on is what a reload computes.
    Returns whether it did, for run_info.json (`lora_merged`), which `Classifier.load` follows."""
    merged = merged_at_inference(quantized=quantized, sharded=backend.sharded)
    if merged:
        merge_in_place(backend.model)
    return merged


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
