"""Training: a Trainer with class-weighted cross-entropy that stops on a non-finite loss."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DataCollatorWithPadding, PrinterCallback, Trainer, TrainingArguments

from llmclf.checkpoints import AtomicCheckpoints, SaveEverySteps
from llmclf.errors import LlmclfError


class NonFiniteLossError(LlmclfError):
    """Training produced NaN or inf; raised at once instead of being averaged away in the logs."""


class WeightedLossTrainer(AtomicCheckpoints, Trainer):
    """Trainer whose loss is cross-entropy with per-class weights (transformers has none built in);
    checkpoints are written atomically with a manifest (checkpoints.py)."""

    def __init__(self, *args: Any, class_weights: list[float] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.class_weights = (
            None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        )
        # We compute the loss ourselves, so the Trainer must scale it for gradient accumulation itself.
        self.model_accepts_loss_kwargs = False

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits.float()  # (batch, num_labels); fp32 loss even under bf16 compute
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        loss = F.cross_entropy(logits, labels, weight=weight)
        if model.training and not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"Training loss became {loss.item()} at step {self.state.global_step + 1}. Lower the learning "
                "rate (--lr), check the data for broken rows, or use --quantize none."
            )
        return (loss, outputs) if return_outputs else loss


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


def training_arguments(
    output_dir: str,
    *,
    epochs: float,
    lr: float,
    batch_size: int,
    eval_batch_size: int,
    weight_decay: float,
    seed: int,
    has_val: bool,
    n_train: int,
    report_to: str = "none",
    bf16: bool = False,
    quiet: bool = False,
) -> TrainingArguments:
    """The recipe's settings: evaluate and save each epoch, keep the best by validation accuracy.

    Checkpoints are saved each epoch even without a validation split, so that a run can be resumed;
    `build_trainer(save_steps=N)` adds saves every N steps."""
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
    return TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=epochs,
        learning_rate=lr,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=eval_batch_size,
        weight_decay=weight_decay,
        seed=seed,
        data_seed=seed,
        eval_strategy="epoch" if has_val else "no",
        save_strategy="epoch",
        load_best_model_at_end=has_val,
        metric_for_best_model="balanced_accuracy" if has_val else None,
        greater_is_better=True,
        save_total_limit=2,  # the newest (to resume) and the best (kept by rotation)
        save_only_model=False,
        logging_steps=max(1, min(50, steps_per_epoch // 5)),
        logging_nan_inf_filter=False,  # show NaN as NaN (the default averages it away)
        report_to=report_to,
        bf16=bf16,
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
    save_steps: int | None = None,
) -> WeightedLossTrainer:
    trainer = WeightedLossTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=val_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),  # dynamic padding to each batch's longest
        compute_metrics=metrics_for_trainer if val_dataset is not None else None,
        class_weights=class_weights,
        callbacks=[SaveEverySteps(save_steps)] if save_steps else None,
    )
    if quiet:
        trainer.remove_callback(PrinterCallback)  # it prints every log line when progress bars are off
    return trainer
