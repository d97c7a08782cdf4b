"""Trainer callbacks: progress as plain lines, saves every N steps, reseeding under FSDP, TensorBoard's folder."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from transformers import TrainerCallback, set_seed

from llmclf.progress import clock

TENSORBOARD_DIR = "tensorboard"  # inside the run folder: kept, unlike the deleted checkpoints folder


class PlainProgressCallback(TrainerCallback):
    """Trainer progress as whole lines (no carriage returns): step, epoch, loss, rows/s, time left.

    Prints at each Trainer log event (every `logging_steps`) and after each evaluation, so a log file
    shows the run's course line by line; used instead of the tqdm bar when stderr is not a terminal.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.started = time.monotonic()

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(text + "\n")
        stream.flush()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.monotonic()
        if state.is_world_process_zero:
            self._write(f"training: {state.max_steps} steps, {args.num_train_epochs:g} epoch(s)")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        step, total = state.global_step, max(state.max_steps, 1)
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rows = step * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        left = (total - step) * elapsed / step if step else 0.0
        self._write(
            f"training: step {step}/{total} ({100 * step / total:.0f}%) | epoch {state.epoch or 0:.2f} | "
            f"loss {float(logs['loss']):.4f} | {rows / elapsed:.1f} rows/s | "
            f"{clock(elapsed)} elapsed, {clock(left)} left"
        )

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not metrics:
            return
        shown = [
            f"{k.removeprefix('eval_')} {float(v):.4f}"
            for k, v in metrics.items()
            if k in ("eval_loss", "eval_accuracy", "eval_balanced_accuracy")
        ]
        self._write(
            f"validation at step {state.global_step} (epoch {state.epoch or 0:.2f}): " + ", ".join(shown)
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._write(
                f"training done: {state.global_step} steps in {clock(time.monotonic() - self.started)}"
            )


class SaveEverySteps(TrainerCallback):
    """Also save every `n` optimizer steps, on top of the epoch saves (so a run can resume mid-epoch)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step % self.n == 0:
            control.should_save = True
        return control


class ReseedAtTrainBegin(TrainerCallback):
    """Seed again when training starts, as the Trainer did when built: under FSDP it is built before the
    evaluation and the probe, whose data loaders draw from the global RNG, and the dropout masks would
    differ from those of a DDP or single-process run with the same seed."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        set_seed(args.seed)


def send_tensorboard_to(trainer: Any, folder: str) -> None:
    """TensorBoard events into `folder` (the run folder's tensorboard/), unless TENSORBOARD_LOGGING_DIR says
    otherwise; the Trainer's default is under output_dir, the checkpoints folder we delete."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = folder
