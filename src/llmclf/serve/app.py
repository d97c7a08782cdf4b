"""`llmclf serve`: a trained run folder behind HTTP (FastAPI on uvicorn), with dynamic batching.

    llmclf serve runs/news --host 127.0.0.1 --port 8000
    curl -s localhost:8000/classify -d '{"texts": ["Stocks rallied after the rate cut"]}'

Endpoints: POST /classify, GET /labels, GET /health (503 until a warm-up forward pass has answered),
GET /metrics, and the generated OpenAPI page at /docs (/openapi.json). Every error is JSON
`{"error": code, "message": text}` (plus `"index"` for per-text errors):

- 400: body is not JSON, empty `texts`, an empty or blank text (its index is named);
- 413: more texts than --max-texts, or a body over --max-body-bytes (Content-Length and bytes read);
- 422: JSON of the wrong shape or types (`texts` must be a list of strings, no other fields);
- 503: more rows waiting than --max-queue (with Retry-After), or the server is shutting down.

Texts longer than --max-length tokens are cut, as in training, and flagged `"truncated": true`.
SIGTERM or SIGINT: stop accepting connections, finish the requests in flight, drain the batcher, exit 0.
The run folder is resolved (realpath) once at start; requests never name files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmclf.errors import LlmclfError
from llmclf.serve.batcher import (
    ClassifierPredictor,
    DynamicBatcher,
    Predictor,
    QueueFull,
    ServingMetrics,
    ShuttingDown,
)

logger = logging.getLogger("llmclf.serve")
WARMUP_TEXT = "llmclf warm-up"


@dataclass
class ServeOptions:
    """Server settings; the command line fills them (`llmclf serve --help`)."""

    host: str = "127.0.0.1"
    """Interface to listen on; 127.0.0.1 serves this machine only, 0.0.0.0 every interface."""
    port: int = 8000
    """TCP port (0: any free port)."""
    max_batch_size: int = 32
    """Most rows in one forward pass; rows of concurrent requests are merged up to this."""
    max_wait_ms: float = 10.0
    """Longest wait before a pass for the callers the last pass answered to send again, counted from
    the oldest row's arrival or the last pass's end, whichever is later (a lone caller never waits)."""
    max_texts: int = 64
    """Most texts in one request (more: 413)."""
    max_body_bytes: int = 1_048_576
    """Largest request body in bytes (more: 413)."""
    max_queue: int = 256
    """Most rows waiting for a forward pass; a request that would exceed it gets 503 at once."""
    max_length: int | None = None
    """Tokens per text; longer texts are cut and flagged (None: as in training)."""
    pass_overhead_tokens: float | str = "auto"
    """What a forward pass costs beyond its tokens, in tokens' worth: rows of different lengths are
    split into passes where the padding would cost more than another pass (`batches.padding_groups`).
    `auto`: timed by the warm-up pass on this machine and model (a GPU, where a pass costs about the same
    at 16 and 512 tokens, never splits)."""
    graceful_timeout_s: float = 60.0
    """On SIGTERM, how long to wait for requests in flight before cancelling them."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_texts", "max_body_bytes", "max_queue"):
            if int(getattr(self, name)) < 1:
                raise LlmclfError(
                    f"serve: --{name.replace('_', '-')} must be at least 1, found {getattr(self, name)}."
                )
        if self.max_length is not None and self.max_length < 1:
            raise LlmclfError(f"serve: --max-length must be at least 1, found {self.max_length}.")
        if not (0 <= self.max_wait_ms <= 60_000) or math.isnan(self.max_wait_ms):
            raise LlmclfError(f"serve: --max-wait-ms must be between 0 and 60000, found {self.max_wait_ms}.")
        if not (0 <= self.port <= 65535):
            raise LlmclfError(f"serve: --port must be between 0 and 65535, found {self.port}.")
        if self.pass_overhead_tokens != "auto" and not (
            isinstance(self.pass_overhead_tokens, (int, float)) and 0 <= self.pass_overhead_tokens < math.inf
        ):
            raise LlmclfError(
                "serve: --pass-overhead-tokens must be auto or a number of tokens, 0 or more, "
                f"found {self.pass_overhead_tokens!r}."
            )
        if self.max_queue < self.max_texts:
            raise LlmclfError(
                f"serve: --max-queue ({self.max_queue}) is smaller than --max-texts ({self.max_texts}), so "
                "the largest allowed request could never be queued. Raise --max-queue or lower --max-texts."
            )


class ClassifyRequest(BaseModel):
    """Body of POST /classify."""

    model_config = ConfigDict(extra="forbid", strict=True)
    texts: list[str] = Field(description="Texts to classify, each non-blank.", examples=[["Stocks fell."]])


class Prediction(BaseModel):
    """One text's result, in request order."""

    label: str = Field(description="The most probable label.")
    probabilities: dict[str, float] = Field(description="Probability of every label; they sum to 1.")
    truncated: bool = Field(description="True if the text was cut to the maximum length in tokens.")


class ClassifyResponse(BaseModel):
    predictions: list[Prediction]


