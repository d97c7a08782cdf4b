"""Training: a Trainer with class-weighted cross-entropy that stops on a non-finite loss."""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.trainer_utils import IntervalStrategy

from llmclf import distributed
from llmclf.batches import CPU_BATCH, GPU_BATCH_TOKENS, token_budget_batches
from llmclf.config import MULTI_LABEL, REGRESSION, SINGLE_LABEL, report_to_list
from llmclf.errors import LlmclfError
from llmclf.model.layer_cache import logits_from_states
from llmclf.training.callbacks import PlainProgressCallback, SaveEverySteps
from llmclf.training.checkpoints import AtomicCheckpoints


class NonFiniteLossError(LlmclfError):
    """Training produced NaN or inf; raised at once instead of being averaged away in the logs."""


BEST_METRIC = "balanced_accuracy"
"""The validation metric that chooses the best checkpoint and that early stopping watches."""
BEST_METRICS = {
    SINGLE_LABEL: (BEST_METRIC, True),
    MULTI_LABEL: ("micro_f1", True),
    REGRESSION: ("mse", False),
}
"""... per task, and whether higher is better."""


CPU_STEP_TOKENS = 1024
"""`auto` budget of padded tokens per forward/backward pass on CPU: a batch's saved activations grow
with its padded tokens, so a batch padded to one long outlier runs in parts; a typical batch of short
texts fits whole (docs/performance.md)."""


def resolve_step_tokens(step_tokens: int | str | None) -> int | None:
    """Padded-token budget of one pass: `auto` = CPU_STEP_TOKENS on CPU, GPU_BATCH_TOKENS on CUDA."""
    if step_tokens == "auto":
        return GPU_BATCH_TOKENS if torch.cuda.is_available() else CPU_STEP_TOKENS
    return step_tokens


def split_batch(inputs: dict[str, torch.Tensor], max_tokens: int) -> list[dict[str, torch.Tensor]] | None:
    """A batch whose padded tokens exceed `max_tokens`, cut into parts of rows of similar length, each
    padded only to its own longest; None when the batch fits. Only right-padded batches are trimmed
    (a left-padded row's positions would shift), so a left-padded batch is only cut by rows."""
    mask = inputs["attention_mask"]  # (batch, seq)
    rows, width = mask.shape
    if rows < 2 or rows * width <= max_tokens:
        return None
    lengths = mask.sum(dim=1)
    right_padded = bool(mask[:, 0].all())
    parts = []
    for index in token_budget_batches(lengths.numpy(force=True), max_tokens, rows):
        index = torch.as_tensor(index.copy(), device=mask.device)
        keep = int(lengths[index].max()) if right_padded else width
        part = {}
        for key, value in inputs.items():
            value = value[index]
            # (batch, seq, ...): ids, mask, states; not multi-label rows (batch, labels) of the same width
            if key != "labels" and value.dim() >= 2 and value.shape[1] == width:
                value = value[:, :keep]
            part[key] = value
        parts.append(part)
    return parts


