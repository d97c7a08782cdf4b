"""The GPU path: resolve `auto` settings for precision and attention kernel from what the machine has.

Each resolver takes the configured value and returns a concrete one, or raises `LlmclfError` when the
explicit choice cannot run here. They read the machine through torch / importlib only, so tests can
monkeypatch `torch.cuda.is_available`, `torch.cuda.is_bf16_supported` and `importlib.util.find_spec`.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Any

import torch

from llmclf.config import ATTN_CHOICES, PRECISION_CHOICES
from llmclf.errors import LlmclfError
from llmclf.modeling import DTYPES


def cuda() -> bool:
    return torch.cuda.is_available()


def resolve_precision(mode: str) -> str:
    """`auto`: bf16 on a GPU that supports it, fp16 on older CUDA GPUs, fp32 on CPU."""
    if mode not in PRECISION_CHOICES:
        raise LlmclfError(f"Unknown precision {mode!r}: choose one of {', '.join(PRECISION_CHOICES)}.")
    if mode == "auto":
        if not cuda():
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "fp16" and not cuda():
        raise LlmclfError(
            "--precision fp16 needs a CUDA GPU (mixed-precision fp16 training is GPU-only). Use --precision "
            "auto or fp32 on CPU (bf16 also runs on CPU, slowly)."
        )
    if mode == "bf16" and cuda() and not torch.cuda.is_bf16_supported():
        raise LlmclfError("--precision bf16: this GPU has no bf16 support. Use --precision fp16 or auto.")
    return mode


def compute_dtype(precision: str) -> torch.dtype:
    """torch dtype of a resolved precision (bf16 / fp16 / fp32)."""
    return DTYPES[precision]


def resolve_attn_implementation(mode: str, precision: str) -> str:
    """`auto`: FlashAttention-2 on CUDA in half precision when `flash_attn` is installed, else SDPA."""
    if mode not in ATTN_CHOICES:
        raise LlmclfError(
            f"Unknown attention implementation {mode!r}: choose one of {', '.join(ATTN_CHOICES)}."
        )
    has_flash = importlib.util.find_spec("flash_attn") is not None
    half = precision in ("bf16", "fp16")
    if mode == "auto":
        return "flash_attention_2" if cuda() and has_flash and half else "sdpa"
    if mode == "flash_attention_2":
        if not cuda():
            raise LlmclfError("--attn-implementation flash_attention_2 needs a CUDA GPU. Use sdpa (or auto).")
        if not has_flash:
            raise LlmclfError(
                "--attn-implementation flash_attention_2 needs the flash-attn package: "
                "pip install flash-attn --no-build-isolation, or use sdpa (or auto)."
            )
        if not half:
            raise LlmclfError(
                "--attn-implementation flash_attention_2 runs in bf16/fp16 only: use --precision bf16 (or fp16)."
            )
    return mode


def autocast(precision: str) -> Any:
    """Mixed-precision context for inference on a model trained with bf16/fp16 (fp32 head, half body)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda" if cuda() else "cpu", dtype=DTYPES[precision])
