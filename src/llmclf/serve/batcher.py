"""Dynamic batching and serving metrics for `llmclf serve` (the HTTP layer is in app.py).

Requests hand their texts to a `DynamicBatcher`; one worker thread takes up to `max_batch_size` rows from
all waiting requests and runs them together (one forward pass, or a few where lengths differ widely:
`padding_groups`). Before a pass it waits, at most `max_wait_s` from the oldest row's arrival or the last
pass's end (whichever is later), for the callers that the last pass answered to send again; a lone
caller never waits. Each request's future is resolved on its own event loop once all of its rows are
done, so the event loop never runs the model and every caller gets exactly its own rows back, in order.

A request larger than `max_batch_size` is split over several passes; rows of many small requests share
one. The number of rows waiting (not yet in a pass) is bounded by `max_queue`: beyond it `submit`
raises `QueueFull` at once, so an overloaded server answers quickly instead of piling work up.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmclf import runtime
from llmclf.batches import NEVER_SPLIT, padding_groups
from llmclf.config import REGRESSION
from llmclf.inference.lexical import lexical_inputs
from llmclf.inference.predict import predict_proba

logger = logging.getLogger("llmclf.serve")

# rows -> (probabilities (n, num_labels), truncated flags (n,)); runs on the worker thread only. A row is
# a text, or what the predictor's optional `encode(texts)` made of it (the server calls that first,
# in threads of its own).
Predictor = Callable[[list[Any]], tuple[np.ndarray, list[bool]]]
Input = str | tuple[str, str]
"""A text, or a (first, second) text pair for a classifier trained on pairs."""
ENCODE_THREADS = 2  # tokenising threads of the server; each holds one copy of the tokenizer


class QueueFull(Exception):
    """More rows are waiting than `max_queue` allows; the caller should retry later."""


class ShuttingDown(Exception):
    """The batcher is stopping and takes no new work."""


class PassFailed(RuntimeError):
    """The forward pass of a request's rows raised; the worker logged the traceback."""