class WeightedLossTrainer(AtomicCheckpoints, Trainer):
    """Trainer whose loss is cross-entropy with per-class weights (transformers has none built in);
    checkpoints are written atomically with a manifest (checkpoints.py)."""

    def __init__(
        self,
        *args: Any,
        class_weights: list[float] | None = None,
        cache_start: int | None = None,
        step_tokens: int | None = None,
        task: str = SINGLE_LABEL,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        # cross-entropy over classes; binary cross-entropy per label (class_weights: the positive weights,
        # multi-label); mean squared error on one output (regression)
        self.task = task
        self.class_weights = (
            None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        )
        # With an activation cache, batches carry the frozen layers' output instead of token ids.
        self.cache_start = cache_start
        # We compute the loss ourselves, so the Trainer must scale it for gradient accumulation itself.
        self.model_accepts_loss_kwargs = False
        # A batch with more padded tokens than this runs in parts whose gradients add up (split_batch).
        self.step_tokens = step_tokens
        self._loss_denominator: torch.Tensor | None = None  # set while a split batch runs

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        parts = None
        if self.step_tokens:  # None under a launcher (the backend decides), where each backward syncs
            parts = split_batch(inputs, self.step_tokens)
        if parts is None:
            return super().training_step(model, inputs, num_items_in_batch)
        # Each part's loss is its share of the whole batch's weighted mean: sum(w_y * loss) over the
        # part, divided by sum(w_y) over the batch. The parts' gradients then add up to the batch's.
        labels = inputs["labels"]
        if self.task == SINGLE_LABEL and self.class_weights is not None:
            self._loss_denominator = self.class_weights[labels.cpu()].sum()
        else:  # every element counts once: rows, or rows x labels for multi-label
            self._loss_denominator = torch.tensor(float(labels.numel()))
        try:
            total = torch.zeros(())
            for part in parts:
                total = total + super().training_step(model, part, num_items_in_batch).cpu()
            return total.to(self.args.device)
        finally:
            self._loss_denominator = None

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        labels = inputs.pop("labels")
        if "cached_states" in inputs:
            states = inputs["cached_states"]  # (batch, seq, hidden): input of layer cache_start
            # The Trainer's mixed precision wraps `model.forward`, which this path does not call: take
            # its autocast here too (fp32 states into a bf16/fp16 base would not run at all).
            with self.accelerator.autocast():
                logits = logits_from_states(model, states, inputs["attention_mask"], self.cache_start)
            outputs = SequenceClassifierOutput(logits=logits)
        else:
            outputs = model(**inputs)
        logits = outputs.logits.float()  # (batch, num_labels); fp32 loss even under bf16 compute
        loss = self._loss(logits, labels)
        if model.training and not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"Training loss became {loss.item()} at step {self.state.global_step + 1}. Lower the learning "
                "rate (--lr), check the data for broken rows, or use --quantize none."
            )
        return (loss, outputs) if return_outputs else loss

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss; in one part of a split batch (training_step), the part's sum over the
        whole batch's weight."""
        reduction = "mean" if self._loss_denominator is None else "sum"
        if self.task == REGRESSION:  # logits (batch, 1); labels: the scaled targets
            loss = F.mse_loss(logits[:, 0], labels.float(), reduction=reduction)
        elif self.task == MULTI_LABEL:  # logits, labels: (batch, labels), labels multi-hot
            weight = None if self.class_weights is None else self.class_weights.to(logits.device)
            loss = F.binary_cross_entropy_with_logits(
                logits, labels.float(), pos_weight=weight, reduction=reduction
            )
        else:
            weight = None if self.class_weights is None else self.class_weights.to(logits.device)
            loss = F.cross_entropy(logits, labels, weight=weight, reduction=reduction)
        return loss if self._loss_denominator is None else loss / self._loss_denominator

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "train_runtime" in logs:  # the Trainer's summary at the end of training: also say how it ended
            logs.update(self.training_outcome())
        super().log(logs, start_time)

    def training_outcome(self) -> dict[str, Any]:
        """How training ended: `stopped_early` (early stopping cut it short of --epochs) and, with a
        validation split, `best_step` and `best_metric` (the validation balanced accuracy of the step whose
        weights are kept)."""
        state = self.state
        stopper = next(
            (c for c in self.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)), None
        )
        triggered = stopper is not None and (
            stopper.early_stopping_patience_counter >= stopper.early_stopping_patience
        )
        outcome: dict[str, Any] = {"stopped_early": triggered and state.global_step < state.max_steps}
        if state.best_global_step:
            outcome.update(best_step=state.best_global_step, best_metric=state.best_metric)
        return outcome


def metrics_for_trainer(eval_pred: Any) -> dict[str, float]:
    """accuracy and balanced accuracy on the validation split, for choosing the best epoch."""
    from sklearn.metrics import balanced_accuracy_score

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    preds = np.asarray(logits).argmax(axis=-1)
    return {
        "accuracy": float((preds == labels).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(labels, preds)),
    }


