"""Progress for long steps: a tqdm bar on a terminal, plain lines in a log, nothing when quiet.

A bar redraws itself with carriage returns, which is right on a terminal and turns a log file (CI,
`nohup`, `tee`) into one unreadable line. When the progress stream is not a terminal we print whole
lines instead: at most one every `interval` seconds, plus one at the end, each saying how far, how fast
and how long is left. Progress goes to stderr, so stdout keeps only results.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import TextIO

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


class Timings:
    """Seconds spent in each named step of a run: `with timings("train"): ...`; `timings.seconds` holds them."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = time.perf_counter() - started


class MainProcessOnly(logging.Filter):
    """Passes records of the main process only (global rank 0 under torchrun / accelerate launch)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return os.environ.get("RANK", "0") == "0"


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record (a redirection or a test may swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def log_to_stderr(quiet: bool) -> None:
    """What the command line shows of llmclf's log: notes and progress as plain lines on stderr (the
    main process only), nothing but warnings with --quiet. Library callers see only warnings."""
    logger = logging.getLogger("llmclf")
    for handler in [h for h in logger.handlers if getattr(h, "llmclf_cli", False)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.llmclf_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(MainProcessOnly())
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
