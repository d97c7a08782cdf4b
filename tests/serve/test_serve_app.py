"""`llmclf serve`: endpoints and limits in-process (ASGI), the batcher alone, and the real server on
loopback under concurrent load and SIGTERM, all on the tiny model's trained run."""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

import llmclf
from conftest import read_demo_rows
from llmclf.batches import NEVER_SPLIT, padding_groups
from llmclf.cli import main
from llmclf.errors import LlmclfError
from llmclf.inference.classifier import Classifier
from llmclf.serve import batcher as batching
from llmclf.serve.app import ServeOptions, create_app
from llmclf.serve.batcher import (
    ClassifierPredictor,
    DynamicBatcher,
    QueueFull,
    measure_pass_overhead,
)

CPU_OVERHEAD = 80.0  # tokens' worth, as measured for SmolLM2-135M on 2 CPU cores
LIMITS = dict(max_texts=8, max_body_bytes=4096, max_batch_size=4, max_wait_ms=5, max_queue=16)


@pytest.fixture(scope="module")
def clf(trained_run) -> Classifier:
    return Classifier.load(trained_run)


def local_client(app) -> TestClient:
    """A TestClient that names 127.0.0.1 in its Host header: the server refuses unknown host names
    (DNS rebinding), and TestClient's own is `testserver`."""
    return TestClient(app, base_url="http://127.0.0.1")


def wait_ready(client: TestClient) -> None:
    for _ in range(500):
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"never ready: {client.get('/health').json()}")


@pytest.fixture(scope="module")
def client(clf):
    options = ServeOptions(**LIMITS, max_length=clf.max_length, docs=True)
    app = create_app(clf.labels, ClassifierPredictor(clf, clf.max_length, CPU_OVERHEAD), options)
    with local_client(app) as test_client:
        wait_ready(test_client)
        yield test_client


def demo_texts(n: int, tag: str = "") -> list[str]:
    rows = read_demo_rows()
    return [f"{rows[i % len(rows)]['text']} {tag}{i}" for i in range(n)]


def assert_matches(clf: Classifier, texts: list[str], predictions: list[dict]) -> None:
    """The response holds exactly these texts' rows, in order, as Classifier.predict_proba gives them."""
    assert len(predictions) == len(texts)
    expected = clf.predict_proba(texts)
    got = np.array([[p["probabilities"][label] for label in clf.labels] for p in predictions])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [p["label"] for p in predictions] == [clf.labels[i] for i in expected.argmax(axis=1)]


def test_health_is_503_until_the_warm_up_pass_has_answered(clf):
    app = create_app(
        clf.labels, ClassifierPredictor(clf, clf.max_length, CPU_OVERHEAD), ServeOptions(**LIMITS)
    )
    cold = local_client(app)  # no lifespan: batcher not started, no warm-up pass
    response = cold.get("/health")
    assert response.status_code == 503 and response.json()["status"] == "starting"
    with local_client(app) as warm:
        wait_ready(warm)
        metrics = warm.get("/metrics").json()
        assert metrics["ready"] is True and metrics["batches"]["count"] >= 1  # the warm-up pass ran


def test_health_stays_503_when_the_warm_up_pass_fails(clf):
    def broken(texts):
        raise RuntimeError("no model here")

    with local_client(create_app(clf.labels, broken, ServeOptions(**LIMITS))) as client:
        for _ in range(200):
            body = client.get("/health").json()
            if body["status"] != "starting":
                break
            time.sleep(0.02)
        # /health is open to anyone: it names the failure, the server log holds its text.
        assert body["status"] == "failed" and "server log" in body["error"]
        assert "no model here" not in body["error"]
        assert client.get("/health").status_code == 503
        response = client.post("/classify", json={"texts": ["a text"]})
        assert response.status_code == 500 and "Internal error" in response.json()["message"]
        assert "no model here" not in response.json()["message"]


def test_classify_matches_the_classifier_and_flags_truncation(client, clf):
    long_text = " ".join(demo_texts(6))  # far over the run's 64 tokens
    texts = ["Stocks rallied after the rate cut", long_text, "The team won the final"]
    response = client.post("/classify", json={"texts": texts})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert_matches(clf, texts, predictions)
    assert [p["truncated"] for p in predictions] == [False, True, False]
    for p in predictions:
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    assert client.get("/metrics").json()["truncated_rows"] >= 1


