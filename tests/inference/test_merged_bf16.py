"""A bf16 classifier for inference: LoRA folded into the bf16 weights (`merge_lora=True`, the default for
runs whose evaluation after training merged: W + scale * B @ A in fp32, rounded once) or kept apart
(`merge_lora=False`), and the bf16 weights packed for oneDNN on a CPU (`PackedLinear`: the same numbers,
bit for bit).

On the tiny model from conftest.py, its fp32 run loaded in bf16 (`precision="bf16"`, as on a CPU with
native bf16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import read_demo_rows
from llmclf import Classifier


def texts() -> list[str]:
    """The demo texts and as many half-and-half mixes of two of them (less certain predictions)."""
    demo = [r["text"] for r in read_demo_rows()]
    mixes = [
        " ".join(a.split()[: len(a.split()) // 2] + b.split()[len(b.split()) // 2 :])
        for a, b in zip(demo, demo[7:] + demo[:7], strict=True)
    ]
    return demo + mixes


def packing_here() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.fixture(scope="module")
def unmerged(trained_run):
    return Classifier.load(trained_run, precision="bf16", merge_lora=False)


@pytest.fixture(scope="module")
def merged(trained_run):
    return Classifier.load(trained_run, precision="bf16", merge_lora=True)


def test_merged_bf16_predicts_as_the_unmerged_model(trained_run, unmerged, merged):
    """Merging rounds each sum W + dW to bf16 once. Bound: no further from the unmerged bf16 model than
    bf16 itself is from the fp32 model (the difference every bf16 run accepts; here 9e-3 against 6e-3),
    and within the 3e-2 that the precision override is held to (test_classifier.py). The same label
    but for near-ties: a label can only change where the top two are closer than twice that difference
    (here 3 of 960 texts, all within 2e-3, one an exact tie; fp32 against bf16 changes 1)."""
    batch = texts()
    reference = unmerged.model_proba(batch)
    probs = merged.model_proba(batch)
    fp32 = Classifier.load(trained_run).model_proba(batch)
    diff = np.abs(probs - reference).max()
    assert 0 < diff <= max(np.abs(reference - fp32).max(), 1e-3) and diff < 3e-2
    top_two = np.sort(reference, axis=1)[:, -2:]
    changed = probs.argmax(axis=1) != reference.argmax(axis=1)
    assert changed.mean() <= 0.01 and (top_two[changed, 1] - top_two[changed, 0] <= 2 * diff).all()


def test_merged_model_has_no_lora_modules(merged):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    assert not isinstance(merged.model, PeftModel)
    assert not any(isinstance(m, LoraLayer) for m in merged.model.modules())
    assert not any("lora_" in name for name, _ in merged.model.named_parameters())
    head = merged.model.score
    assert type(head) is nn.Linear and head.weight.dtype == torch.float32  # the trained head, in fp32


def test_merge_is_computed_in_fp32_and_rounded_once(trained_run):
    """`merged_model` (the export) and `merge_lora=True` fold W + scale * B @ A in fp32, then round to bf16:
    not bf16(W) + bf16(dW), which loses more of the small update."""
    from peft.tuners.lora import Linear as LoraLinear

    from llmclf.model.loading import PackedLinear

    clf = Classifier.load(trained_run, precision="bf16", merge_lora=False)
    expected = {}
    for name, module in clf.model.named_modules():
        if isinstance(module, LoraLinear):
            base = module.get_base_layer()
            weight = base.weight.to_dense() if isinstance(base, PackedLinear) else base.weight
            delta = sum(module.get_delta_weight(a).float() for a in module.active_adapters)
            expected[name.removeprefix("base_model.model.")] = (weight.float() + delta).to(torch.bfloat16)
    assert expected
    merged = clf.merged_model()
    assert not any(isinstance(m, PackedLinear) for m in merged.modules())  # plain layers for the export
    for name, weight in expected.items():
        got = merged.get_submodule(name).weight
        assert got.dtype == torch.bfloat16 and torch.equal(got, weight), name


@pytest.mark.skipif(not packing_here(), reason="oneDNN without bf16 on this CPU: nothing is packed")
def test_packed_bf16_weights_give_bit_identical_probabilities(unmerged, merged):
    from llmclf.model.loading import PackedLinear, pack_linears, unpack_linears

    batch = texts()[:64]
    for clf in (unmerged, merged):
        packed = [m for m in clf.model.modules() if isinstance(m, PackedLinear)]
        assert packed and all(m.weight.is_mkldnn for m in packed)
        assert not any(type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 for m in clf.model.modules())
    # The unmerged model keeps its LoRA layers, without their eval-time dropout modules.
    assert not any(isinstance(m, nn.Dropout) for m in unmerged.model.modules())
    before = unmerged.model_proba(batch, batch_size=8)
    single = np.vstack([unmerged.model_proba([t]) for t in batch[:8]])
    assert unpack_linears(unmerged.model) > 0
    try:
        assert np.array_equal(unmerged.model_proba(batch, batch_size=8), before)
        assert np.array_equal(np.vstack([unmerged.model_proba([t]) for t in batch[:8]]), single)
    finally:
        pack_linears(unmerged.model)


def test_merge_is_decided_once_and_recorded(trained_run):
    """Plain weights held whole are merged; a 4-bit or a sharded base is not. The run records what its
    evaluation after training did, and a reload follows the record; runs from before the record merge
    in fp32 only (where merging kept their probabilities)."""
    import json

    from llmclf.inference.classifier import merge_default
    from llmclf.model.adapter import merged_at_inference

    assert merged_at_inference(quantized=False, sharded=False)
    assert not merged_at_inference(quantized=True, sharded=False)
    assert not merged_at_inference(quantized=False, sharded=True)
    assert json.loads((trained_run / "run_info.json").read_text())["lora_merged"] is True
    assert merge_default({"lora_merged": True}, "bf16", quantized=False)
    assert not merge_default({"lora_merged": False}, "fp32", quantized=False)
    assert not merge_default({"lora_merged": True}, "bf16", quantized=True)
    assert merge_default({}, "fp32", quantized=False) and not merge_default({}, "bf16", quantized=False)