class ErrorBody(BaseModel):
    error: str = Field(description="A stable code, e.g. empty_text, too_many_texts, queue_full.")
    message: str = Field(description="What was wrong and what to do.")
    index: list[int] | None = Field(default=None, description="Offending text positions, if any.")


class ApiError(Exception):
    """An error answered as JSON with a status code."""

    def __init__(
        self, status: int, code: str, message: str, *, index: list[int] | None = None, retry_after: int = 0
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.index, self.retry_after = (
            status,
            code,
            message,
            index,
            retry_after,
        )

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.index is not None:
            body["index"] = self.index
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return JSONResponse(body, status_code=self.status, headers=headers)


async def read_limited_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) a declared Content-Length over `limit` and, for chunked or lying
    clients, stopping as soon as the bytes actually read pass it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid_content_length", f"Content-Length {declared!r} is not a number.")
        if int(declared) > limit:
            raise ApiError(413, "body_too_large", _too_large(int(declared), limit))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", _too_large(size, limit, at_least=True))
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int, at_least: bool = False) -> str:
    return (
        f"The request body is {'more than ' if at_least else ''}{size} bytes; this server accepts at most "
        f"{limit} (--max-body-bytes). Send fewer or shorter texts per request."
    )


MAX_JSON_DEPTH = 64
"""A /classify body nests 2 levels; deeper ones are refused before parsing. The json module's own
limit depends on the Python version (3.11 refused 2,000 levels, 3.12 parsed them)."""


def too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when the JSON text nests arrays/objects deeper than `limit` (brackets inside strings do not
    count). Scans only bodies with more than `limit` brackets in all, so ordinary requests cost a count."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth, in_string, escaped = 0, False, False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # closing quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


def parse_texts(body: bytes, options: ServeOptions) -> list[str]:
    """Validated texts of a /classify body, or an ApiError naming the problem."""
    example = 'Send {"texts": ["first text", "second text"]}.'
    if too_deep(body):
        raise ApiError(
            400,
            "invalid_json",
            f"The body is not valid JSON for this API (nested over {MAX_JSON_DEPTH} levels). {example}",
        )
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise ApiError(400, "invalid_json", f"The body is not valid JSON ({exc}). {example}") from None
    try:
        texts = ClassifyRequest.model_validate(payload).texts
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()[:10]
        )
        raise ApiError(422, "invalid_request", f"{problems}. {example}") from None
    if not texts:
        raise ApiError(400, "empty_texts", f"'texts' is an empty list. {example}")
    if len(texts) > options.max_texts:
        raise ApiError(
            413,
            "too_many_texts",
            f"{len(texts)} texts in one request; this server accepts at most {options.max_texts} "
            "(--max-texts). Split them over several requests.",
        )
    blank = [i for i, text in enumerate(texts) if not text.strip()]
    if blank:
        raise ApiError(
            400,
            "empty_text",
            f"Text(s) at index {blank[:20]} are empty or only whitespace; remove them or give them content.",
            index=blank,
        )
    return texts


class Service:
    """What the endpoints share: the labels, the batcher, the metrics and the readiness state."""

    def __init__(self, labels: list[str], predictor: Predictor, options: ServeOptions) -> None:
        self.labels = list(labels)
        self.options = options
        self.metrics = ServingMetrics()
        self.batcher = DynamicBatcher(
            predictor,
            max_batch_size=options.max_batch_size,
            max_wait_s=options.max_wait_ms / 1000.0,
            max_queue=options.max_queue,
            metrics=self.metrics,
        )
        self.ready = False
        self.warmup_error: str | None = None
        self.in_flight = 0

    async def warm_up(self) -> None:
        """One real forward pass through the batcher; /health answers 200 only after it."""
        try:
            probs, _ = await self.batcher.submit([WARMUP_TEXT])
            if probs.shape != (1, len(self.labels)):
                raise RuntimeError(f"warm-up returned shape {probs.shape}, expected (1, {len(self.labels)})")
            # `auto` is timed by the predictor's first call, this one, in the batcher's worker thread.
            measured = getattr(self.batcher.predictor, "pass_overhead_tokens", None)
            if self.options.pass_overhead_tokens == "auto" and measured is not None:
                self.options.pass_overhead_tokens = measured
                logger.info("a forward pass costs %g tokens' worth beyond its tokens here", measured)
            self.ready = True
        except Exception as exc:
            self.warmup_error = f"{type(exc).__name__}: {exc}"
            logger.error("warm-up forward pass failed: %s", self.warmup_error)

    def predictions(self, probs: Any, truncated: list[bool]) -> list[dict[str, Any]]:
        return [
            {
                "label": self.labels[int(row.argmax())],
                "probabilities": {label: float(p) for label, p in zip(self.labels, row)},
                "truncated": cut,
            }
            for row, cut in zip(probs, truncated)
        ]


ERRORS = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "Body is not JSON, texts is empty, or a text is blank (index named).",
        413: "Too many texts, or the body is too large.",
        422: "JSON of the wrong shape or types.",
        503: "Queue full (Retry-After) or shutting down.",
    }.items()
}


