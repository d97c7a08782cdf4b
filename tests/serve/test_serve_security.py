"""`llmclf serve` against hostile or broken input: a text no tokenizer takes, a failing row among other
requests' rows, huge texts and bodies, idle and slow connections, requests a web page could send to
localhost, and a missing API key. In-process (ASGI) where the finding is about a request, the real
server on loopback where it is about the connection."""

from __future__ import annotations

import asyncio
import json
import math
import queue
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from test_serve_app import (
    CPU_OVERHEAD,
    LIMITS,
    assert_matches,
    demo_texts,
    free_port,
    local_client,
    start_server,
    wait_healthy,
    wait_ready,
)

from llmclf.cli import main
from llmclf.errors import LlmclfError
from llmclf.inference.classifier import Classifier
from llmclf.serve.app import ServeOptions, create_app
from llmclf.serve.batcher import CHARS_PER_TOKEN_BOUND, ClassifierPredictor, DynamicBatcher

JSON = {"Content-Type": "application/json"}
API_KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def clf(trained_run) -> Classifier:
    return Classifier.load(trained_run)


@pytest.fixture(scope="module")
def client(clf):
    options = ServeOptions(**LIMITS, max_length=clf.max_length)
    app = create_app(clf.labels, ClassifierPredictor(clf, clf.max_length, CPU_OVERHEAD), options)
    with local_client(app) as test_client:
        wait_ready(test_client)
        yield test_client


def wait_queued(client, rows: int) -> None:
    for _ in range(500):
        if client.get("/metrics").json()["queued_rows"] == rows:
            return
        time.sleep(0.02)
    raise AssertionError(f"never {rows} rows queued: {client.get('/metrics').json()}")


# ---- finding 3: one bad text must not fail the other requests of its pass ----


def test_a_lone_surrogate_is_refused_with_its_index(client, clf):
    """`"\\ud800"` is a valid JSON escape but not a character: the tokenizer raised on it inside the
    batch, and every request of that pass got 500."""
    body = b'{"texts": ["fine", "\\ud800", "ok \\udfff", "\\ud83d\\ude00 a paired emoji"]}'
    response = client.post("/classify", content=body, headers=JSON)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_text" and response.json()["index"] == [1, 2]
    emoji = client.post("/classify", content=b'{"texts": ["\\ud83d\\ude00 a paired emoji"]}', headers=JSON)
    assert emoji.status_code == 200
    assert_matches(clf, ["\U0001f600 a paired emoji"], emoji.json()["predictions"])


def test_a_row_that_breaks_the_pass_fails_only_its_own_request(clf):
    entered, release = threading.Event(), threading.Event()
    real = ClassifierPredictor(clf, clf.max_length, CPU_OVERHEAD)
    passes: list[int] = []

    def picky(rows):
        entered.set()
        release.wait(30)
        passes.append(len(rows))
        if any(isinstance(row, str) and "poison" in row for row in rows):
            raise RuntimeError("tokenizer exploded reading /secret/model/path")
        return real(rows)

    options = ServeOptions(max_texts=4, max_queue=16, max_batch_size=8, max_wait_ms=0)
    with local_client(create_app(clf.labels, picky, options)) as client:
        release.set()  # the warm-up passes, then the next pass is held until both requests are queued
        wait_ready(client)
        release.clear()
        entered.clear()
        good_texts = demo_texts(2, "good")
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(client.post, "/classify", json={"texts": ["held in the pass"]})
            assert entered.wait(30)
            good = pool.submit(client.post, "/classify", json={"texts": good_texts})
            bad = pool.submit(client.post, "/classify", json={"texts": ["fine", "poison"]})
            wait_queued(client, 4)
            release.set()
            assert first.result().status_code == 200
            good, bad = good.result(), bad.result()
        assert good.status_code == 200, good.text
        assert_matches(clf, good_texts, good.json()["predictions"])
        assert bad.status_code == 500 and bad.json()["error"] == "internal_error"
        assert "Internal error" in bad.json()["message"] and "server log" in bad.json()["message"]
        assert "exploded" not in bad.text and "/secret" not in bad.text
        assert 4 in passes  # the two requests did share a pass, which was then run per request
        assert client.get("/metrics").json()["requests"]["failed"] == 1