def test_a_request_larger_than_a_batch_is_split_and_kept_in_order(client, clf):
    texts = demo_texts(LIMITS["max_texts"], tag="split")  # 8 texts, batches of at most 4
    response = client.post("/classify", json={"texts": texts})
    assert response.status_code == 200
    assert_matches(clf, texts, response.json()["predictions"])
    assert client.get("/metrics").json()["batches"]["max_size"] <= LIMITS["max_batch_size"]


def test_labels_openapi_and_docs(client, clf):
    assert client.get("/labels").json() == {"labels": clf.labels}
    spec = client.get("/openapi.json").json()
    schema = spec["paths"]["/classify"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    for name in ("texts", "pairs"):  # one or the other: a list of texts, or of [first, second] pairs
        assert {"array", "null"} == {kind["type"] for kind in schema["properties"][name]["anyOf"]}
    assert {"400", "413", "422", "503"} <= set(spec["paths"]["/classify"]["post"]["responses"])
    assert {"/labels", "/health", "/metrics"} <= set(spec["paths"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def chunked(body: bytes):
    """A body sent with Transfer-Encoding: chunked, so no Content-Length announces its size."""
    for start in range(0, len(body), 512):
        yield body[start : start + 512]


JSON = {"Content-Type": "application/json"}
MALFORMED = [
    ("not json", dict(content=b"{texts: [oops", headers=JSON), 400, "invalid_json", "not valid JSON"),
    (
        "bad utf-8",
        dict(content=b'{"texts": ["\xff\xfe"]}', headers=JSON),
        400,
        "invalid_json",
        "not valid JSON",
    ),
    (
        "deep nesting",
        dict(content=b"[" * 2000 + b"]" * 2000, headers=JSON),
        400,
        "invalid_json",
        "not valid JSON",
    ),
    ("json list", dict(json=["a text"]), 422, "invalid_request", "valid dictionary"),
    ("no texts", dict(json={}), 422, "invalid_request", "takes single texts in 'texts'"),
    ("pairs", dict(json={"pairs": [["a", "b"]]}), 422, "invalid_request", "takes single texts in 'texts'"),
    ("texts a string", dict(json={"texts": "a text"}), 422, "invalid_request", "valid list"),
    ("number in texts", dict(json={"texts": ["a", 3]}), 422, "invalid_request", "texts.1"),
    ("null in texts", dict(json={"texts": [None]}), 422, "invalid_request", "texts.0"),
    ("extra field", dict(json={"texts": ["a"], "tex": 1}), 422, "invalid_request", "tex: Extra inputs"),
    ("empty list", dict(json={"texts": []}), 400, "empty_texts", "empty list"),
    ("empty text", dict(json={"texts": ["ok", ""]}), 400, "empty_text", "index [1]"),
    ("blank text", dict(json={"texts": [" \n\t", "ok", "  "]}), 400, "empty_text", "index [0, 2]"),
    ("too many texts", dict(json={"texts": ["a"] * 9}), 413, "too_many_texts", "at most 8"),
    ("content-length", dict(json={"texts": ["x" * 5000]}), 413, "body_too_large", "at most 4096"),
    (
        "chunked",
        dict(content=chunked(b'{"texts": ["' + b"x" * 6000 + b'"]}'), headers=JSON),
        413,
        "body_too_large",
        "more than",
    ),
]


@pytest.mark.parametrize(
    ("case", "request_args", "status", "code", "message"), MALFORMED, ids=[m[0] for m in MALFORMED]
)
def test_malformed_requests_get_their_status_and_the_server_keeps_answering(
    client, clf, case, request_args, status, code, message
):
    response = client.post("/classify", **request_args)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and message in body["message"], body
    if code == "empty_text":
        assert body["index"] == [int(i) for i in message.split("[")[1].rstrip("]").split(",")]
    ok = client.post("/classify", json={"texts": ["still answering"]})
    assert ok.status_code == 200
    assert_matches(clf, ["still answering"], ok.json()["predictions"])


def test_unknown_path_and_method_answer_json(client):
    assert client.get("/nope").json()["error"] == "not_found"
    response = client.get("/classify")
    assert response.status_code == 405 and response.json()["error"] == "method_not_allowed"


def test_metrics_count_requests_rows_and_rejections(client):
    before = client.get("/metrics").json()
    client.post("/classify", json={"texts": ["one", "two"]})
    client.post("/classify", json={"texts": []})
    after = client.get("/metrics").json()
    assert after["requests"]["ok"] == before["requests"]["ok"] + 1
    assert after["rows"] == before["rows"] + 2
    rejected = after["requests"]["rejected"]
    assert rejected["empty_texts"] == before["requests"]["rejected"].get("empty_texts", 0) + 1
    assert after["latency_ms"]["p50"] is not None and after["latency_ms"]["p99"] >= after["latency_ms"]["p50"]


def test_a_full_queue_answers_503_at_once_with_retry_after(clf):
    entered, release = threading.Event(), threading.Event()
    real = ClassifierPredictor(clf, clf.max_length, CPU_OVERHEAD)

    def held(texts):
        entered.set()
        release.wait(30)
        return real(texts)

    options = ServeOptions(max_texts=4, max_queue=4, max_batch_size=1, max_wait_ms=0)
    with local_client(create_app(clf.labels, held, options)) as client:
        release.set()  # let the warm-up pass through, then hold the next pass
        wait_ready(client)
        release.clear()
        entered.clear()
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/classify", json={"texts": ["held in the pass"]})
            assert entered.wait(30)
            queued = pool.submit(client.post, "/classify", json={"texts": demo_texts(4, "q")})
            for _ in range(500):
                if client.get("/metrics").json()["queued_rows"] == 4:
                    break
                time.sleep(0.02)
            rejected = client.post("/classify", json={"texts": ["one more"]})
            assert rejected.status_code == 503 and rejected.json()["error"] == "queue_full"
            assert rejected.headers["retry-after"] == "1"
            release.set()
            assert first.result().status_code == 200
            assert_matches(clf, demo_texts(4, "q"), queued.result().json()["predictions"])
        assert client.post("/classify", json={"texts": ["after"]}).status_code == 200


def test_batcher_merges_requests_and_gives_each_caller_its_own_rows():
    seen: list[int] = []

    def echo(texts):
        seen.append(len(texts))
        time.sleep(0.01)  # a pass takes a while, so rows of other requests pile up meanwhile
        return np.array([[float(t.split("-")[0]), float(t.split("-")[1])] for t in texts]), [False] * len(
            texts
        )

    async def scenario():
        batcher = DynamicBatcher(echo, max_batch_size=8, max_wait_s=0.005, max_queue=1000)
        batcher.start()
        sizes = [1, 3, 12, 2, 5, 1, 7, 4] * 4
        results = await asyncio.gather(
            *(batcher.submit([f"{r}-{i}" for i in range(n)]) for r, n in enumerate(sizes))
        )
        batcher.stop()
        return sizes, results, batcher.metrics.snapshot()

    sizes, results, metrics = asyncio.run(scenario())
    for r, (n, (probs, truncated)) in enumerate(zip(sizes, results)):
        assert probs.tolist() == [[float(r), float(i)] for i in range(n)] and truncated == [False] * n
    assert sum(seen) == sum(sizes) and max(seen) == 8  # merged up to, never over, the batch size
    assert metrics["batches"]["merged"] >= 1


def recorder(passes: list[list[str]]):
    """A predictor that notes each pass's texts and answers 1/2, 1/2 for every row."""

    def record(texts):
        passes.append(list(texts))
        return np.ones((len(texts), 2)) / 2, [False] * len(texts)

    return record


def test_rows_queued_during_a_pass_wait_for_the_callers_it_answers():
    """Closed-loop clients must not split into cohorts: a row that waited out a pass still waits up
    to max_wait after the pass for the callers that pass answered, who send again at once."""
    gate, entered = threading.Event(), threading.Event()
    passes: list[list[str]] = []

    def held(texts):
        passes.append(list(texts))
        entered.set()
        gate.wait(10)  # only the first pass is held: the gate stays open afterwards
        return np.ones((len(texts), 2)) / 2, [False] * len(texts)

    async def scenario():
        # max_wait is long next to an event-loop hop, so the test does not hang on timing; the
        # old rule (counted from arrival alone) runs "b" alone the moment the first pass ends.
        batcher = DynamicBatcher(held, max_batch_size=8, max_wait_s=1.0, max_queue=100)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(["a"]))
        while not entered.is_set():
            await asyncio.sleep(0.005)
        waiting = asyncio.ensure_future(batcher.submit(["b"]))  # arrives during the pass...
        await asyncio.sleep(1.2)  # ...and is older than max_wait by the time the pass ends
        gate.set()
        await first
        await asyncio.sleep(0.1)  # the answer's way back to its client, and the next request's way in
        again = await batcher.submit(["a2"])  # the answered caller sends its next request
        await waiting
        batcher.stop()
        return again

    probs, _ = asyncio.run(scenario())
    assert probs.shape == (1, 2)
    assert passes == [["a"], ["b", "a2"]]


def test_a_lone_caller_never_waits_for_company():
    """One client sending request after request: nobody else is coming, so no pass waits max_wait
    (a minute here) for more rows. The old rule (wait from each arrival) would take 3 minutes."""
    passes: list[list[str]] = []
    record = recorder(passes)

    async def scenario():
        batcher = DynamicBatcher(record, max_batch_size=8, max_wait_s=60.0, max_queue=100)
        batcher.start()
        for text in ("one", "two", "three"):
            await asyncio.wait_for(batcher.submit([text]), timeout=20)
        empty = await batcher.submit([])
        batcher.stop()
        return empty

    assert asyncio.run(scenario())[1] == []
    assert passes == [["one"], ["two"], ["three"]]


def test_after_a_quiet_spell_a_request_does_not_wait_for_earlier_callers():
    """A pass answered two callers; nothing came within max_wait of it. The next request runs at once
    instead of waiting for the second caller of long ago (which would merge it with a later request)."""
    passes: list[list[str]] = []
    record = recorder(passes)

    async def scenario():
        batcher = DynamicBatcher(record, max_batch_size=8, max_wait_s=1.0, max_queue=100)
        batcher.start()
        await asyncio.gather(batcher.submit(["a"]), batcher.submit(["b"]))
        await asyncio.sleep(1.5)  # a quiet spell, longer than max_wait
        first = asyncio.ensure_future(batcher.submit(["x"]))
        await asyncio.sleep(0.5)  # well inside max_wait: would have joined "x" had "x" waited
        await asyncio.gather(first, batcher.submit(["y"]))
        batcher.stop()

    asyncio.run(scenario())
    assert passes[-2:] == [["x"], ["y"]]


def test_batcher_refuses_past_max_queue_and_drains_on_stop():
    gate, entered = threading.Event(), threading.Event()

    def slow(texts):
        entered.set()
        gate.wait(10)
        return np.ones((len(texts), 2)) / 2, [False] * len(texts)

    async def scenario():
        batcher = DynamicBatcher(slow, max_batch_size=2, max_wait_s=0, max_queue=3)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(["a", "b"]))
        while not entered.is_set():  # the worker took the first two rows and is held in the pass
            await asyncio.sleep(0.005)
        waiting = asyncio.ensure_future(batcher.submit(["c", "d", "e"]))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await batcher.submit(["f"])
        gate.set()
        stopper = asyncio.get_running_loop().run_in_executor(None, batcher.stop)
        done = await asyncio.gather(first, waiting)
        await stopper
        return [probs.shape for probs, _ in done]

    assert asyncio.run(scenario()) == [(2, 2), (3, 2)]


def partitions(items: list[int]):
    """Every way to split `items` into non-empty groups (Bell(n) of them)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for split in partitions(rest):
        yield [[first], *split]
        for k in range(len(split)):
            yield [*split[:k], [first, *split[k]], *split[k + 1 :]]


def pass_cost(groups: list[list[int]], lengths: list[int], overhead: float) -> float:
    return sum(overhead + len(g) * max(lengths[i] for i in g) for g in groups)


def test_padding_groups_are_the_cheapest_split_and_keep_every_row_once():
    lengths = [40, 42, 180, 41, 12, 39, 60, 11]
    groups = padding_groups(lengths, CPU_OVERHEAD)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [2] in groups  # the long outlier runs alone instead of padding seven rows to 180 tokens
    for group in groups:  # longest first within a pass
        assert [lengths[i] for i in group] == sorted((lengths[i] for i in group), reverse=True)
    longest_first = sorted(range(8), key=lambda i: -lengths[i])
    assert padding_groups(lengths, NEVER_SPLIT) == [longest_first]  # a GPU: one pass
    assert padding_groups(lengths, 1e4) == [longest_first]  # a pass dearer than any padding
    no_overhead = padding_groups(lengths, 0.0)  # only equal lengths share a pass: no padding at all
    assert all(len({lengths[i] for i in g}) == 1 for g in no_overhead) and len(no_overhead) == 8
    assert padding_groups([], CPU_OVERHEAD) == [] and padding_groups([7], 0.0) == [[0]]
    # Optimal, against every possible split (not only contiguous runs of the sorted rows).
    rng = np.random.default_rng(0)
    for _ in range(30):
        lengths = [int(x) for x in rng.integers(5, 200, size=int(rng.integers(2, 8)))]
        overhead = float(rng.choice([0.0, 20.0, 80.0, 300.0]))
        best = min(pass_cost(p, lengths, overhead) for p in partitions(list(range(len(lengths)))))
        assert pass_cost(padding_groups(lengths, overhead), lengths, overhead) == pytest.approx(best)


def test_pass_overhead_is_fitted_from_two_timed_pass_shapes(monkeypatch, clf):
    """cost = a + b x tokens, timed: returns a / b; a pass that costs the same at 16 and 512 tokens
    (a GPU) never splits. A fake clock stands in for the machine, so the numbers are exact."""
    now = [0.0]
    for a, b, expected in ((0.069, 0.00086, 0.069 / 0.00086), (0.010, 0.0, NEVER_SPLIT)):

        def timed_pass(model, tokenizer, *, input_ids, batch_size, progress, a=a, b=b):
            assert batch_size == len(input_ids) and progress is False
            assert tokenizer.pad_token_id not in input_ids[0]  # the pooling would skip pad tokens
            now[0] += a + b * sum(len(row) for row in input_ids)
            return np.zeros((len(input_ids), 2))

        monkeypatch.setattr("llmclf.serve.batcher.predict_proba", timed_pass)
        monkeypatch.setattr(batching.time, "perf_counter", lambda: now[0])
        assert measure_pass_overhead(clf) == pytest.approx(expected)
        monkeypatch.undo()
    assert 0 <= measure_pass_overhead(clf) <= NEVER_SPLIT  # the real tiny model: a number, no error


def test_auto_pass_overhead_is_timed_in_the_worker_thread_and_reported(monkeypatch, clf):
    """Timed from another thread, the model ran 20% slower afterwards in the worker: so `auto` is
    timed by the warm-up, on the batcher's thread, and /metrics shows the value once ready."""
    threads = []

    def fake_measure(classifier):
        threads.append(threading.current_thread().name)
        return 42.0

    monkeypatch.setattr(batching, "measure_pass_overhead", fake_measure)
    predictor = ClassifierPredictor(clf, clf.max_length)  # auto by default
    assert predictor.pass_overhead_tokens is None
    options = ServeOptions(**LIMITS, max_length=clf.max_length)
    assert options.pass_overhead_tokens == "auto"
    with local_client(create_app(clf.labels, predictor, options)) as test_client:
        wait_ready(test_client)
        assert test_client.get("/metrics").json()["limits"]["pass_overhead_tokens"] == 42.0
        assert_matches(
            clf,
            demo_texts(3, "auto"),
            test_client.post("/classify", json={"texts": demo_texts(3, "auto")}).json()["predictions"],
        )
    assert threads == ["llmclf-batcher"]  # once, on the worker


def test_serve_options_are_validated():
    with pytest.raises(LlmclfError, match="--max-queue"):
        ServeOptions(max_texts=10, max_queue=5)
    with pytest.raises(LlmclfError, match="--max-wait-ms"):
        ServeOptions(max_wait_ms=-1)
    for bad in (-1.0, math.inf, math.nan, "fast"):
        with pytest.raises(LlmclfError, match="--pass-overhead-tokens"):
            ServeOptions(pass_overhead_tokens=bad)


def test_serve_cli_refuses_bad_limits_and_missing_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", str(tmp_path), "--max-texts", "0"])
    assert exc.value.code == 2
    assert main(["serve", str(tmp_path), "--max-texts", "100", "--max-queue", "10"]) == 2
    assert "--max-queue" in capsys.readouterr().err
    assert main(["--quiet", "serve", str(tmp_path / "absent")]) == 2
    for bad in ("-5", "inf", "nan", "fast"):
        with pytest.raises(SystemExit) as exc:
            main(["serve", str(tmp_path), "--pass-overhead-tokens", bad])
        assert exc.value.code == 2 and "--pass-overhead-tokens" in capsys.readouterr().err


# ---- the real server on loopback ----


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(run: Path, port: int, log: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    src = str(Path(llmclf.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "llmclf", "--quiet", "serve", str(run), "--port", str(port), *extra]
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_healthy(base: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited {process.returncode}:\n{log.read_text()}"
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server not healthy in {timeout}s:\n{log.read_text()}")


def test_loopback_load_is_correct_batched_and_sigterm_drains(trained_run, clf, tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    process = start_server(trained_run, port, log, "--max-batch-size", "16", "--max-wait-ms", "20")
    try:
        wait_healthy(base, process, log)

        # 16 clients x 6 requests of 1-5 unique texts each, all at once.
        def client_session(worker: int) -> list[tuple[list[str], httpx.Response]]:
            out = []
            with httpx.Client(base_url=base, timeout=60) as session:
                for k in range(6):
                    texts = demo_texts(1 + (worker + k) % 5, tag=f"w{worker}r{k}-")
                    out.append((texts, session.post("/classify", json={"texts": texts})))
            return out

        with ThreadPoolExecutor(16) as pool:
            sessions = list(pool.map(client_session, range(16)))
        results = [pair for session in sessions for pair in session]
        assert len(results) == 96 and all(r.status_code == 200 for _, r in results)
        all_texts = [t for texts, _ in results for t in texts]
        assert len(set(all_texts)) == len(all_texts)
        expected = dict(zip(all_texts, clf.predict_proba(all_texts)))
        for texts, response in results:
            predictions = response.json()["predictions"]
            assert len(predictions) == len(texts)
            got = np.array([[p["probabilities"][label] for label in clf.labels] for p in predictions])
            np.testing.assert_allclose(got, np.array([expected[t] for t in texts]), atol=1e-5)
        metrics = httpx.get(f"{base}/metrics").json()
        assert metrics["requests"]["ok"] == 96 and metrics["rows"] == len(all_texts)
        assert metrics["batches"]["merged"] >= 1 and metrics["batches"]["max_size"] > 1
        assert metrics["batches"]["max_size"] <= 16
        # `auto` was timed at start on this machine: a number of tokens, reported with the limits.
        assert 0 <= metrics["limits"]["pass_overhead_tokens"] <= NEVER_SPLIT

        # SIGTERM while requests are in flight: each has sent its headers and half of its body, so the
        # server is inside the handler; the rest is sent after the signal. All must be answered in full.
        bodies = [json.dumps({"texts": demo_texts(3, tag=f"term{i}-")}).encode() for i in range(4)]
        connections = []
        for body in bodies:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.putrequest("POST", "/classify")
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body[: len(body) // 2])
            connections.append(conn)
        for _ in range(500):
            if httpx.get(f"{base}/metrics").json()["in_flight"] == len(bodies):
                break
            time.sleep(0.02)
        else:
            raise AssertionError("requests never reached the handler")
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the server is shutting down now, with the requests still open
        assert process.poll() is None
        for conn, body in zip(connections, bodies):
            conn.send(body[len(body) // 2 :])
        for i, conn in enumerate(connections):
            response = conn.getresponse()
            assert response.status == 200
            texts = demo_texts(3, tag=f"term{i}-")
            assert_matches(clf, texts, json.loads(response.read())["predictions"])
            conn.close()
        assert process.wait(timeout=60) == 0, log.read_text()
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.get(f"{base}/health", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_nesting_depth_is_counted_outside_strings_only():
    from llmclf.serve.app import MAX_JSON_DEPTH, too_deep

    assert not too_deep(b'{"texts": ["' + b"[" * 500 + b'"]}')  # brackets inside a text are text
    assert not too_deep(b'{"texts": ["a \\" [[[' + b"{" * 300 + b'"]}')  # an escaped quote stays inside
    assert not too_deep(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)
    assert too_deep(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))
    assert too_deep(b'{"a": ' * 70 + b"1" + b"}" * 70)


def test_the_server_loads_the_model_in_a_thread_that_ends_before_serving(monkeypatch, tmp_path):
    """The batcher thread must be the only one whose OpenMP team computes: the load runs in a thread of
    its own, which is gone before the server starts, and its errors reach the caller as they are."""
    from llmclf.serve import app as serve_app

    class Loaded(Exception):
        pass

    seen: list[tuple[bool, str]] = []

    def load(path, **kwargs):
        thread = threading.current_thread()
        seen.append((thread is threading.main_thread(), thread.name))
        raise Loaded(path)

    monkeypatch.setattr(Classifier, "load", load)
    with pytest.raises(Loaded):
        serve_app.run_server(str(tmp_path), serve_app.ServeOptions(), quiet=True)
    assert len(seen) == 1 and seen[0][0] is False and seen[0][1].startswith("llmclf-load")
    assert not [t for t in threading.enumerate() if t.name.startswith("llmclf-load")]  # ended with the load