class RegressionMetrics:
    """MSE (the best step's metric), MAE, Pearson and Spearman on the validation split, in the column's
    units: the outputs and targets the Trainer sees are scaled by 1 / `scale`."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, eval_pred: Any) -> dict[str, float]:
        from llmclf.inference.metrics import regression_metrics

        outputs, targets = eval_pred.predictions, eval_pred.label_ids
        outputs = outputs[0] if isinstance(outputs, tuple) else outputs
        scaled = (np.asarray(targets, dtype=np.float64), np.asarray(outputs, dtype=np.float64).reshape(-1))
        metrics = regression_metrics(*(values * self.scale for values in scaled))
        return {k: v for k, v in metrics.items() if k != "n" and v is not None}


def multilabel_metrics_for_trainer(eval_pred: Any) -> dict[str, float]:
    """Micro and macro F1 on the validation split, each label decided at probability 0.5 (logit 0)."""
    from sklearn.metrics import f1_score

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    predicted, truth = (np.asarray(logits) > 0).astype(int), np.asarray(labels).astype(int)
    return {
        "micro_f1": float(f1_score(truth, predicted, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
    }


def require_validation(has_val: bool, eval_steps: int | None, early_stopping_patience: int | None) -> None:
    """Validating every N steps and early stopping watch the validation split: refuse them without one."""
    flags = [
        flag
        for flag, value in (
            ("--eval-steps", eval_steps),
            ("--early-stopping-patience", early_stopping_patience),
        )
        if value is not None
    ]
    if flags and not has_val:
        named = " and ".join(flags)
        raise LlmclfError(
            f"{named} {'need' if len(flags) > 1 else 'needs'} a validation split, and this run has none "
            "(data.val_fraction is 0, data.train_per_class is given without data.val_per_class, or the "
            "classes are too small to spare a validation text). Give --val-fraction above 0 or "
            f"--val-per-class N, or drop {named}."
        )


def validation_schedule(
    has_val: bool,
    eval_steps: int | None,
    early_stopping_patience: int | None = None,
    task: str = SINGLE_LABEL,
) -> dict[str, Any]:
    """When to validate and save: each epoch; or every `eval_steps` optimizer steps, and at each epoch's
    end (ValidateAtEpochEnd). A checkpoint is saved at each validation, so that the best can be kept
    (load_best_model_at_end needs the save and evaluation schedules to match). Without a validation
    split checkpoints are still saved each epoch, so that a run can be resumed."""
    require_validation(has_val, eval_steps, early_stopping_patience)
    if not has_val:
        return {"eval_strategy": "no", "save_strategy": "epoch", "load_best_model_at_end": False}
    schedule: dict[str, Any] = {
        "load_best_model_at_end": True,
        "metric_for_best_model": BEST_METRICS[task][0],
        "greater_is_better": BEST_METRICS[task][1],
    }
    if eval_steps is None:
        return {**schedule, "eval_strategy": "epoch", "save_strategy": "epoch"}
    return {
        **schedule,
        "eval_strategy": "steps",
        "eval_steps": eval_steps,
        "save_strategy": "steps",
        "save_steps": eval_steps,
    }


def training_arguments(
    output_dir: str,
    *,
    epochs: float,
    lr: float,
    batch_size: int,
    eval_batch_size: int | str,
    weight_decay: float,
    seed: int,
    has_val: bool,
    n_train: int,
    report_to: str = "none",
    precision: str = "fp32",
    gradient_checkpointing: bool = False,
    quiet: bool = False,
    lr_scheduler: str = "linear",
    warmup_ratio: float = 0.0,
    group_by_length: bool = True,
    eval_steps: int | None = None,
    early_stopping_patience: int | None = None,
    task: str = SINGLE_LABEL,
) -> TrainingArguments:
    """The recipe's settings: evaluate and save each epoch (or every `eval_steps` steps as well), keep
    the best by validation balanced accuracy (validation_schedule).

    `group_by_length` batches texts of similar length together (shuffled in groups), so dynamic
    padding wastes little compute; `precision` bf16 or fp16 is mixed precision (autocast).
    `build_trainer(save_steps=N)` adds saves every N steps. `eval_steps` and `early_stopping_patience`
    need a validation split (require_validation); with the patience, a resumed run takes up the
    early-stopping count where its checkpoint left it (build_trainer adds the callback)."""
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
    return TrainingArguments(
        **validation_schedule(has_val, eval_steps, early_stopping_patience, task),
        restore_callback_states_from_checkpoint=early_stopping_patience is not None,
        lr_scheduler_type=lr_scheduler,
        warmup_steps=math.ceil(warmup_ratio * steps_per_epoch * epochs),
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        output_dir=output_dir,
        num_train_epochs=epochs,
        learning_rate=lr,
        per_device_train_batch_size=batch_size,
        # The Trainer's validation pass takes a fixed count: `auto` (a token budget for our own
        # length-sorted passes) is the CPU count there.
        per_device_eval_batch_size=CPU_BATCH if eval_batch_size == "auto" else eval_batch_size,
        weight_decay=weight_decay,
        seed=seed,
        data_seed=seed,
        save_total_limit=2,  # the newest (to resume) and the best (kept by rotation)
        save_only_model=False,
        logging_steps=max(1, min(50, steps_per_epoch // 5)),
        logging_nan_inf_filter=False,  # show NaN as NaN (the default averages it away)
        report_to=report_to_list(report_to, require_installed=True) or "none",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        # Every trainable parameter (LoRA, head) takes part in each step, so DDP need not search.
        ddp_find_unused_parameters=False,
        # Without CUDA, the Trainer must be told it runs on CPU for multi-process DDP over gloo, and to
        # accept bf16 (CPU autocast); otherwise it is left to pick the device (e.g. Apple MPS).
        use_cpu=distributed.cpu_processes() or (precision == "bf16" and not torch.cuda.is_available()),
        disable_tqdm=quiet,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
    )


def build_trainer(
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    val_dataset: Any | None,
    args: TrainingArguments,
    class_weights: list[float] | None,
    quiet: bool = False,
    cache: Any = None,
    save_steps: int | None = None,
    step_tokens: int | None = None,
    early_stopping_patience: int | None = None,
    task: str = SINGLE_LABEL,
    target_scale: float = 1.0,
) -> WeightedLossTrainer:
    """`cache`: an ActivationCache holding every row the datasets' `row` column points to;
    `step_tokens`: padded tokens one forward/backward pass may hold (None: batches stay whole);
    `save_steps`: also save every N steps (between validations, when `args` validate every N steps);
    `early_stopping_patience`: stop after this many validations in a row without a better balanced
    accuracy (the best checkpoint's weights are loaded at the end); `class_weights`: per class, or per
    label's positives (multi-label); `target_scale`: what a regression run's targets are divided by."""
    validate = {SINGLE_LABEL: metrics_for_trainer, MULTI_LABEL: multilabel_metrics_for_trainer}
    require_validation(val_dataset is not None, None, early_stopping_patience)
    collator = TokenCollator(tokenizer) if cache is None else CachedStatesCollator(cache)
    callbacks: list[TrainerCallback] = [SaveEverySteps(save_steps)] if save_steps else []
    if args.eval_strategy == IntervalStrategy.STEPS:
        callbacks.append(ValidateAtEpochEnd())
    if early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=early_stopping_patience))
    trainer = WeightedLossTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=val_dataset,
        processing_class=tokenizer,
        data_collator=collator,  # dynamic padding to each batch's longest
        compute_metrics=None
        if val_dataset is None
        else validate.get(task) or RegressionMetrics(target_scale),
        class_weights=class_weights,
        cache_start=None if cache is None else cache.start,
        step_tokens=step_tokens,
        task=task,
        callbacks=callbacks or None,
    )
    if quiet:
        trainer.remove_callback(PrinterCallback)  # it prints every log line when progress bars are off
    elif not sys.stderr.isatty():
        # tqdm redraws with carriage returns, unreadable in a log file: whole lines instead
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(PlainProgressCallback())
    return trainer


class ValidateAtEpochEnd(TrainerCallback):
    """With validation every N steps: also validate, and save, at each epoch's end unless that step just
    was (the Trainer's step schedule alone would skip it), so the epochs' weights stay candidates for the
    best, as without eval_steps, and a checkpoint ends each epoch."""

    def __init__(self) -> None:
        self.evaluated_at = -1
        self.saved_at = -1

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.evaluated_at = state.global_step

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.saved_at = state.global_step

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.evaluated_at != state.global_step:
            control.should_evaluate = True
        if self.saved_at != state.global_step:
            control.should_save = True
        return control


class TokenCollator:
    """Dynamic padding of token ids to each batch's longest; bookkeeping columns stay out of the model."""

    MODEL_KEYS = ("input_ids", "attention_mask", "labels")

    def __init__(self, tokenizer: Any) -> None:
        self.pad = DataCollatorWithPadding(tokenizer)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.pad([{k: f[k] for k in self.MODEL_KEYS if k in f} for f in features])


class CachedStatesCollator:
    """Batches of cached lower-layer states, right-padded to the batch's longest row."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        states, mask = self.cache.batch([f["row"] for f in features])
        labels = torch.tensor([f["labels"] for f in features])  # class ids (long), or targets (float)
        return {"cached_states": states, "attention_mask": mask, "labels": labels}