def test_the_batcher_runs_a_failed_pass_again_one_request_at_a_time():
    gate, entered = threading.Event(), threading.Event()
    passes: list[list[str]] = []

    def predictor(rows):
        passes.append(list(rows))
        entered.set()
        gate.wait(10)
        if "bad" in rows:
            raise ValueError("cannot take it")
        return np.ones((len(rows), 2)) / 2, [False] * len(rows)

    async def scenario():
        batcher = DynamicBatcher(predictor, max_batch_size=8, max_wait_s=0, max_queue=100)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(["a"]))
        while not entered.is_set():
            await asyncio.sleep(0.005)
        good = asyncio.ensure_future(batcher.submit(["g1", "g2"]))
        bad = asyncio.ensure_future(batcher.submit(["bad"]))
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(first, good, bad, return_exceptions=True)
        batcher.stop()
        return results

    first, good, bad = asyncio.run(scenario())
    assert good[0].shape == (2, 2) and isinstance(bad, RuntimeError)
    assert passes == [["a"], ["g1", "g2", "bad"], ["g1", "g2"], ["bad"]]


def test_errors_never_show_the_exception_text(clf):
    def broken(rows):
        raise RuntimeError("cannot open /home/someone/secret-model.bin")

    with local_client(create_app(clf.labels, broken, ServeOptions(**LIMITS))) as client:
        for _ in range(200):
            health = client.get("/health")
            if health.json()["status"] != "starting":
                break
            time.sleep(0.02)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        response = client.post("/classify", json={"texts": ["a text"]})
        assert response.status_code == 500 and response.json()["error"] == "internal_error"
        for text in (health.text, response.text):
            assert "secret" not in text and "RuntimeError" not in text


# ---- finding 5: denial of service ----


def test_texts_are_tokenised_outside_the_model_thread(clf):
    """The model's worker thread only runs the model; the tokenizer runs in the server's own threads."""
    threads: dict[str, list[str]] = {"encode": [], "model": []}
    kinds: list[type] = []

    class Recording(ClassifierPredictor):
        def encode(self, texts):
            threads["encode"].append(threading.current_thread().name)
            return super().encode(texts)

        def __call__(self, rows):
            threads["model"].append(threading.current_thread().name)
            kinds.extend(type(row) for row in rows)
            return super().__call__(rows)

    predictor = Recording(clf, clf.max_length, CPU_OVERHEAD)
    with local_client(create_app(clf.labels, predictor, ServeOptions(**LIMITS))) as client:
        wait_ready(client)
        texts = demo_texts(3, "threads")
        response = client.post("/classify", json={"texts": texts})
        assert response.status_code == 200
        assert_matches(clf, texts, response.json()["predictions"])
    assert threads["encode"] and all(name.startswith("llmclf-tokenize") for name in threads["encode"])
    assert set(threads["model"]) == {"llmclf-batcher"}
    assert str not in kinds  # the worker got token ids, never a text to tokenise


def test_huge_texts_are_cut_before_tokenising_and_flagged_as_before(clf):
    predictor = ClassifierPredictor(clf, clf.max_length, CPU_OVERHEAD)
    rows = demo_texts(400, "long")
    texts = ["Stocks rallied", " ".join(rows[:20]), " ".join(rows), " ".join(rows) * 3]
    assert len(texts[-1]) > 64 * clf.max_length  # beyond the cut
    encoded = predictor.encode(texts)
    expected = clf.tokenizer(texts, truncation=True, max_length=clf.max_length)["input_ids"]
    assert [row.ids for row in encoded] == expected
    full = clf.tokenizer(texts, truncation=False)["input_ids"]
    assert [row.truncated for row in encoded] == [len(ids) > clf.max_length for ids in full]
    huge = "Stocks rallied after the rate cut. " * 30_000  # 1 MB
    whole = len(clf.tokenizer([huge], truncation=False)["input_ids"][0])
    read = Reading(clf.tokenizer)
    predictor._tokenizers = queue.SimpleQueue()
    predictor._tokenizers.put(read)
    (row,) = predictor.encode([huge])
    assert whole > clf.max_length and row.truncated and len(row.ids) == clf.max_length
    assert row.ids == clf.tokenizer([huge], truncation=True, max_length=clf.max_length)["input_ids"][0]
    # the tokenizer saw the cut text only, not the megabyte (the cost of a huge text is bounded)
    assert 0 < read.longest <= clf.max_length * CHARS_PER_TOKEN_BOUND < len(huge)


