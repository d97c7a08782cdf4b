"""Progress for long steps (a tqdm bar on a terminal, plain lines in a log, nothing when quiet), and the
Trainer's experiment-logging integrations (`--report-to`).

A bar redraws itself with carriage returns, which is right on a terminal and turns a log file (CI,
`nohup`, `tee`) into one unreadable line. When the progress stream is not a terminal we print whole
lines instead: at most one every `interval` seconds, plus one at the end, each saying how far, how fast
and how long is left. Progress goes to stderr, so stdout keeps only results.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from transformers import TrainerCallback

DEFAULT_INTERVAL = 10.0  # seconds between plain lines


def mode(progress: bool | None, stream: TextIO | None = None) -> str:
    """'bar', 'lines' or 'off'. progress None or True: a bar on a terminal, plain lines otherwise."""
    if progress is False:
        return "off"
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


def clock(seconds: float) -> str:
    """0:42 or 1:02:03."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Count work done; show it as a bar, as plain lines, or not at all (see `mode`)."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "text",
        *,
        progress: bool | None = None,
        stream: TextIO | None = None,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.stream = stream or sys.stderr
        self.mode = mode(progress, self.stream)
        self.done = 0
        self.started = self.last = time.monotonic()
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=self.stream)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "lines":
            now = time.monotonic()
            if self.done >= self.total or now - self.last >= self.interval:
                self.last = now
                self.stream.write(self.line(now) + "\n")
                self.stream.flush()

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.desc}: {self.done}/{self.total} {self.unit}s ({pct:.0f}%) | {rate:.1f} {self.unit}s/s | "
            f"{clock(elapsed)} elapsed, {clock(left)} left"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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


# ------------------------------------------------------------------------------------ experiment logging
TENSORBOARD_DIR = "tensorboard"  # inside the run folder: kept, unlike the deleted checkpoints folder
EXTRAS = {"tensorboard": "pip install 'llmclf[tensorboard]'"}


def report_to_list(value: str | list[str], *, require_installed: bool = False) -> list[str]:
    """`train.report_to` as the list of Trainer integrations it names, or an error naming the fix.

    Accepts `none`, `all`, one name or a comma-separated list of the names transformers knows. With
    `require_installed` (at training time, not when a saved config is read elsewhere) each named
    integration's package must be importable.
    """
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    from llmclf.errors import LlmclfError

    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return get_available_reporting_integrations() if require_installed else ["all"]
    known = sorted(INTEGRATION_TO_CALLBACK)
    unknown = [n for n in names if n not in INTEGRATION_TO_CALLBACK]
    if unknown:
        raise LlmclfError(
            f"Invalid config value train.report_to={value!r}: {unknown} not known to transformers. Allowed: "
            f"none, all, or a comma-separated list of {', '.join(known)}."
        )
    if require_installed:
        available = set(get_available_reporting_integrations())
        absent = [n for n in names if n not in available]
        if absent:
            how = "; ".join(EXTRAS.get(n, f"pip install {n}") for n in absent)
            raise LlmclfError(
                f"--report-to {','.join(absent)}: the package is not installed. Install it: {how}"
            )
    return names


def send_tensorboard_to(trainer: Any, folder: str) -> None:
    """TensorBoard events into `folder` (the run folder's tensorboard/), unless TENSORBOARD_LOGGING_DIR says
    otherwise; the Trainer's default is under output_dir, the checkpoints folder we delete."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = folder
