"""`llmclf serve`: a trained run folder behind HTTP (FastAPI on uvicorn), with dynamic batching.

    llmclf serve runs/news --host 127.0.0.1 --port 8000
    curl -s localhost:8000/classify -H 'Content-Type: application/json' \
        -d '{"texts": ["Stocks rallied after the rate cut"]}'

Endpoints: POST /classify, GET /labels, GET /health (503 until a warm-up forward pass has answered),
GET /metrics, and with --docs the generated OpenAPI page at /docs (/openapi.json). POST /predict and
POST / answer Hugging Face's text-classification API (text-embeddings-inference's route and the Inference
API's, serve/tei.py) with the same limits and batching. Every error is JSON
`{"error": code, "message": text}` (plus `"index"` for per-text errors):

- 400: body is not JSON, empty `texts`, an empty or blank text, or a text that is not valid Unicode
  (its index is named); a Host header this server does not answer to (`security.HostPolicy`);
- 401: --api-key (or LLMCLF_API_KEY) is set and the request lacks `Authorization: Bearer KEY`
  (every endpoint but /health);
- 408: the request head or body did not arrive within --header-timeout-s / --body-timeout-s;
- 413: more texts than --max-texts, or a body over --max-body-bytes (Content-Length and bytes read),
  or (POST /predict and /, `"truncate": false`) a text over the maximum length;
- 415: a POST whose Content-Type is not application/json (a web page cannot send that cross-origin
  without the browser asking first, and this server never says yes);
- 422: JSON of the wrong shape or types (`texts` must be a list of strings, no other fields), or a
  request for what this server does not do (raw scores, sentence pairs: serve/tei.py);
- 500: the forward pass failed for this request (details in the server log only);
- 503: more rows waiting than --max-queue (with Retry-After), more connections than --max-connections
  (uvicorn's plain-text 503), or the server is shutting down.

Texts longer than --max-length tokens are cut, as in training, and flagged `"truncated": true`.
SIGTERM or SIGINT: stop accepting connections, finish the requests in flight (at most
--graceful-timeout-s), drain the batcher, exit 0. The run folder is resolved (realpath) once at start;
requests never name files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmclf.errors import LlmclfError
from llmclf.serve.batcher import (
    ENCODE_THREADS,
    ClassifierPredictor,
    DynamicBatcher,
    Input,
    Predictor,
    QueueFull,
    ServingMetrics,
    ShuttingDown,
)
from llmclf.serve.limits import (  # noqa: F401  (MAX_JSON_DEPTH, too_deep: importable from here too)
    MAX_JSON_DEPTH,
    ApiError,
    check_pairs,
    check_texts,
    guarded_h11_protocol,
    load_json,
    read_limited_body,
    too_deep,
)
from llmclf.serve.security import Guard, HostPolicy, host_name, is_loopback
from llmclf.serve.tei import PredictCall, inference_api_answer, parse_predict, predict_schema, tei_answer
from llmclf.targets import SCORE

logger = logging.getLogger("llmclf.serve")
WARMUP_TEXT = "llmclf warm-up"
API_KEY_ENV = "LLMCLF_API_KEY"


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
    max_connections: int = 64
    """Most open connections served at once; a request on one beyond them gets uvicorn's 503."""
    header_timeout_s: float = 10.0
    """How long a connection may take to send a request's line and headers, from its opening or from
    the previous response; then it is closed (a partly sent head gets 408 first)."""
    body_timeout_s: float = 30.0
    """How long a request's body may take to arrive once its headers have (more: 408)."""
    graceful_timeout_s: float = 10.0
    """On SIGTERM, how long to wait for requests in flight before cancelling them; the batcher then
    gets as long again to finish the rows already queued."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names the server answers to beyond localhost, 127.0.0.1, ::1, --host and IP addresses
    (`*`: any, e.g. behind a proxy that checks them; `*.example.com`: its subdomains)."""
    api_key: str | None = field(default=None, repr=False)
    """If set, every endpoint but /health needs `Authorization: Bearer <api_key>` (else 401)."""
    docs: bool = False
    """Serve /docs (Swagger UI, whose script and styles the browser loads from a CDN) and /openapi.json."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_texts", "max_body_bytes", "max_queue", "max_connections"):
            if int(getattr(self, name)) < 1:
                raise LlmclfError(
                    f"serve: --{name.replace('_', '-')} must be at least 1, found {getattr(self, name)}."
                )
        if self.max_length is not None and self.max_length < 1:
            raise LlmclfError(f"serve: --max-length must be at least 1, found {self.max_length}.")
        if not (0 <= self.max_wait_ms <= 60_000) or math.isnan(self.max_wait_ms):
            raise LlmclfError(f"serve: --max-wait-ms must be between 0 and 60000, found {self.max_wait_ms}.")
        for name in ("header_timeout_s", "body_timeout_s", "graceful_timeout_s"):
            if not (0 < getattr(self, name) <= 3600):  # NaN fails too
                raise LlmclfError(
                    f"serve: --{name.replace('_', '-')} must be more than 0 and at most 3600 seconds, "
                    f"found {getattr(self, name)}."
                )
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
        self._check_access()

    def _check_access(self) -> None:
        hosts = self.allowed_hosts
        self.allowed_hosts = (hosts,) if isinstance(hosts, str) else tuple(hosts)
        for name in self.allowed_hosts:
            if not name or host_name(name) != name.lower().rstrip(".") or any(c in name for c in "/ \t@"):
                raise LlmclfError(
                    f"serve: --allowed-hosts takes host names such as api.example.com, found {name!r} "
                    "(no scheme, port or path)."
                )
        if self.api_key is not None:
            key = self.api_key
            if len(key) < 16 or not key.isascii() or not key.isprintable() or " " in key:
                raise LlmclfError(
                    f"serve: the API key (--api-key or {API_KEY_ENV}) must be at least 16 printable ASCII "
                    f"characters without spaces; found {len(key)} characters. Make one with "
                    "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`."
                )


class ClassifyRequest(BaseModel):
    """Body of POST /classify."""

    model_config = ConfigDict(extra="forbid", strict=True)
    texts: list[str] | None = Field(
        default=None, description="Texts to classify, each non-blank.", examples=[["Stocks fell."]]
    )
    pairs: list[list[str]] | None = Field(
        default=None,
        description="For a classifier trained on text pairs, instead of texts: [first, second] per input.",
        examples=[[["A man is eating.", "Someone eats."]]],
    )


class Prediction(BaseModel):
    """One text's result, in request order: a classifier's label and probabilities, or a regression
    model's score."""

    label: str | None = Field(default=None, description="The most probable label (single-label).")
    labels: list[str] | None = Field(
        default=None, description="The labels whose probability reaches their threshold (multi-label)."
    )
    probabilities: dict[str, float] | None = Field(
        default=None,
        description="Probability of every label; they sum to 1 (single-label), or each is its own (multi-label).",
    )
    score: float | None = Field(
        default=None, description="The predicted number, in the training column's units (regression)."
    )
    truncated: bool = Field(description="True if the text was cut to the maximum length in tokens.")