class Reading:
    """A tokenizer that notes the longest text it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, *parts, **options):
        self.longest = max([self.longest, *(len(text) for part in parts for text in part)])
        return self.tokenizer(*parts, **options)


def test_the_body_is_parsed_off_the_event_loop(client, monkeypatch):
    import llmclf.serve.app as app_module

    on_loop: list[bool] = []
    real = app_module.parse_texts

    def recording(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real(*args, **kwargs)

    monkeypatch.setattr(app_module, "parse_texts", recording)
    assert client.post("/classify", json={"texts": ["parsed where?"]}).status_code == 200
    assert on_loop == [False]


def test_nesting_depth_ignores_brackets_in_strings_with_escapes():
    from llmclf.serve.app import MAX_JSON_DEPTH, too_deep

    deep = b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)
    # An escaped backslash ends with the string's closing quote: the brackets after it count.
    assert too_deep(b'{"texts": ["a\\\\"], "x": ' + deep + b"}")
    # An escaped quote does not end the string: the brackets after it are text.
    assert not too_deep(b'{"texts": ["a\\"' + b"[" * 200 + b'"]}')
    assert not too_deep(b'{"texts": ["\\\\\\"' + b"{" * 200 + b'"]}')
    assert too_deep(b'"\\\\"' + deep) and not too_deep(b'"\\\\\\"' + deep + b'"')
    assert not too_deep(b'{"texts": [' + b'"[[[[", ' * 100 + b'"x"]}')


def test_timeouts_and_connection_limit_have_bounded_defaults():
    options = ServeOptions()
    assert options.graceful_timeout_s <= 10 and options.max_connections == 64
    assert 0 < options.header_timeout_s <= 10 and 0 < options.body_timeout_s <= 60
    assert options.api_key is None and options.docs is False


# ---- finding 6: requests a web page could send to localhost ----


def test_a_post_body_must_be_declared_json(client):
    body = b'{"texts": ["sent by a web page"]}'
    for headers in (
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {},
    ):
        response = client.post("/classify", content=body, headers=headers)
        assert response.status_code == 415, (headers, response.text)
        assert response.json()["error"] == "unsupported_media_type"
    ok = client.post("/classify", content=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_the_host_header_must_name_this_server(client, clf):
    for host in ("evil.example", "evil.example:8000", "localhost.evil.example", ""):
        for method, path in (("GET", "/labels"), ("GET", "/health"), ("POST", "/classify")):
            response = client.request(
                method, path, headers={"Host": host, **JSON}, content=b'{"texts": ["a"]}'
            )
            assert response.status_code == 400, (host, path, response.text)
            assert response.json()["error"] == "invalid_host"
    for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "10.1.2.3:8000", "LOCALHOST"):
        assert client.get("/labels", headers={"Host": host}).status_code == 200, host
    options = ServeOptions(**LIMITS, allowed_hosts=("classifier.internal", "*.example.org"))
    app = create_app(clf.labels, ClassifierPredictor(clf, clf.max_length, CPU_OVERHEAD), options)
    with local_client(app) as other:
        for host, status in (("classifier.internal:443", 200), ("a.example.org", 200), ("example.com", 400)):
            assert other.get("/labels", headers={"Host": host}).status_code == status, host


def test_an_api_key_guards_every_endpoint_but_health(clf):
    options = ServeOptions(**LIMITS, api_key=API_KEY, docs=True)
    app = create_app(clf.labels, ClassifierPredictor(clf, clf.max_length, CPU_OVERHEAD), options)
    with local_client(app) as client:
        wait_ready(client)  # /health needs no key
        requests = [("GET", "/labels"), ("GET", "/metrics"), ("POST", "/classify"), ("GET", "/docs")]
        requests += [("GET", "/openapi.json"), ("GET", "/nope")]
        for auth in (None, "Bearer wrong-key-0123456789abcdef", API_KEY, f"Basic {API_KEY}"):
            headers = {**JSON, **({"Authorization": auth} if auth else {})}
            for method, path in requests:
                response = client.request(method, path, headers=headers, content=b'{"texts": ["a"]}')
                assert response.status_code == 401, (auth, path, response.text)
                assert response.json()["error"] == "unauthorized"
                assert response.headers["www-authenticate"] == "Bearer"
        key = {"Authorization": f"Bearer {API_KEY}"}
        assert client.post("/classify", json={"texts": ["with the key"]}, headers=key).status_code == 200
        metrics = client.get("/metrics", headers=key)
        assert metrics.status_code == 200 and API_KEY not in metrics.text
        assert client.get("/docs", headers=key).status_code == 200
    assert API_KEY not in repr(options)


def test_docs_and_schema_are_off_unless_asked_for(client):
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert client.get(path).status_code == 404, path


def test_new_options_are_checked_in_python_and_on_the_command_line(tmp_path, capsys, monkeypatch):
    bad = [
        dict(max_connections=0),
        dict(header_timeout_s=0),
        dict(header_timeout_s=math.nan),
        dict(body_timeout_s=-1),
        dict(graceful_timeout_s=math.inf),
        dict(api_key="short"),
        dict(api_key="a key with spaces in it"),
        dict(allowed_hosts=("http://example.com",)),
        dict(allowed_hosts=("example.com:8000",)),
    ]
    for kwargs in bad:
        with pytest.raises(LlmclfError, match="serve: "):
            ServeOptions(**kwargs)
    with pytest.raises(SystemExit) as exc:
        main(["serve", str(tmp_path), "--max-connections", "0"])
    assert exc.value.code == 2
    for flag, value in (("--header-timeout-s", "0"), ("--body-timeout-s", "nan"), ("--allowed-hosts", "a/b")):
        assert main(["serve", str(tmp_path), flag, value]) == 2
        assert flag in capsys.readouterr().err
    monkeypatch.setenv("LLMCLF_API_KEY", "short")
    assert main(["serve", str(tmp_path)]) == 2
    assert "LLMCLF_API_KEY" in capsys.readouterr().err


# ---- the real server on loopback: idle, slow and surplus connections, bounded shutdown ----


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_loopback_idle_and_slow_connections_are_cut_and_shutdown_is_bounded(trained_run, clf, tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    limits = ["--header-timeout-s", "2", "--body-timeout-s", "2", "--max-connections", "8"]
    process = start_server(trained_run, port, log, *limits, "--graceful-timeout-s", "3")
    try:
        wait_healthy(base, process, log)
        # 20 connections that start a request head and stall, and 5 that send nothing: all closed at
        # the header timeout, the started ones with a JSON 408, though they are more than
        # --max-connections.
        started = time.monotonic()
        half = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        for sock in half:
            sock.sendall(b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        answers = [read_until_closed(sock, 15) for sock in half + silent]
        assert time.monotonic() - started < 10
        for answer in answers[:20]:
            assert answer.startswith(b"HTTP/1.1 408") and b'"header_timeout"' in answer, answer
        assert answers[20:] == [b""] * 5
        texts = demo_texts(2, "after-idle")
        response = httpx.post(f"{base}/classify", json={"texts": texts}, timeout=60)
        assert response.status_code == 200
        assert_matches(clf, texts, response.json()["predictions"])

        # A probe without a Host header (HTTP/1.0) cannot come from a browser: answered.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            assert read_until_closed(sock, 15).startswith(b"HTTP/1.1 200")

        # A body that stops half way: 408 at the body timeout, and the connection is closed.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b'Content-Length: 200\r\n\r\n{"texts": ["a slow'
            )
            answer = read_until_closed(sock, 15)
        assert answer.startswith(b"HTTP/1.1 408") and b'"body_timeout"' in answer, answer

        # More connections than --max-connections: a request on the ninth gets 503 at once.
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        time.sleep(0.3)  # accepted by the server
        assert httpx.get(f"{base}/labels", timeout=10).status_code == 503
        for sock in held:
            sock.close()
        time.sleep(0.3)
        assert httpx.get(f"{base}/labels", timeout=10).status_code == 200

        # SIGTERM with a stalled body and an idle connection open: the server still exits, at once.
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(
            b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 500\r\n\r\n{"texts": ['
        )
        idle = socket.create_connection(("127.0.0.1", port))
        time.sleep(0.3)
        stopping = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0, log.read_text()
        assert time.monotonic() - stopping < 10
        stalled.close()
        idle.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_json_error_bodies_are_json_everywhere(client):
    """Every refusal is `{"error", "message"}` JSON, the new ones included."""
    for response in (
        client.post("/classify", content=b"{}", headers={"Content-Type": "text/plain"}),
        client.get("/labels", headers={"Host": "evil.example"}),
    ):
        assert response.headers["content-type"].startswith("application/json")
        assert set(json.loads(response.text)) == {"error", "message"}