def create_app(labels: list[str], predictor: Predictor, options: ServeOptions | None = None) -> FastAPI:
    """The ASGI app. Its lifespan starts the batcher and the warm-up, and drains the batcher at exit."""
    options = options or ServeOptions()
    service = Service(labels, predictor, options)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        warmup = asyncio.create_task(service.warm_up())
        try:
            yield
        finally:
            # uvicorn calls this after the requests in flight have been answered; rows still queued
            # (e.g. from cancelled requests) are finished before the worker thread ends.
            await asyncio.to_thread(service.batcher.stop, options.graceful_timeout_s)
            warmup.cancel()

    app = FastAPI(
        title="llmclf classifier",
        description="Text classification with a fine-tuned llmclf run. Labels: " + ", ".join(labels),
        lifespan=lifespan,
    )
    app.state.service = service
    _add_classify(app, service, options)
    _add_status_routes(app, service, options)
    return app


def _add_classify(app: FastAPI, service: Service, options: ServeOptions) -> None:
    """POST /classify, and the JSON shape of unknown paths and wrong methods."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown paths and wrong methods answer in the same JSON shape as every other error.
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"error": code, "message": f"{exc.detail}: {request.method} {request.url.path}"},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.post(
        "/classify",
        response_model=ClassifyResponse,
        responses=ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ClassifyRequest.model_json_schema()}},
            }
        },
    )
    async def classify(request: Request) -> JSONResponse:
        """Label each text; predictions come back in request order."""
        # The body is read and validated here rather than by FastAPI so that the size limit applies to
        # the bytes as they arrive and every malformed body gets one JSON error shape.
        started = time.perf_counter()
        service.in_flight += 1
        try:
            texts = parse_texts(await read_limited_body(request, options.max_body_bytes), options)
            try:
                probs, truncated = await service.batcher.submit(texts)
            except QueueFull as exc:
                raise ApiError(
                    503, "queue_full", f"The server is busy ({exc}); retry shortly.", retry_after=1
                ) from None
            except ShuttingDown:
                raise ApiError(503, "shutting_down", "The server is shutting down.", retry_after=5) from None
        except ApiError as exc:
            service.metrics.record_rejected(exc.code)
            return exc.response()
        except Exception as exc:
            logger.exception("classify failed")
            service.metrics.record_failed()
            return ApiError(500, "internal_error", f"Classification failed: {exc}").response()
        finally:
            service.in_flight -= 1
        service.metrics.record_ok(len(texts), sum(truncated), time.perf_counter() - started)
        return JSONResponse({"predictions": service.predictions(probs, truncated)})


def _add_status_routes(app: FastAPI, service: Service, options: ServeOptions) -> None:
    """GET /labels, /health and /metrics."""

    @app.get("/labels")
    async def labels_endpoint() -> dict[str, list[str]]:
        """The labels this classifier predicts, in its output order."""
        return {"labels": service.labels}

    @app.get("/health", responses={503: {"description": "Not ready yet (warming up) or warm-up failed."}})
    async def health() -> JSONResponse:
        """200 once a warm-up forward pass has answered; 503 before (or if it failed)."""
        if service.ready:
            return JSONResponse({"status": "ok"})
        status = "failed" if service.warmup_error else "starting"
        return JSONResponse({"status": status, "error": service.warmup_error}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        """Requests, rows, batch sizes (histogram, mean, merged), latency quantiles in ms, queue state."""
        return {
            **service.metrics.snapshot(),
            "in_flight": service.in_flight,
            "queued_rows": service.batcher.queued_rows,
            "ready": service.ready,
            "limits": {k: v for k, v in vars(options).items() if k not in ("host", "port")},
        }


def run_server(run_dir: str, options: ServeOptions, *, quiet: bool = False, verbose: bool = False) -> int:
    """Load the run folder, serve it until SIGTERM/SIGINT, drain, return 0."""
    import uvicorn

    from llmclf.inference.classifier import Classifier

    path = os.path.realpath(os.path.expanduser(run_dir))
    if not quiet:
        print(f"Loading classifier from {path} ...", file=sys.stderr, flush=True)
    clf = Classifier.load(path)
    options.max_length = options.max_length or clf.max_length
    predictor = ClassifierPredictor(clf, options.max_length, options.pass_overhead_tokens)
    app = create_app(clf.labels, predictor, options)
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level="warning" if quiet else "info",
        access_log=verbose,
        timeout_graceful_shutdown=int(math.ceil(options.graceful_timeout_s)),
        lifespan="on",
    )
    if not quiet:
        print(
            f"Serving {len(clf.labels)} labels on http://{options.host}:{options.port} (docs at /docs); "
            "SIGTERM or Ctrl-C drains and stops.",
            file=sys.stderr,
            flush=True,
        )
    # uvicorn shuts down gracefully on SIGTERM/SIGINT and then re-raises the signal to the handler that
    # was installed before it; a no-op handler there makes a drained shutdown a normal exit (status 0).
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = uvicorn.Server(config)
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise LlmclfError(
            f"The server could not start on {options.host}:{options.port} (see the message above); "
            "is the port in use? Choose another with --port."
        )
    return 0
