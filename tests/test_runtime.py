"""The GPU path's settings: `auto` resolution of quantisation, precision and attention kernel (with the
machine faked through monkeypatch), their config/flag plumbing, and gradient checkpointing on CPU."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import on_device, train_tiny
from llmclf import runtime as hardware
from llmclf.cli.parser import build_parser, train_overrides
from llmclf.config import build_config
from llmclf.errors import LlmclfError
from llmclf.model import loading as modeling
from llmclf.training.trainer import training_arguments

LABELS = ["a", "b", "c"]


def fake_machine(
    monkeypatch,
    *,
    cuda: bool,
    bf16: bool = True,
    installed: tuple[str, ...] = (),
    cpu_bf16: bool = False,
    bf16_speedup: float = 1.5,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(hardware, "cpu_bf16", lambda: cpu_bf16)
    # the timed matmuls: fp32 takes `bf16_speedup` times as long as bf16 (no cache file involved)
    seconds = {"fp32": 0.003 * bf16_speedup, "bf16": 0.003}
    choice = "bf16" if bf16_speedup >= hardware.BF16_MIN_SPEEDUP else "fp32"
    monkeypatch.setattr(hardware, "cpu_precision_evidence", lambda: {"seconds": seconds, "choice": choice})
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in ("flash_attn", "bitsandbytes"):
            return object() if name in installed else None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize(
    ("cuda", "bf16", "cpu_bf16", "speedup", "expected"),
    [
        (False, False, False, 1.5, "fp32"),  # a CPU without native bf16: emulated bf16 is slower than fp32
        (False, False, True, 1.5, "bf16"),  # native bf16 that is faster here
        (False, False, True, 0.64, "fp32"),  # native bf16 that is slower here (an Intel Xeon measured 166 vs 261)
        (True, True, False, 1.5, "bf16"),
        (True, False, True, 1.5, "fp16"),
    ],
)
def test_precision_auto(monkeypatch, cuda, bf16, cpu_bf16, speedup, expected):
    fake_machine(monkeypatch, cuda=cuda, bf16=bf16, cpu_bf16=cpu_bf16, bf16_speedup=speedup)
    assert hardware.resolve_precision("auto") == expected


def test_the_cpu_precision_is_timed_once_per_machine_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMCLF_CACHE", str(tmp_path))
    timed = []

    def fake_time(**kwargs):
        timed.append(1)
        return {"fp32": 0.004, "bf16": 0.006}  # bf16 slower: fp32 chosen

    monkeypatch.setattr(hardware, "time_matmul", fake_time)
    first = hardware.cpu_precision_evidence()
    assert first["choice"] == "fp32" and first["seconds"] == {"fp32": 0.004, "bf16": 0.006} and len(timed) == 1
    assert hardware.cpu_precision_evidence() == first and len(timed) == 1  # read from the cache
    cached = tmp_path / hardware.PRECISION_FILE
    for damage in ("{not json", '{"key": 1}', '{"key": {"cpu": "another"}, "choice": "bf16"}'):
        cached.write_text(damage)
        assert hardware.cpu_precision_evidence()["choice"] == "fp32"  # timed again, never trusted
    assert len(timed) == 4
    monkeypatch.setattr(hardware, "cpu_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.precision_evidence("auto")["seconds"] == {"fp32": 0.004, "bf16": 0.006}
    assert hardware.precision_evidence("fp32") is None  # an explicit choice times nothing


def test_the_real_timing_compares_both_precisions():
    seconds = hardware.time_matmul(repeats=1, inner=1)
    assert set(seconds) == {"fp32", "bf16"} and all(0 < s < 10 for s in seconds.values())


def test_cpu_bf16_reads_the_cpu_flags(monkeypatch, tmp_path):
    import builtins

    real_open = builtins.open
    for flags, expected in (
        ("fpu avx512f avx512bw", False),
        ("fpu avx512f avx512_bf16", True),
        ("amx_bf16", True),
    ):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor : 0\nflags : {flags}\n")
        monkeypatch.setattr(
            builtins,
            "open",
            lambda f, *a, _path=cpuinfo, **k: real_open(_path if f == "/proc/cpuinfo" else f, *a, **k),
        )
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
        hardware.cpu_bf16.cache_clear()
        assert hardware.cpu_bf16() is expected, flags
    hardware.cpu_bf16.cache_clear()


def test_precision_explicit_choices_are_checked(monkeypatch):
    fake_machine(monkeypatch, cuda=False)
    assert hardware.resolve_precision("fp32") == "fp32"
    assert hardware.resolve_precision("bf16") == "bf16"  # runs on CPU, slowly
    with pytest.raises(LlmclfError, match="fp16 needs a CUDA GPU"):
        hardware.resolve_precision("fp16")
    fake_machine(monkeypatch, cuda=True, bf16=False)
    with pytest.raises(LlmclfError, match="no bf16 support"):
        hardware.resolve_precision("bf16")
    assert hardware.resolve_precision("fp16") == "fp16"


@pytest.mark.parametrize(
    ("cuda", "installed", "precision", "expected"),
    [
        (False, ("flash_attn",), "fp32", "sdpa"),
        (True, ("flash_attn",), "bf16", "flash_attention_2"),
        (True, ("flash_attn",), "fp16", "flash_attention_2"),
        (True, ("flash_attn",), "fp32", "sdpa"),  # FlashAttention runs in half precision only
        (True, (), "bf16", "sdpa"),
    ],
)
def test_attention_auto(monkeypatch, cuda, installed, precision, expected):
    fake_machine(monkeypatch, cuda=cuda, installed=installed)
    assert hardware.resolve_attn_implementation("auto", precision) == expected


def test_attention_explicit_flash_says_what_is_missing(monkeypatch):
    fake_machine(monkeypatch, cuda=True)
    with pytest.raises(LlmclfError, match="pip install flash-attn"):
        hardware.resolve_attn_implementation("flash_attention_2", "bf16")
    fake_machine(monkeypatch, cuda=False, installed=("flash_attn",))
    with pytest.raises(LlmclfError, match="needs a CUDA GPU"):
        hardware.resolve_attn_implementation("flash_attention_2", "bf16")
    assert hardware.resolve_attn_implementation("eager", "fp32") == "eager"


@pytest.mark.parametrize(
    ("cuda", "installed", "expected"),
    [(True, ("bitsandbytes",), True), (True, (), False), (False, ("bitsandbytes",), False)],
)
def test_quantize_auto_is_4bit_on_cuda_with_bitsandbytes(monkeypatch, cuda, installed, expected):
    fake_machine(monkeypatch, cuda=cuda, installed=installed)
    assert modeling.resolve_quantize("auto") is expected


def test_flags_reach_the_config():
    args = build_parser().parse_args(
        ["train", "--precision", "bf16", "--attn-implementation", "eager", "--gradient-checkpointing"]
    )
    config = build_config(train_overrides(args))
    assert config.model.precision == "bf16" and config.model.attn_implementation == "eager"
    assert config.train.gradient_checkpointing is True
    for flag in ("bf16", "fp16"):  # the Trainer's spellings set the same field
        assert (
            build_config(train_overrides(build_parser().parse_args(["train", f"--{flag}"]))).model.precision
            == flag
        )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--bf16", "--fp16"])
    defaults = build_config({})
    assert defaults.model.precision == "auto" and defaults.model.attn_implementation == "auto"
    assert defaults.train.gradient_checkpointing is False


@pytest.mark.parametrize(
    ("overlay", "message"),
    [
        ({"model": {"precision": "fp8"}}, "model.precision='fp8'"),
        ({"model": {"attn_implementation": "xformers"}}, "model.attn_implementation='xformers'"),
        ({"train": {"gradient_checkpointing": "yes"}}, "train.gradient_checkpointing='yes'"),
    ],
)
def test_bad_values_are_refused(overlay, message):
    with pytest.raises(LlmclfError, match=message.replace("(", r"\(")):
        build_config(overlay)


def test_training_arguments_take_precision_and_checkpointing(tmp_path):
    args = training_arguments(
        str(tmp_path),
        epochs=1,
        lr=1e-4,
        batch_size=8,
        eval_batch_size=8,
        weight_decay=0.0,
        seed=1,
        has_val=False,
        n_train=16,
        precision="bf16",
        gradient_checkpointing=True,
    )
    assert args.bf16 and not args.fp16
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    plain = training_arguments(
        str(tmp_path), epochs=1, lr=1e-4, batch_size=8, eval_batch_size=8, weight_decay=0.0, seed=1,
        has_val=False, n_train=16,
    )  # fmt: skip
    assert not plain.bf16 and not plain.fp16 and not plain.gradient_checkpointing


def test_half_precision_base_trains_fp32_weights(tiny_model_dir):
    """bf16 base weights; LoRA and the head's trainable copy in fp32 (master weights)."""
    loaded = modeling.load_classifier(
        str(tiny_model_dir), LABELS, precision="bf16", attn_implementation="eager"
    )
    assert loaded.model.config._attn_implementation == "eager"
    model = modeling.add_lora(loaded.model, r=4, alpha=8, dropout=0.0, targets="auto", seed=0)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    assert any("score" in n for n in trainable)
    assert torch.bfloat16 in set(frozen.values())
    ids = on_device(
        model, loaded.tokenizer(["one text", "another, longer text"], padding=True, return_tensors="pt")
    )
    with hardware.autocast("bf16"):
        logits = model(**ids).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_gradient_checkpointing_on_cpu_gives_the_same_run(tmp_path, tiny_model_dir, small_csv, trained_run):
    out = tmp_path / "gc"
    assert train_tiny(small_csv, tiny_model_dir, out, "--gradient-checkpointing") == 0
    info = json.loads((out / "run_info.json").read_text())
    assert info["precision"] == "fp32" and info["attn_implementation"] == "sdpa"
    # Recomputing activations changes memory, not the maths: same losses and predictions.
    first = json.loads((trained_run / "run_info.json").read_text())
    losses = [e["loss"] for e in info["log_history"] if "loss" in e]
    assert losses and np.allclose(losses, [e["loss"] for e in first["log_history"] if "loss" in e], atol=1e-4)
    columns = [c for c in pd.read_csv(out / "predictions_test.csv").columns if c.startswith("prob_")]
    np.testing.assert_allclose(
        pd.read_csv(out / "predictions_test.csv")[columns].to_numpy(),
        pd.read_csv(trained_run / "predictions_test.csv")[columns].to_numpy(),
        atol=1e-4,
    )