class ServingMetrics:
    """Counters, batch sizes and recent request latencies; safe to update from any thread."""

    def __init__(self, window: int = 10_000) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests = 0
        self.ok = 0
        self.failed = 0
        self.rows = 0
        self.truncated_rows = 0
        self.rejected: collections.Counter[str] = collections.Counter()
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.merged_batches = 0  # passes that held rows of more than one request: proof of batching
        self.latencies_ms: collections.deque[float] = collections.deque(maxlen=window)

    def record_ok(self, rows: int, truncated: int, latency_s: float) -> None:
        with self._lock:
            self.requests += 1
            self.ok += 1
            self.rows += rows
            self.truncated_rows += truncated
            self.latencies_ms.append(latency_s * 1000.0)

    def record_rejected(self, reason: str) -> None:
        with self._lock:
            self.requests += 1
            self.rejected[reason] += 1

    def record_failed(self) -> None:
        with self._lock:
            self.requests += 1
            self.failed += 1

    def record_batch(self, size: int, requests: int) -> None:
        with self._lock:
            self.batch_sizes[size] += 1
            self.merged_batches += requests > 1

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready view: counts, batch-size histogram and mean, latency quantiles in ms."""
        with self._lock:
            latencies = np.asarray(self.latencies_ms, dtype=float)
            batches = sum(self.batch_sizes.values())
            batched_rows = sum(size * count for size, count in self.batch_sizes.items())
            quantiles = (
                {f"p{q}": round(float(np.percentile(latencies, q)), 2) for q in (50, 90, 99)}
                if latencies.size
                else {"p50": None, "p90": None, "p99": None}
            )
            return {
                "uptime_s": round(time.time() - self.started, 1),
                "requests": {
                    "total": self.requests,
                    "ok": self.ok,
                    "failed": self.failed,
                    "rejected": dict(self.rejected),
                },
                "rows": self.rows,
                "truncated_rows": self.truncated_rows,
                "batches": {
                    "count": batches,
                    "mean_size": round(batched_rows / batches, 3) if batches else None,
                    "max_size": max(self.batch_sizes) if batches else None,
                    "merged": self.merged_batches,
                    "histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                },
                "latency_ms": {**quantiles, "window": int(latencies.size)},
            }


class _Job:
    """One request's rows: filled in by the worker thread, handed to the future when complete."""

    __slots__ = ("texts", "loop", "future", "probs", "truncated", "remaining", "enqueued", "failed")

    def __init__(self, texts: list[str], loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
        self.texts = texts
        self.loop = loop
        self.future = future
        self.probs: np.ndarray | None = None
        self.truncated = [False] * len(texts)
        self.remaining = len(texts)
        self.enqueued = time.monotonic()
        self.failed = False


def _settle(future: asyncio.Future, value: Any = None, error: BaseException | None = None) -> None:
    # Runs on the job's event loop; the caller may have gone away (cancelled) meanwhile.
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class DynamicBatcher:
    """Gathers rows from concurrent requests into forward passes on one worker thread."""

    def __init__(
        self,
        predictor: Predictor,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.predictor = predictor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.metrics = metrics or ServingMetrics()
        self._pending: collections.deque[tuple[_Job, int]] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._free_since = 0.0  # monotonic time the last forward pass ended
        self._queued_jobs = 0  # requests with rows in _pending
        # Requests worth waiting for after a pass: those queued then, plus those it answered, whose
        # callers may send again at once. 0 at start: a first request does not wait for company.
        self._expected_jobs = 0

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a forward pass (not counting the pass now running)."""
        return len(self._pending)

    def start(self) -> None:
        """Start the worker thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llmclf-batcher", daemon=True)
            self._thread.start()

    async def submit(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """Probabilities and truncation flags for `texts`, in order; raises QueueFull or ShuttingDown."""
        if not texts:  # no row would ever resolve the future
            return np.zeros((0, 0)), []
        loop = asyncio.get_running_loop()
        job = _Job(list(texts), loop, loop.create_future())
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) + len(job.texts) > self.max_queue:
                raise QueueFull(f"{len(self._pending)} rows are waiting (limit {self.max_queue})")
            self._pending.extend((job, i) for i in range(len(job.texts)))
            self._queued_jobs += 1
            self._cond.notify()
        return await job.future

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new work, finish every row already queued (without waiting for more), end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _next_batch(self) -> list[tuple[_Job, int]] | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if not self._pending:
                return None  # stopping, and everything queued is done
            # Wait for more rows, at most until max_wait_s after the oldest row arrived or after the last
            # pass ended, whichever is later, and only while fewer requests are queued than the last
            # pass left waiting plus the callers it answered (who may send again at once).
            # - From the pass's end, not only from arrival: rows queued during a pass are already "old"
            #   when it ends, so the next pass would start before the answered callers can send again,
            #   and 16 closed-loop clients settle into two alternating passes of 8.
            # - Only for expected callers: a lone client is never held back waiting for company (its
            #   request runs at once), and a full set of returning callers starts the pass at once.
            # A row therefore waits at most the pass in progress plus max_wait_s.
            oldest = self._pending[0][0].enqueued
            if oldest > self._free_since + self.max_wait_s:
                # Nothing came within max_wait_s of the last pass: its callers are not coming back
                # together, so a request after a quiet spell runs at once.
                self._expected_jobs = 0
            deadline = max(oldest, self._free_since) + self.max_wait_s
            while (
                len(self._pending) < self.max_batch_size
                and self._queued_jobs < self._expected_jobs
                and not self._stopping
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = [self._pending.popleft() for _ in range(min(len(self._pending), self.max_batch_size))]
            # A request leaves the queue with its last row (its rows are queued together, in order).
            self._queued_jobs -= sum(i == len(job.texts) - 1 for job, i in batch)
            return batch

    def _run(self) -> None:
        while (rows := self._next_batch()) is not None:
            rows = [(job, i) for job, i in rows if not job.failed]
            answers = self._process(rows) if rows else []
            with self._cond:
                # Counted before the answers go out: a caller that sends again at once must not be
                # counted twice (as queued and as answered).
                self._free_since = time.monotonic()
                self._expected_jobs = self._queued_jobs + len(answers)
            for job, value, error in answers:
                self._call(job, value, error)

    def _process(self, rows: list[tuple[_Job, int]]) -> list[tuple[_Job, Any, BaseException | None]]:
        """Run one gathered batch; returns the requests it finished, each with its result or error. A
        failed pass of several requests is run again one request at a time, so that a row that breaks
        the pass fails only its own request."""
        jobs = list({id(job): job for job, _ in rows}.values())
        try:
            probs, truncated = self.predictor([job.texts[i] for job, i in rows])
        except Exception as exc:  # a failed pass fails its requests, never the worker
            logger.exception("forward pass of %d rows from %d request(s) failed", len(rows), len(jobs))
            if len(jobs) > 1:
                return [answer for job in jobs for answer in self._process([r for r in rows if r[0] is job])]
            jobs[0].failed = True
            return [(jobs[0], None, PassFailed(f"the forward pass failed: {type(exc).__name__}: {exc}"))]
        self.metrics.record_batch(len(rows), len(jobs))
        finished = []
        for (job, i), row, cut in zip(rows, probs, truncated):
            if job.probs is None:
                job.probs = np.zeros((len(job.texts), len(row)), dtype=np.float64)
            job.probs[i] = row
            job.truncated[i] = bool(cut)
            job.remaining -= 1
            if job.remaining == 0:
                finished.append((job, (job.probs, job.truncated), None))
        return finished

    @staticmethod
    def _call(job: _Job, value: Any = None, error: BaseException | None = None) -> None:
        try:
            job.loop.call_soon_threadsafe(_settle, job.future, value, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def measure_pass_overhead(classifier: Any, repeats: int = 3) -> float:
    """`pass_overhead_tokens` for `padding_groups`, timed on this machine with this model: the best of
    `repeats` passes of 1 row x 16 tokens and of 8 rows x 64 tokens fit cost = a + b x tokens; returns
    a / b, or NEVER_SPLIT where the 512-token pass costs no more than the 16-token one (a GPU)."""
    tokenizer = classifier.tokenizer
    # A plain word's id, repeated: not the pad token, which the classifier's pooling would skip.
    token = tokenizer("the", add_special_tokens=False)["input_ids"][-1]
    timings = {}
    with runtime.autocast(classifier.precision):
        for rows, width in ((1, 16), (8, 64), (1, 16), (8, 64)):  # the first round warms up
            ids = [[token] * width for _ in range(rows)]
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                predict_proba(classifier.model, tokenizer, input_ids=ids, batch_size=rows, progress=False)
                best = min(best, time.perf_counter() - started)
            timings[rows * width] = best
    per_token = (timings[512] - timings[16]) / (512 - 16)
    overhead = timings[16] - 16 * per_token
    if per_token <= 0 or overhead >= NEVER_SPLIT * per_token:
        return NEVER_SPLIT
    return max(0.0, overhead / per_token)


@dataclass(frozen=True)
class Encoded:
    """One text as the model sees it: its token ids, cut to max_length, and whether it was cut; with the
    classifier's lexical part, that part's log-probabilities (labels,), computed in the encoding thread."""

    ids: list[int]
    truncated: bool
    lexical: np.ndarray | None = None


CHARS_PER_TOKEN_BOUND = 64
"""A text over max_length x this many characters is cut to that many before tokenising: English runs
about 4 characters a token, so the first max_length tokens and the truncated flag are those of the whole
text, while a 1 MB text costs no more than a long one. Where the cut text has max_length tokens or
fewer (tokens of over 64 characters on average), the whole text is tokenised instead."""


class ClassifierPredictor:
    """The server's `Predictor` for a `Classifier`: same tokenisation and forward pass as
    `Classifier.predict_proba`, and flags the texts longer than `max_length` tokens (which are cut).
    Rows of very different lengths go to separate passes (`padding_groups`).

    The server tokenises with `encode` in threads of its own and hands the batcher `Encoded` rows, so
    the model's worker thread only runs the model; called with texts, it tokenises them itself.

    With `pass_overhead_tokens="auto"` the first call times the passes (`measure_pass_overhead`) before
    it runs: in the batcher's worker thread, where every later pass runs too (timed from another
    thread, the worker's passes ran slower afterwards; docs/serving.md)."""

    def __init__(
        self,
        classifier: Any,
        max_length: int,
        pass_overhead_tokens: float | str = "auto",
        encode_threads: int = ENCODE_THREADS,
    ) -> None:
        self.classifier = classifier
        self.max_length = max_length
        self.pass_overhead_tokens = None if pass_overhead_tokens == "auto" else float(pass_overhead_tokens)
        # A fast tokenizer used by two threads at once fails ("Already borrowed") when one changes its
        # truncation while the other encodes: each encoding thread takes a copy of its own, made here,
        # before any thread runs; the worker keeps the original (measure_pass_overhead, padding).
        self._tokenizers: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(max(1, encode_threads)):
            self._tokenizers.put(copy.deepcopy(classifier.tokenizer))

    @property
    def pairs(self) -> bool:
        """Whether the classifier takes text pairs (trained with data.text_pair_column)."""
        return bool(getattr(self.classifier, "pair_column", None))

    @property
    def thresholds(self) -> dict[str, float] | None:
        """A multi-label classifier's decision threshold per label (None for other tasks)."""
        return getattr(self.classifier, "thresholds", None)

    @property
    def regression(self) -> bool:
        """Whether the classifier outputs one number per text (task regression) instead of probabilities."""
        return getattr(self.classifier, "task", None) == REGRESSION

    def encode(self, texts: list[Input]) -> list[Encoded]:
        """Token ids exactly as `Classifier.predict_proba` makes them (special tokens kept where the
        tokenizer keeps them), and which texts were cut; any thread may call it."""
        tokenizer = self._tokenizers.get()
        try:
            return self._encode(tokenizer, texts)
        finally:
            self._tokenizers.put(tokenizer)

    def _encode(self, tokenizer: Any, texts: list[Input]) -> list[Encoded]:
        max_length = self.max_length
        limit = max_length * CHARS_PER_TOKEN_BOUND
        # (first texts, second texts or None): a pair's parts are cut and tokenised together
        parts = [list(p) for p in zip(*texts, strict=True)] if isinstance(texts[0], tuple) else [texts]
        heads = [[text[:limit] for text in part] for part in parts]

        def tokenise(rows: list[int], source: list[list[str]], **cut: Any) -> list[list[int]]:
            return tokenizer(*([part[i] for i in rows] for part in source), **cut)["input_ids"]

        # Full-length ids tell which texts are cut; only those are tokenised again with truncation.
        ids = tokenise(list(range(len(texts))), heads, truncation=False)
        shortened = [any(len(part[i]) > limit for part in parts) for i in range(len(texts))]
        whole = [i for i, row in enumerate(ids) if len(row) <= max_length and shortened[i]]
        if whole:
            for i, row in zip(whole, tokenise(whole, parts, truncation=False)):
                ids[i] = row
                for head, part in zip(heads, parts):
                    head[i] = part[i]
        truncated = [len(row) > max_length for row in ids]
        long = [i for i, cut in enumerate(truncated) if cut]
        if long:
            for i, row in zip(long, tokenise(long, heads, truncation="longest_first", max_length=max_length)):
                ids[i] = row
        lexical = getattr(self.classifier, "lexical", None)
        lex = (
            lexical.log_proba(lexical_inputs(*parts)) if lexical is not None else [None] * len(texts)
        )  # (n, labels)
        return [Encoded(list(row), cut, lx) for row, cut, lx in zip(ids, truncated, lex)]

    def __call__(self, rows: Sequence[Encoded | str]) -> tuple[np.ndarray, list[bool]]:
        clf, max_length = self.classifier, self.max_length
        if self.pass_overhead_tokens is None:
            self.pass_overhead_tokens = round(measure_pass_overhead(clf), 1)
        texts = [i for i, row in enumerate(rows) if isinstance(row, str | tuple)]
        encoded = dict(zip(texts, self.encode([rows[i] for i in texts]))) if texts else {}
        rows = [encoded.get(i, row) for i, row in enumerate(rows)]
        ids = [row.ids for row in rows]
        probs = np.zeros((len(ids), len(clf.labels)), dtype=np.float64)
        # Autocast is per thread: entered here, in the batcher's worker, as Classifier.predict_proba does.
        with runtime.autocast(clf.precision):
            for group in padding_groups([len(row) for row in ids], self.pass_overhead_tokens):
                probs[group] = predict_proba(
                    clf.model,
                    clf.tokenizer,
                    input_ids=[ids[i] for i in group],
                    batch_size=len(group),
                    max_length=max_length,
                    progress=False,
                )
        if getattr(clf, "lexical", None) is not None:
            probs = clf.lexical.combine(probs, np.stack([row.lexical for row in rows]))
        return probs, [row.truncated for row in rows]
