"""What one connection or request may cost `llmclf serve`: the request head and body must arrive in
time, the body within a size, its JSON within a nesting depth and the request's shape, its texts within a
count, each non-blank valid Unicode. Errors are `ApiError`s, answered as JSON
`{"error": code, "message": text}`.

uvicorn bounds the size of a request head (h11: 16 KiB) but not the time it takes to arrive, and waits
for ever on a connection that sends nothing: `guarded_h11_protocol` closes those.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

Body = TypeVar("Body", bound=BaseModel)


class ApiError(Exception):
    """An error answered as JSON with a status code."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        index: list[int] | None = None,
        retry_after: int = 0,
        close: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.index = status, code, message, index
        self.retry_after, self.close, self.headers = retry_after, close, dict(headers or {})

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.index is not None:
            body["index"] = self.index
        headers = dict(self.headers)
        if self.retry_after:
            headers["Retry-After"] = str(self.retry_after)
        if self.close:  # the client is stalled mid-body: no later request can follow on this connection
            headers["Connection"] = "close"
        return JSONResponse(body, status_code=self.status, headers=headers or None)


async def read_limited_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refusing (413) a declared Content-Length over `limit` and, for chunked or lying
    clients, stopping as soon as the bytes actually read pass it; 408 when the whole body has not
    arrived within `timeout_s` of the start of reading."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid_content_length", f"Content-Length {declared!r} is not a number.")
        if int(declared) > limit:
            raise ApiError(413, "body_too_large", _too_large(int(declared), limit))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - loop.time()))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise ApiError(
                408,
                "body_timeout",
                f"The request body ({size} bytes so far) did not arrive within {timeout_s:g} s "
                "(--body-timeout-s). Send the whole body at once, or fewer texts per request.",
                close=True,
            ) from None
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
    count). Scans only bodies with more than `limit` brackets in all, so ordinary requests cost a count;
    the scan works on the positions of quotes, backslashes and brackets (numpy, no loop per byte)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    codes = np.frombuffer(body, dtype=np.uint8)
    quotes = np.flatnonzero(codes == 0x22)
    backslashes = np.flatnonzero(codes == 0x5C)
    if quotes.size and backslashes.size:
        # A quote is escaped when an odd run of backslashes ends right before it.
        order = np.arange(backslashes.size)
        run_start = np.maximum.accumulate(np.where(np.diff(backslashes, prepend=-2) != 1, order, 0))
        last = np.maximum(np.searchsorted(backslashes, quotes) - 1, 0)
        adjacent = backslashes[last] == quotes - 1
        run = np.where(adjacent, last - run_start[last] + 1, 0)
        quotes = quotes[run % 2 == 0]
    opens = (codes == 0x5B) | (codes == 0x7B)
    brackets = np.flatnonzero(opens | (codes == 0x5D) | (codes == 0x7D))
    outside = np.searchsorted(quotes, brackets) % 2 == 0  # an even number of quotes before it
    steps = np.where(opens[brackets], 1, -1)[outside]
    return bool(steps.size) and int(np.cumsum(steps).max()) > limit


def load_json(body: bytes, model: type[Body], example: str) -> Body:
    """The body as JSON validated by `model`: 400 `invalid_json` for a body that is not JSON (or nests
    deeper than MAX_JSON_DEPTH), 422 `invalid_request` for JSON of the wrong shape; `example` ends each
    message (what to send instead)."""
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
        return model.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()[:10]
        )
        raise ApiError(422, "invalid_request", f"{problems}. {example}") from None


def check_texts(texts: list[str], max_texts: int, example: str, field: str = "texts") -> list[str]:
    """`texts` if there are 1 to `max_texts` of them (else 400 `empty_texts`, 413 `too_many_texts`),
    none blank (400 `empty_text`) and each valid Unicode (400 `invalid_text`), the offenders' indexes
    named; `field`: what the request calls them."""
    if not texts:
        raise ApiError(400, "empty_texts", f"'{field}' is an empty list. {example}")
    if len(texts) > max_texts:
        raise ApiError(
            413,
            "too_many_texts",
            f"{len(texts)} texts in one request; this server accepts at most {max_texts} "
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
    invalid = [i for i, text in enumerate(texts) if not _is_unicode(text)]
    if invalid:
        raise ApiError(
            400,
            "invalid_text",
            f"Text(s) at index {invalid[:20]} hold an unpaired surrogate escape (such as \\ud800), which is "
            "not a character; send them as valid UTF-8 (encode the whole text, not half a pair).",
            index=invalid,
        )
    return texts


def check_pairs(
    pairs: list[list[str]], max_texts: int, example: str, field: str = "pairs"
) -> list[tuple[str, str]]:
    """`pairs` as (first, second) tuples if each holds two texts (else 422 `invalid_pair`), checked as
    `check_texts` checks texts (each pair counts once towards `max_texts`, and an offending pair's
    index is named)."""
    odd = [i for i, pair in enumerate(pairs) if len(pair) != 2]
    if odd:
        raise ApiError(
            422,
            "invalid_pair",
            f"Input(s) at index {odd[:20]} hold {len(pairs[odd[0]])} text(s), not two (a first text and its "
            f"second text). {example}",
            index=odd,
        )
    for part in (0, 1):
        check_texts([pair[part] for pair in pairs], max_texts, example, field)
    return [(first, second) for first, second in pairs]


def _is_unicode(text: str) -> bool:
    """False for a text holding a lone surrogate (JSON's `\\ud800`), which no tokenizer encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def guarded_h11_protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol (passed as `http=` to `uvicorn.Config`), closing a connection that owes a
    request head for more than `header_timeout_s` (counted from the connection, or from the previous
    response on a kept-alive one), or the rest of a body the app answered without reading it. A partly
    sent head gets a JSON 408 first."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    timed_out = json.dumps(
        {
            "error": "header_timeout",
            "message": f"The request line and headers did not arrive within {header_timeout_s:g} s "
            "(--header-timeout-s). Send them at once.",
        }
    ).encode()
    response = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(timed_out), timed_out)
    )

    class GuardedH11Protocol(H11Protocol):  # type: ignore[misc, valid-type]
        _timer: asyncio.TimerHandle | None = None
        _owed: Any = None  # the client state the timer was armed for

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

        def _owing(self) -> Any:
            """The client's state while the server waits on it outside the app, else None."""
            state = self.conn.their_state
            if state is h11.IDLE:
                return state
            answered = self.cycle is None or self.cycle.response_complete
            return state if state is h11.SEND_BODY and answered else None

        def _watch(self) -> None:
            owed = None if self.transport.is_closing() else self._owing()
            if owed is not None and owed is self._owed and self._timer is not None:
                return  # the same wait goes on: its deadline stands
            if self._timer is not None:
                self._timer.cancel()
            self._owed = owed
            self._timer = None if owed is None else self.loop.call_later(header_timeout_s, self._expire)

        def _expire(self) -> None:
            self._timer = None
            if self.transport.is_closing() or self._owing() is None:
                return
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
                self.transport.write(response)  # a head was started: say why it is closed
            self.transport.close()

    return GuardedH11Protocol
