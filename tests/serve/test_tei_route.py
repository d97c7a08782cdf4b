"""`llmclf serve` answering Hugging Face's text-classification API: POST /predict as
text-embeddings-inference answers it, POST / as the Inference API does, which is what the real
`huggingface_hub.InferenceClient(base_url=...).text_classification` calls. In-process for shapes and
limits, and the real server on loopback against the real client."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from test_serve_app import (
    CPU_OVERHEAD,
    LIMITS,
    demo_texts,
    free_port,
    local_client,
    start_server,
    wait_healthy,
    wait_ready,
)

from conftest import saved_probs
from llmclf.inference.classifier import Classifier
from llmclf.serve.app import ServeOptions, create_app
from llmclf.serve.batcher import ClassifierPredictor

JSON = {"Content-Type": "application/json"}
API_KEY = "tei-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def clf(trained_run) -> Classifier:
    return Classifier.load(trained_run)


@pytest.fixture(scope="module")
def client(clf):
    options = ServeOptions(**LIMITS, max_length=clf.max_length, docs=True)
    app = create_app(clf.labels, ClassifierPredictor(clf, clf.max_length, CPU_OVERHEAD), options)
    with local_client(app) as test_client:
        wait_ready(test_client)
        yield test_client


def ranked(probabilities: dict[str, float], top_k: int | None = None) -> list[tuple[str, float]]:
    return sorted(probabilities.items(), key=lambda kv: -kv[1])[:top_k]


def pairs(scores: list[dict]) -> list[tuple[str, float]]:
    assert all(set(s) == {"label", "score"} for s in scores), scores
    return [(s["label"], s["score"]) for s in scores]


def assert_same(got: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    assert [label for label, _ in got] == [label for label, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)


def test_predict_answers_as_tei_and_root_as_the_inference_api(client, clf):
    texts = demo_texts(3, tag="tei")
    classified = client.post("/classify", json={"texts": texts}).json()["predictions"]
    expected = [ranked(p["probabilities"]) for p in classified]
    assert all(len(e) == len(clf.labels) for e in expected)

    single = client.post("/predict", json={"inputs": texts[0]})
    assert single.status_code == 200, single.text
    assert_same(pairs(single.json()), expected[0])  # one text: a flat list, most probable first
    batch = client.post("/predict", json={"inputs": texts}).json()
    assert len(batch) == 3
    for got, want in zip(batch, expected):
        assert_same(pairs(got), want)
    tei_batch = client.post("/predict", json={"inputs": [[t] for t in texts]}).json()  # TEI's own form
    assert [pairs(g) for g in tei_batch] == [pairs(g) for g in batch]

    root = client.post("/", json={"inputs": texts[0], "parameters": {}})
    assert root.status_code == 200, root.text
    assert len(root.json()) == 1  # a list holding the one text's list
    assert_same(pairs(root.json()[0]), expected[0])
    top = client.post("/", json={"inputs": texts, "parameters": {"top_k": 2}}).json()
    for got, want in zip(top, expected):
        assert_same(pairs(got), want[:2])
    one = client.post("/predict", json={"inputs": texts[1], "parameters": {"top_k": 1}}).json()
    assert_same(pairs(one), expected[1][:1])
    every = client.post("/predict", json={"inputs": texts[2], "parameters": {"top_k": 99}}).json()
    assert_same(pairs(every), expected[2])
    # What TEI clients may send explicitly, at its defaults, is accepted.
    explicit = {"inputs": texts[0], "truncate": True, "truncation_direction": "Right", "raw_scores": False}
    assert_same(pairs(client.post("/predict", json=explicit).json()), expected[0])


def test_a_large_request_is_batched_and_kept_in_order(client, clf):
    texts = demo_texts(LIMITS["max_texts"], tag="tei-split")  # 8 texts, batches of at most 4
    before = client.get("/metrics").json()
    response = client.post("/predict", json={"inputs": texts})
    assert response.status_code == 200
    probs = clf.predict_proba(texts)
    for got, row in zip(response.json(), probs):
        assert_same(pairs(got), ranked(dict(zip(clf.labels, row))))
    after = client.get("/metrics").json()
    assert after["requests"]["ok"] == before["requests"]["ok"] + 1
    assert after["rows"] == before["rows"] + len(texts)
    assert after["batches"]["count"] >= before["batches"]["count"] + 2
    assert after["batches"]["max_size"] <= LIMITS["max_batch_size"]


@pytest.mark.parametrize("path", ["/predict", "/"])
def test_the_limits_of_classify_hold(client, path):
    too_many = client.post(path, json={"inputs": demo_texts(LIMITS["max_texts"] + 1)})
    assert too_many.status_code == 413 and too_many.json()["error"] == "too_many_texts"
    blank = client.post(path, json={"inputs": ["fine", "  ", ""]})
    assert blank.status_code == 400 and blank.json()["index"] == [1, 2]
    surrogate = client.post(path, content=b'{"inputs": ["ok", "\\ud800"]}', headers=JSON)
    assert surrogate.status_code == 400 and surrogate.json()["error"] == "invalid_text"
    empty = client.post(path, json={"inputs": []})
    assert empty.status_code == 400 and "'inputs'" in empty.json()["message"]
    form = client.post(path, content=b'{"inputs": "a"}', headers={"Content-Type": "text/plain"})
    assert form.status_code == 415
    huge = client.post(path, json={"inputs": "x" * LIMITS["max_body_bytes"]})
    assert huge.status_code == 413 and huge.json()["error"] == "body_too_large"
    assert client.post(path, content=b"{not json", headers=JSON).json()["error"] == "invalid_json"
    for body, code in [
        ({"inputs": "a", "unknown": 1}, "invalid_request"),
        ({"inputs": 5}, "invalid_request"),
        ({"inputs": "a", "parameters": {"top_k": 0}}, "invalid_request"),
        ({"inputs": [["a", "b"]]}, "unsupported_input"),  # a sentence pair, in TEI
        ({"inputs": "a", "raw_scores": True}, "unsupported_parameter"),
        ({"inputs": "a", "truncation_direction": "left"}, "unsupported_parameter"),
        ({"inputs": "a", "parameters": {"function_to_apply": "sigmoid"}}, "unsupported_parameter"),
    ]:
        response = client.post(path, json=body)
        assert response.status_code == 422 and response.json()["error"] == code, (body, response.text)
    rejected = client.get("/metrics").json()["requests"]["rejected"]
    assert rejected["too_many_texts"] >= 1 and rejected["unsupported_parameter"] >= 3


def test_truncate_false_refuses_long_texts_and_unset_cuts_them(client, clf):
    long_text = " ".join(demo_texts(6))  # far over the run's 64 tokens
    texts = ["A short one", long_text]
    refused = client.post("/predict", json={"inputs": texts, "truncate": False})
    assert refused.status_code == 413, refused.text
    assert refused.json()["error"] == "text_too_long" and refused.json()["index"] == [1]
    assert f"{clf.max_length} tokens" in refused.json()["message"]
    cut = client.post("/predict", json={"inputs": texts})
    assert cut.status_code == 200
    assert_same(pairs(cut.json()[1]), ranked(dict(zip(clf.labels, clf.predict_proba([long_text])[0]))))
    assert client.post("/predict", json={"inputs": texts[0], "truncate": False}).status_code == 200


def test_the_api_key_guards_the_new_routes(clf):
    options = ServeOptions(**LIMITS, api_key=API_KEY)
    app = create_app(clf.labels, ClassifierPredictor(clf, clf.max_length, CPU_OVERHEAD), options)
    with local_client(app) as guarded:
        wait_ready(guarded)
        for path in ("/predict", "/"):
            assert guarded.post(path, json={"inputs": "a text"}).status_code == 401
            keyed = guarded.post(
                path, json={"inputs": "a text"}, headers={"Authorization": f"Bearer {API_KEY}"}
            )
            assert keyed.status_code == 200


def test_openapi_describes_the_routes(client):
    spec = client.get("/openapi.json").json()
    for path in ("/predict", "/"):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert {"inputs", "truncate", "raw_scores", "parameters"} <= set(body["properties"])
        assert "top_k" in body["properties"]["parameters"]["anyOf"][0]["properties"]  # inlined, no $ref
        assert {"413", "422", "503"} <= set(spec["paths"][path]["post"]["responses"])


def test_the_real_inference_client_on_loopback(trained_run, clf, tmp_path, monkeypatch):
    """`InferenceClient(base_url=...).text_classification` against `llmclf serve` (the real entry point,
    in a subprocess): every label with the run's own probabilities, top_k respected, the API key sent."""
    from huggingface_hub import InferenceClient, constants
    from huggingface_hub.errors import HfHubHTTPError

    # The suite runs with HF_HUB_OFFLINE=1, under which huggingface_hub refuses every request, even to
    # this machine.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    port, log = free_port(), tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    process = start_server(trained_run, port, log, "--api-key", API_KEY)
    try:
        wait_healthy(base, process, log)
        hf = InferenceClient(base_url=base, api_key=API_KEY, timeout=60)
        preds, saved = saved_probs(trained_run)
        for i in range(4):
            text = preds["text"][i]
            expected = ranked(dict(zip(clf.labels, saved[i])))
            out = hf.text_classification(text)
            assert isinstance(out, list) and len(out) == len(clf.labels)
            assert_same([(o.label, o.score) for o in out], expected)
            assert out[0].label == preds["predicted"][i]
            top = hf.text_classification(text, top_k=2)
            assert_same([(o.label, o.score) for o in top], expected[:2])
            # TEI's route on the same server: the same scores, a flat list for one text.
            tei = httpx.post(
                f"{base}/predict",
                json={"inputs": text},
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=60,
            )
            assert_same(pairs(tei.json()), expected)
        with pytest.raises(HfHubHTTPError) as refused:
            InferenceClient(base_url=base, api_key="not-the-key", timeout=60).text_classification("a text")
        assert refused.value.response.status_code == 401
        metrics = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert metrics["requests"]["ok"] >= 12 and metrics["rows"] >= 12
    finally:
        process.terminate()
        process.wait(timeout=60)