def test_a_run_loads_with_the_settings_this_machine_can_run(monkeypatch):
    from llmclf.inference.classifier import inference_settings

    fake_machine(monkeypatch, cuda=False)
    assert inference_settings({"precision": "fp32"}, "eager") == ("fp32", "eager")
    # GPU run, CPU load: bf16 where the CPU has it natively, fp32 elsewhere; fp16 never on CPU
    assert inference_settings({"precision": "bf16"}, "flash_attention_2") == ("fp32", "sdpa")
    fake_machine(monkeypatch, cuda=False, cpu_bf16=True)
    assert inference_settings({"precision": "bf16"}, "flash_attention_2") == ("bf16", "sdpa")
    assert inference_settings({"precision": "fp16"}, "auto") == ("fp32", "sdpa")
    fake_machine(monkeypatch, cuda=True, installed=("flash_attn",))
    assert inference_settings({"precision": "bf16"}, "flash_attention_2") == ("bf16", "flash_attention_2")


def test_bf16_run_through_the_activation_cache_reloads_as_trained(
    tmp_path, tiny_model_dir, small_csv, monkeypatch
):
    """The cached training path calls the top layers itself, outside `model.forward`, which is where the
    Trainer's mixed precision sits: it must take the autocast too (bf16 base, fp32 cached states).
    Reloaded on a CPU with bf16, the run computes as at the end of training: bf16 base under autocast,
    fp32 head, LoRA merged into the bf16 weights as the run's evaluation after training merged it (the
    same rounding on both sides, so the same probabilities)."""
    from peft.tuners.lora import LoraLayer

    from conftest import saved_probs
    from llmclf import Classifier

    out = tmp_path / "bf16"
    assert train_tiny(small_csv, tiny_model_dir, out, "--precision", "bf16") == 0
    info = json.loads((out / "run_info.json").read_text())
    assert info["precision"] == "bf16" and info["activation_cache"] is not None and info["lora_merged"]
    losses = [e["loss"] for e in info["log_history"] if "loss" in e]
    assert losses and np.isfinite(losses).all()

    fake_machine(monkeypatch, cuda=False, cpu_bf16=True)
    clf = Classifier.load(out)
    assert clf.precision == "bf16" and not any(isinstance(m, LoraLayer) for m in clf.model.modules())
    assert clf.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert clf.model.score.weight.dtype == torch.float32
    preds, saved = saved_probs(out)
    np.testing.assert_allclose(clf.predict_proba(preds["text"].tolist()), saved, atol=1e-6)
    # The server's batcher calls the model from its worker thread, where autocast must be entered again
    # (it is per thread): the same numbers there, for passes of the same rows. bf16 rounds by the pass's
    # shape, so the texts go in the batches Classifier.predict_proba used, one pass each.
    from concurrent.futures import ThreadPoolExecutor

    from llmclf.batches import NEVER_SPLIT, length_batches
    from llmclf.serve.batcher import ClassifierPredictor

    texts = preds["text"].tolist()
    predict = ClassifierPredictor(clf, clf.max_length, NEVER_SPLIT)
    lengths = [len(ids) for ids in clf.tokenizer(texts, truncation=True, max_length=clf.max_length)["input_ids"]]
    probs = np.zeros_like(saved)
    with ThreadPoolExecutor(1) as worker:
        for idx in length_batches(lengths, clf.batch_size, torch.device("cpu")):
            probs[idx] = worker.submit(predict, [texts[i] for i in idx]).result()[0]
    np.testing.assert_allclose(probs, saved, atol=1e-6)


