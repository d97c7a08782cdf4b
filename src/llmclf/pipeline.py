"""The whole recipe as one flow: load data → load model → evaluate → train → evaluate → save.

Each step calls a builder with plain arguments taken from the config, so the config object stops here.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from llmclf import __version__, artifacts, checkpoints, distributed, fsdp, hardware, progress, reporting
from llmclf.config import RunConfig
from llmclf.data import Splits, class_weights, load_splits, to_dataset, tokenize_texts
from llmclf.errors import LlmclfError
from llmclf.evaluation import compute_metrics, head_inputs
from llmclf.layer_cache import (
    cached_or_built,
    check_layers,
    pooled_features,
    predict_proba_cached,
    resolve_top_layers,
)
from llmclf.modeling import add_lora, cache_dir, load_classifier, resolve_model_source, resolve_quantize
from llmclf.report import build_report
from llmclf.training import (
    WeightedLossTrainer,
    build_trainer,
    init_head_from_probe,
    resolve_step_tokens,
    training_arguments,
)

SPLITS = ("train", "val", "test")
CACHE_DTYPE = torch.bfloat16
"""Cached activations are stored in bf16: half the memory of fp32, and plenty for frozen features."""


@dataclass
class RunResult:
    output: Path
    metrics: dict
    seconds: float


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
    if path.exists() and any(path.iterdir()) and not overwrite:  # every process stops alike
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


def write_predictions(path: Path, splits: Splits, probs: np.ndarray) -> None:
    test = splits.test
    frame = pd.DataFrame(
        {
            "text": test["text"].tolist(),
            "label": test["label"].tolist(),
            "predicted": [splits.labels[i] for i in probs.argmax(axis=1)],
        }
    )
    for i, label in enumerate(splits.labels):
        frame[f"prob_{label}"] = probs[:, i]
    frame.to_csv(path, index=False, float_format="%.9g")


def run_training(
    config: RunConfig, *, overwrite: bool = False, quiet: bool = False, resume: str | None = None
) -> RunResult:
    """Train, evaluate before and after, and write the run folder. Returns the metrics.

    `resume`: `last` or a checkpoint folder, to continue an interrupted run in `config.output`.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    distributed.setup()  # under torchrun / accelerate launch: join the process group
    main = distributed.is_main()  # only the main process prints and writes
    quiet = quiet or not main
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    dc, mc, lc, tc = config.data, config.model, config.lora, config.train
    out = prepare_output(config.output, overwrite, resume)
    seed_everything(tc.seed)

    # 1. Data: read, validate, split per class, weigh classes.
    splits = load_splits(
        dc.path,
        dc.text_column,
        dc.label_column,
        eval_data=dc.eval_data,
        train_per_class=dc.train_per_class,
        val_per_class=dc.val_per_class,
        test_per_class=dc.test_per_class,
        val_fraction=dc.val_fraction,
        test_fraction=dc.test_fraction,
        drop_invalid=dc.drop_invalid,
        seed=tc.seed,
    )
    labels = splits.labels
    weights = class_weights(splits.train["label"], labels) if tc.class_weights == "auto" else None
    distributed.check_identical((splits.counts(), weights), "data splits or class weights")
    for note in splits.notes:
        say(f"note: {note}")
    say(reporting.class_balance(splits.counts(), labels, weights), "\n")

    # 2. Model: base + classification head (4-bit where asked or on a GPU), then LoRA.
    tick = time.perf_counter()
    with distributed.main_process_first():  # download / GGUF conversion once, the others reuse it
        source = resolve_model_source(mc.name, quiet=quiet)
    quantized = resolve_quantize(mc.quantize)
    quantized = fsdp.check_supported(mc.quantize, quantized, say)
    precision = hardware.resolve_precision(mc.precision)
    attn = hardware.resolve_attn_implementation(mc.attn_implementation, precision)
    fingerprint = checkpoints.run_fingerprint(config, splits, source, quantized)
    start = checkpoints.begin_run(out, fingerprint, resume, say)
    say(f"Loading {mc.name} ({'4-bit NF4' if quantized else 'full precision'}, {precision}, {attn}) ...")
    loaded = load_classifier(
        source,
        labels,
        quantize=quantized,
        trust_remote_code=mc.trust_remote_code,
        precision=precision,
        attn_implementation=attn,
        gradient_checkpointing=tc.gradient_checkpointing,
        allow_pickle=mc.allow_pickle,
    )
    tokenizer = loaded.tokenizer
    top_layers = resolve_top_layers(loaded.model, lc.layers)
    model = add_lora(
        loaded.model,
        r=lc.r,
        alpha=lc.alpha,
        dropout=lc.dropout,
        targets=lc.targets,
        seed=tc.seed,
        top_layers=top_layers,
    )
    timings["load_model"] = time.perf_counter() - tick
    hardware.release_memory()  # the loading's transient copies

    tick = time.perf_counter()
    label_index = {label: i for i, label in enumerate(labels)}
    say(f"Tokenising {sum(len(getattr(splits, n)) for n in ('train', 'val', 'test'))} texts ...")
    encoded: dict[str, tuple[list[list[int]], list[int]]] = {}
    truncated: dict[str, int] = {}
    for name in SPLITS:
        frame = getattr(splits, name)
        ids, truncated[name] = tokenize_texts(tokenizer, frame["text"].tolist(), dc.max_length)
        encoded[name] = (ids, [label_index[label] for label in frame["label"]])
    if any(truncated.values()):
        say(f"note: texts truncated to {dc.max_length} tokens: {truncated}")
    timings["tokenise"] = time.perf_counter() - tick

    # 2b. With LoRA on the top layers only, the layers below are frozen: run them once per text.
    cache = None
    rows: dict[str, list[int]] = {}
    first = 0
    for name in SPLITS:
        rows[name] = list(range(first, first + len(encoded[name][0])))
        first += len(rows[name])
    use_cache = top_layers is not None and tc.activation_cache != "off"
    # A cached forward would bypass DDP's gradient sync, and FSDP's gathering of the sharded weights.
    if use_cache and (distributed.world_size() > 1 or fsdp.requested()):
        say("note: the activation cache runs in one process; under a launcher every step runs the model")
        use_cache = False
    if use_cache:
        tick = time.perf_counter()
        first_layer = check_layers(model, top_layers)
        with hardware.autocast(precision):
            cache, reused = cached_or_built(
                model,
                [ids for name in SPLITS for ids in encoded[name][0]],
                first_layer,
                pad_id=tokenizer.pad_token_id,
                batch_size=tc.eval_batch_size,
                dtype=CACHE_DTYPE,
                precision=precision,
                disk_dir=cache_dir() / "activations" if tc.activation_cache == "disk" else None,
                model_source=source,
                quantized=quantized,
            )
        timings["cache"] = time.perf_counter() - tick
        hardware.release_memory()
        say(
            f"Frozen layers 0-{first_layer - 1} {'read from the disk cache' if reused else 'run once'} for "
            f"{len(cache)} texts ({cache.nbytes / 2**20:.0f} MiB, {timings['cache']:.0f} s)"
        )

    def make_trainer() -> WeightedLossTrainer:
        train_ds = to_dataset(*encoded["train"], rows=rows["train"])
        val_ds = to_dataset(*encoded["val"], rows=rows["val"]) if encoded["val"][0] else None
        args = training_arguments(
            str(out / artifacts.CHECKPOINTS),
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
        )
        trainer = build_trainer(
            model,
            tokenizer,
            train_ds,
            val_ds,
            args,
            weights,
            quiet=quiet,
            cache=cache,
            save_steps=tc.save_steps,
            step_tokens=resolve_step_tokens(tc.step_tokens),
        )
        progress.send_tensorboard_to(trainer, str(out / progress.TENSORBOARD_DIR))
        trainer.fingerprint_sha = checkpoints.fingerprint_sha(fingerprint)
        fsdp.adopt(trainer)  # under FSDP: the Trainer shards the model (also on CPU processes)
        return trainer

    # Under FSDP the Trainer holds the sharded model: every forward pass below goes through it.
    trainer = make_trainer() if fsdp.requested() else None

    def test_eval(desc: str, cached: bool) -> tuple[dict, np.ndarray]:
        ids, y = encoded["test"]
        with hardware.autocast(precision):
            if cached and cache is not None:
                probs = predict_proba_cached(model, cache, rows["test"], batch_size=tc.eval_batch_size)
                return compute_metrics(y, probs.argmax(axis=1), labels), probs
            if fsdp.requested():  # through trainer.predict on the sharded model, every test row once
                return fsdp.evaluate(trainer, ids, y, labels)
            # Sharded across processes when launched; every test row is scored exactly once.
            return distributed.evaluate(
                model,
                tokenizer,
                ids,
                y,
                labels,
                batch_size=tc.eval_batch_size,
                desc=desc,
                progress=False if quiet else None,
            )

    # 3. Evaluate before training: the head is random, so this is the chance-level baseline.
    tick = time.perf_counter()
    if start.before is None:
        before, _ = test_eval("evaluating before training", cached=True)
        if main:
            checkpoints.save_before(out, before)
    else:
        before = start.before  # saved by the interrupted run: the same model and test split
        say("Reusing the metrics before training saved by the interrupted run.")
    timings["eval_before"] = time.perf_counter() - tick
    say(reporting.compare(None, before, title="Test metrics before training"), "\n")

    # 3b. Start the head from a linear probe on the frozen features instead of from random weights.
    probe = None
    if tc.head_init == "probe":
        tick = time.perf_counter()
        train_ids, train_y = encoded["train"]
        with hardware.autocast(precision):
            if cache is not None:
                features = pooled_features(model, cache, rows["train"], batch_size=tc.eval_batch_size)
            elif fsdp.requested():
                features = fsdp.head_inputs(trainer, train_ids)
            else:
                features = head_inputs(model, tokenizer, train_ids, batch_size=tc.eval_batch_size)
        probe = {"train_accuracy": init_head_from_probe(model, features, train_y, weights, tc.seed)}
        if cache is not None:  # nearly free: the probe's test accuracy, to show what LoRA adds on top
            with hardware.autocast(precision):
                probs = predict_proba_cached(model, cache, rows["test"], batch_size=tc.eval_batch_size)
            probe["test_accuracy"] = float((probs.argmax(axis=1) == np.asarray(encoded["test"][1])).mean())
        timings["probe"] = time.perf_counter() - tick
        hardware.release_memory()  # the features and scikit-learn's copies of them
        say(f"Head initialised from a linear probe: {probe}")

    # 4. Train.
    tick = time.perf_counter()
    if trainer is None:
        trainer = make_trainer()
    if start.checkpoint:
        say(f"Resuming from {start.checkpoint}")
    train_output = trainer.train(resume_from_checkpoint=start.checkpoint)
    model = trainer.model  # the best epoch's weights when there is a validation split
    timings["train"] = time.perf_counter() - tick
    hardware.release_memory()  # the activations of the longest batches

    # 5. Evaluate after training, on the same test split.
    tick = time.perf_counter()
    # The whole model, as `Classifier` runs it: the reported metrics are those of the saved classifier.
    after, probs = test_eval("evaluating after training", cached=False)
    timings["eval_after"] = time.perf_counter() - tick
    # FSDP: the trained weights are shards; gather them in full (collective, so every process calls it).
    state = fsdp.trainable_state_dict(model) if fsdp.requested() else None
    if not main:  # the main process writes the run folder; the others wait for it in shutdown()
        return RunResult(out, {"before": before, "after": after}, time.perf_counter() - started)

    # 6. Save everything needed to reuse the classifier.
    model.save_pretrained(str(out / artifacts.ADAPTER), state_dict=state)  # adapter + head, safetensors
    tokenizer.save_pretrained(str(out / artifacts.TOKENIZER))
    config.save(out / artifacts.CONFIG)
    artifacts.write_json(out / artifacts.LABELS, labels)
    artifacts.write_json(
        out / artifacts.RUN_INFO,
        {
            "base_model": mc.name,
            "resolved_source": source,
            "quantized": quantized,
            "precision": precision,
            "attn_implementation": attn,
            "world_size": distributed.world_size(),
            "fsdp": fsdp.requested(),
            "llmclf_version": __version__,
            "torch_version": torch.__version__,
            "train_runtime_s": train_output.metrics.get("train_runtime"),
            "train_loss": train_output.metrics.get("train_loss"),
            "log_history": trainer.state.log_history,
            "activation_cache": None
            if cache is None
            else {"start_layer": cache.start, "mib": cache.nbytes / 2**20},
            "probe": probe,
            "timings_s": timings,
        },
    )
    artifacts.write_json(
        out / artifacts.DATA_SUMMARY,
        {
            "source": dc.path,
            "counts": splits.counts(),
            "class_weights": dict(zip(labels, weights)) if weights else None,
            "truncated": truncated,
            "max_length": dc.max_length,
            "notes": splits.notes,
        },
    )
    artifacts.write_json(out / artifacts.METRICS, {"before": before, "after": after})
    write_predictions(out / artifacts.PREDICTIONS, splits, probs)
    checkpoints.finish(out, keep_last=tc.keep_checkpoint)  # the best adapter is saved above
    report = build_report(out)  # report.md, report.html and the PNGs, from the files above

    seconds = time.perf_counter() - started
    timings["total"] = seconds
    artifacts.write_json(
        out / artifacts.RUN_INFO, {**artifacts.read_json(out / artifacts.RUN_INFO), "timings_s": timings}
    )
    trainer = model = loaded = cache = None  # drop the references the run folder no longer needs
    hardware.release_memory()  # a caller going on (e.g. to Classifier.load) starts from here
    print(reporting.full_report(before, after), flush=True)  # the result: printed even with --quiet
    print(f"\nRun folder: {out}  ({seconds:.0f} s)", flush=True)
    say(f"Report: {report}")
    return RunResult(out, {"before": before, "after": after}, seconds)


def set_threads() -> None:
    """Use every core present (torch defaults to the physical count, which may be fewer)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(n)