class ClassifyResponse(BaseModel):
    predictions: list[Prediction]


class ErrorBody(BaseModel):
    error: str = Field(description="A stable code, e.g. empty_text, too_many_texts, queue_full.")
    message: str = Field(description="What was wrong and what to do.")
    index: list[int] | None = Field(default=None, description="Offending text positions, if any.")


def parse_texts(body: bytes, options: ServeOptions, pairs: bool = False) -> list[Input]:
    """Validated inputs of a /classify body (texts, or (first, second) pairs for a classifier trained on
    pairs), or an ApiError naming the problem."""
    example = (
        'Send {"pairs": [["first text", "its second text"], ...]}.'
        if pairs
        else 'Send {"texts": ["first text", "second text"]}.'
    )
    request = load_json(body, ClassifyRequest, example)
    given, wrong = ("pairs", "texts") if pairs else ("texts", "pairs")
    if getattr(request, wrong) is not None or getattr(request, given) is None:
        what = "text pairs" if pairs else "single texts"
        raise ApiError(422, "invalid_request", f"This classifier takes {what} in '{given}'. {example}")
    if not pairs:
        return check_texts(request.texts, options.max_texts, example)
    return check_pairs(request.pairs, options.max_texts, example)


def require_json(request: Request) -> None:
    """415 unless the body is declared JSON: a web page can send text/plain or a form to localhost
    without asking the browser first (no CORS preflight), but not application/json."""
    declared = request.headers.get("content-type", "")
    if declared.split(";")[0].strip().lower() != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {declared[:100]!r} is not JSON; send the body with `Content-Type: "
            "application/json`.",
        )


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
        # Tokenising runs here, not on the model's worker thread nor the event loop.
        self.encoders = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="llmclf-tokenize")
        self.ready = False
        self.warmup_error: str | None = None
        self.in_flight = 0
        self.pairs = bool(getattr(predictor, "pairs", False))  # the classifier takes text pairs
        self.regression = bool(getattr(predictor, "regression", False))  # it outputs one number per text
        self.thresholds = getattr(predictor, "thresholds", None)  # multi-label: a threshold per label
        # what the model applies to its logits (TEI's function_to_apply)
        self.function = "none" if self.regression else "sigmoid" if self.thresholds is not None else "softmax"

    async def classify(self, texts: list[Input]) -> tuple[Any, list[bool]]:
        """Probabilities and truncation flags: tokenised by the predictor's `encode` (if it has one) in
        the tokenising threads, then run by the batcher."""
        encode = getattr(self.batcher.predictor, "encode", None)
        rows = texts if encode is None else await asyncio.wrap_future(self.encoders.submit(encode, texts))
        return await self.batcher.submit(rows)

    async def warm_up(self) -> None:
        """One real forward pass through the batcher; /health answers 200 only after it."""
        try:
            probs, _ = await self.classify([(WARMUP_TEXT, WARMUP_TEXT) if self.pairs else WARMUP_TEXT])
            if probs.shape != (1, len(self.labels)):
                raise RuntimeError(f"warm-up returned shape {probs.shape}, expected (1, {len(self.labels)})")
            # `auto` is timed by the predictor's first call, this one, in the batcher's worker thread.
            measured = getattr(self.batcher.predictor, "pass_overhead_tokens", None)
            if self.options.pass_overhead_tokens == "auto" and measured is not None:
                self.options.pass_overhead_tokens = measured
                logger.info("a forward pass costs %g tokens' worth beyond its tokens here", measured)
            self.ready = True
        except Exception:
            # /health is open to anyone who can connect: it says that the pass failed, the log says why.
            self.warmup_error = "the warm-up forward pass failed; the server log says why"
            logger.exception("warm-up forward pass failed")

    def predictions(self, probs: Any, truncated: list[bool]) -> list[dict[str, Any]]:
        """Each text's answer: label and probabilities, or (regression) its score; and whether it was cut."""
        if self.regression:  # probs: (n, 1) numbers
            return [{SCORE: float(row[0]), "truncated": cut} for row, cut in zip(probs, truncated)]
        if self.thresholds is not None:  # multi-label: every label that reaches its threshold
            return [
                {
                    "labels": [label for label, p in zip(self.labels, row) if p >= self.thresholds[label]],
                    "probabilities": {label: float(p) for label, p in zip(self.labels, row)},
                    "truncated": cut,
                }
                for row, cut in zip(probs, truncated)
            ]
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
        400: "Body is not JSON, texts is empty, or a text is blank or not valid Unicode (index named).",
        401: "An API key is required and missing or wrong.",
        408: "The body did not arrive in time.",
        413: "Too many texts, or the body is too large.",
        415: "Content-Type is not application/json.",
        422: "JSON of the wrong shape or types.",
        500: "Internal error; the server log has the details under the id in the message.",
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
            service.encoders.shutdown(wait=False, cancel_futures=True)

    docs = options.docs  # Swagger UI's page loads its script from a CDN: off unless asked for
    app = FastAPI(
        title="llmclf classifier",
        description="Text classification with a fine-tuned llmclf run. Labels: " + ", ".join(labels),
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.service = service
    app.add_middleware(Guard, hosts=HostPolicy(options.host, options.allowed_hosts), api_key=options.api_key)
    _add_classify(app, service)
    _add_tei(app, service)
    _add_status_routes(app, service, options)
    return app


def _add_classify(app: FastAPI, service: Service) -> None:
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
        return await answer(
            request,
            service,
            lambda body, options: (parse_texts(body, options, service.pairs), None),
            lambda _, predictions: {"predictions": predictions},
        )


Parse = Callable[[bytes, ServeOptions], tuple[list[Input], Any]]
"""A request body -> (its texts, what else the endpoint needs to answer), or an ApiError."""
Respond = Callable[[Any, list[dict[str, Any]]], Any]
"""(what `Parse` returned beside the texts, `Service.predictions` of the texts) -> the JSON answer."""


async def answer(request: Request, service: Service, parse: Parse, respond: Respond) -> JSONResponse:
    """What every classifying endpoint does: the body declared JSON, read within its size and time,
    parsed off the event loop, its texts through the batcher, every outcome counted in /metrics."""
    # The body is read and validated here rather than by FastAPI so that the size limit applies to
    # the bytes as they arrive and every malformed body gets one JSON error shape.
    options = service.options
    started = time.perf_counter()
    service.in_flight += 1
    try:
        require_json(request)
        body = await read_limited_body(request, options.max_body_bytes, options.body_timeout_s)
        # Parsing a large body takes milliseconds of CPU: not on the event loop, which serves everyone.
        texts, call = await asyncio.to_thread(parse, body, options)
        probs, truncated = await _classify_or_refuse(service, texts)
        payload = respond(call, service.predictions(probs, truncated))
    except ApiError as exc:
        service.metrics.record_rejected(exc.code)
        return exc.response()
    except Exception:
        incident = uuid.uuid4().hex[:12]
        logger.exception("classify failed (id %s)", incident)
        service.metrics.record_failed()
        return ApiError(
            500,
            "internal_error",
            f"Internal error while classifying (id {incident}); the server log has the details under "
            "this id. Retry; if it fails again, tell the server's operator the id.",
        ).response()
    finally:
        service.in_flight -= 1
    service.metrics.record_ok(len(texts), sum(truncated), time.perf_counter() - started)
    return JSONResponse(payload)


def _add_tei(app: FastAPI, service: Service) -> None:
    """POST /predict (text-embeddings-inference's classification route) and POST / (Hugging Face's
    Inference API, what `huggingface_hub.InferenceClient(base_url=...).text_classification` calls)."""
    extra = {"requestBody": {"required": True, "content": {"application/json": {"schema": predict_schema()}}}}

    def parse(body: bytes, options: ServeOptions) -> tuple[list[str], PredictCall]:
        return parse_predict(
            body, options.max_texts, options.max_length, pairs=service.pairs, function=service.function
        )

    @app.post("/predict", responses=ERRORS, openapi_extra=extra)
    async def predict(request: Request) -> JSONResponse:
        """text-embeddings-inference's route: `{"inputs": "text"}` gets `[{"label", "score"}, ...]`,
        most probable first; `{"inputs": ["a", "b"]}` one such list per text, in request order."""
        return await answer(request, service, parse, tei_answer)

    @app.post("/", responses=ERRORS, openapi_extra=extra)
    async def inference_api(request: Request) -> JSONResponse:
        """Hugging Face's Inference API: as /predict, but one list per text for a single text too
        (`[[{"label", "score"}, ...]]`), as `InferenceClient.text_classification` reads it."""
        return await answer(request, service, parse, inference_api_answer)


async def _classify_or_refuse(service: Service, texts: list[Input]) -> tuple[Any, list[bool]]:
    try:
        return await service.classify(texts)
    except QueueFull as exc:
        raise ApiError(
            503, "queue_full", f"The server is busy ({exc}); retry shortly.", retry_after=1
        ) from None
    except ShuttingDown:
        raise ApiError(503, "shutting_down", "The server is shutting down.", retry_after=5) from None


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
        hidden = ("host", "port", "api_key")
        return {
            **service.metrics.snapshot(),
            "in_flight": service.in_flight,
            "queued_rows": service.batcher.queued_rows,
            "ready": service.ready,
            "limits": {k: v for k, v in vars(options).items() if k not in hidden},
        }


def load_off_main_thread(path: str, loading: dict) -> Any:
    """`Classifier.load` in a thread of its own that ends with it. torch's OpenMP threads belong to the
    thread that starts a parallel region: had the main thread loaded (its matmuls and weight packing),
    its idle team would share the cores with the batcher thread's, and libgomp then sleeps between
    parallel regions instead of spinning: passes 2x slower on 2 cores (docs/serving.md)."""
    from llmclf.inference.classifier import Classifier

    with ThreadPoolExecutor(1, thread_name_prefix="llmclf-load") as pool:
        return pool.submit(Classifier.load, path, **loading).result()


def run_server(
    run_dir: str,
    options: ServeOptions,
    *,
    quiet: bool = False,
    verbose: bool = False,
    loading: dict | None = None,
) -> int:
    """Load the run folder (`loading`: Classifier.load's caller-only options), serve it until
    SIGTERM/SIGINT, drain, return 0."""
    import uvicorn

    path = os.path.realpath(os.path.expanduser(run_dir))
    if not quiet:
        print(f"Loading classifier from {path} ...", file=sys.stderr, flush=True)
    clf = load_off_main_thread(path, loading or {})
    options.max_length = options.max_length or clf.max_length
    predictor = ClassifierPredictor(clf, options.max_length, options.pass_overhead_tokens)
    app = create_app(clf.labels, predictor, options)
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level="warning" if quiet else "info",
        access_log=verbose,
        http=guarded_h11_protocol(options.header_timeout_s),
        # uvicorn answers 503 once open connections reach the limit, counting the asking one.
        limit_concurrency=options.max_connections + 1,
        timeout_graceful_shutdown=int(math.ceil(options.graceful_timeout_s)),
        lifespan="on",
    )
    if options.api_key is None and not is_loopback(options.host):
        logger.warning(
            "serving on %s without an API key: anyone who can reach this port can classify; "
            "set %s (or --api-key) or put an authenticating proxy in front.",
            options.host,
            API_KEY_ENV,
        )
    if not quiet:
        print(
            f"Serving {len(clf.labels)} labels on http://{options.host}:{options.port}"
            f"{' (docs at /docs)' if options.docs else ''}; SIGTERM or Ctrl-C drains and stops.",
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