def test_release_memory_collects_and_trims_the_allocator(monkeypatch):
    calls = []

    class FakeLibc:
        def malloc_trim(self, pad):
            calls.append(pad)

    monkeypatch.setattr(hardware, "_libc", lambda: FakeLibc())
    hardware.release_memory()
    assert calls == [0]
    monkeypatch.setattr(hardware, "_libc", lambda: None)  # not glibc: only the garbage collection
    hardware.release_memory()
    assert calls == [0]


@pytest.mark.parametrize("preset", [None, "512"])
def test_importing_llmclf_caps_the_kernel_caches_unless_the_user_set_them(preset):
    """oneDNN keeps a kernel per input shape (1,024 by default): a bf16 run over texts of every length
    grew by ~16 MiB per length. Read at the first oneDNN call, so llmclf sets the caps on import."""
    import os
    import subprocess
    import sys

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
    }
    if preset:
        env["LRU_CACHE_CAPACITY"] = preset
    code = "import os, llmclf; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ['LRU_CACHE_CAPACITY'])"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["64", preset or "64"]


def test_the_probe_and_lexical_fits_run_blas_on_one_thread(monkeypatch):
    """scikit-learn's fits on a run's small matrices run with BLAS on one thread, whatever the process
    uses elsewhere, and the process's own setting is back afterwards."""
    from sklearn.linear_model import LogisticRegressionCV
    from threadpoolctl import threadpool_info, threadpool_limits

    from llmclf.inference.lexical import fit_lexical
    from llmclf.training.probe import _fit

    def blas_threads() -> set[int]:
        return {d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"}

    seen: list[set[int]] = []
    real = LogisticRegressionCV.fit

    def spy(self, *args, **kwargs):
        seen.append(blas_threads())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LogisticRegressionCV, "fit", spy)
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    x = rng.normal(size=(30, 8)) + y[:, None]
    texts = [f"{['red', 'green', 'blue'][k]} thing number {i}" for i, k in enumerate(y)]
    with threadpool_limits(limits=2, user_api="blas"):
        outside = blas_threads()
        if outside != {2}:
            pytest.skip(f"BLAS cannot be set to two threads here ({outside})")
        _fit(x, y, None, False, 0)
        fit_lexical(texts, y.tolist(), 3, None, 0)
        assert blas_threads() == {2}  # restored
    assert seen == [{1}, {1}]
