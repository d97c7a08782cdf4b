"""The machine and the libraries: precision and attention kernel for `auto`, threads, quiet libraries,
the cache folder, memory handed back between steps.

Each resolver takes the configured value and returns a concrete one, or raises `LlmclfError` when the
explicit choice cannot run here. They read the machine through torch / importlib only, so tests can
monkeypatch `torch.cuda.is_available`, `torch.cuda.is_bf16_supported` and `importlib.util.find_spec`.
torch is imported inside the functions that need it: `llmclf report` and `compare` never load it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmclf.config import ATTN_CHOICES, PRECISION_CHOICES
from llmclf.errors import LlmclfError


def torch_dtype(precision: str) -> Any:
    """torch dtype of a resolved precision (bf16 / fp16 / fp32)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def cache_dir() -> Path:
    """Where converted models and disk activation caches live: $LLMCLF_CACHE, else ~/.cache/llmclf."""
    return Path(os.environ.get("LLMCLF_CACHE") or Path.home() / ".cache" / "llmclf")


def set_threads() -> None:
    """Use every core present (torch defaults to the physical count, which may be fewer)."""
    import torch

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(n)


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS on one thread for scikit-learn's iterative fits on a run's matrices (a few thousand rows):
    at that size OpenBLAS's threads cost more than they share out (docs/performance.md)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


LIBRARY_LOGGERS = ("transformers", "peft", "bitsandbytes", "accelerate", "huggingface_hub")
"""Loggers whose records `library_output_to_log` routes to llmclf's log while a model loads."""
_verbose_libraries = False  # set by quiet_libraries(verbose=True): the command line's --verbose


def quiet_libraries(verbose: bool = False) -> None:
    """What every command runs first: no library chatter unless --verbose (also used by benchmarks)."""
    global _verbose_libraries
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _verbose_libraries = verbose
    if verbose:
        return
    import warnings

    # bitsandbytes warns at import that an optional CPU kernel package is absent; it works without it.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import transformers  # its logging module loads without torch

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # weight-loading bars; training keeps its own
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


class _ToLlmclfLog(logging.Handler):
    """Re-emits a library's log record on the `llmclf` logger at DEBUG, named after its source."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("llmclf").debug("%s (%s): %s", record.name, record.levelname, record.getMessage())


@contextlib.contextmanager
def library_output_to_log(verbose: bool | None = None) -> Iterator[None]:
    """While a model loads, what the libraries would print (transformers' load report and weight-loading
    bars, bitsandbytes' note on an optional CPU kernel, deprecation warnings) goes to the `llmclf` logger
    at DEBUG instead of stderr: `logging.getLogger("llmclf").setLevel(logging.DEBUG)` shows it. Everything
    is put back on exit (the warning filters, the loggers' handlers, the progress-bar setting); the
    library loggers' levels are left alone. `verbose` (default: the command line's --verbose) changes
    nothing. Not thread-safe, as `warnings.catch_warnings` is not: a warning another thread raises
    meanwhile is logged here too."""
    if _verbose_libraries if verbose is None else verbose:
        yield
        return
    import warnings

    bars = _progress_bars(False)  # (first: transformers sets up its logger's own handler when first used)
    saved = {}
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.propagate)
        logger.handlers, logger.propagate = [_ToLlmclfLog()], False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                for w in caught:
                    logging.getLogger("llmclf").debug(
                        "%s: %s (%s:%s)", w.category.__name__, w.message, w.filename, w.lineno
                    )
    finally:
        _progress_bars(bars)
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate


def _progress_bars(enabled: bool) -> bool:
    """Turn transformers' progress bars on or off; returns whether they were on."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_verbosity()  # configures the library's logger where nothing has yet
    before = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    return before


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


def release_memory() -> None:
    """Free unreachable objects and hand the allocator's free pages back to the system, between the
    steps of a run. glibc keeps freed memory for reuse, in holes that tensors of other shapes do not fit,
    so without this the process's memory (RSS) only grows from step to step."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags of native bf16 matrix instructions (x86: AVX512-BF16, AMX). Without them oneDNN emulates
bf16, slower than fp32."""


@functools.cache
def cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (see docs/performance.md)."""
    import torch

    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: keep fp32
        return False
    return any(flag in flags for flag in CPU_BF16_FLAGS)


PRECISION_FILE = "cpu_precision.json"
BF16_MIN_SPEEDUP = 1.1
"""bf16 is chosen on a CPU only when it is at least this much faster than fp32: its rounding is not free."""
MATMUL_SHAPE = (512, 576, 1536)
"""(rows, in, out) of the timed matmul: a batch of tokens through a small decoder's MLP projection."""


def time_matmul(repeats: int = 5, inner: int = 8) -> dict[str, float]:
    """Seconds per matmul of MATMUL_SHAPE in fp32 and in bf16 on this CPU: the best of `repeats`
    interleaved rounds (a shared machine's noise hits both alike)."""
    import time

    import torch

    rows, width, out = MATMUL_SHAPE
    a, b = torch.randn(rows, width), torch.randn(width, out)
    pairs = {"fp32": (a, b), "bf16": (a.bfloat16(), b.bfloat16())}
    best = dict.fromkeys(pairs, float("inf"))
    for x, y in pairs.values():  # warm-up: kernel selection, allocation
        x @ y
    for _ in range(repeats):
        for name, (x, y) in pairs.items():
            started = time.perf_counter()
            for _ in range(inner):
                x @ y
            best[name] = min(best[name], (time.perf_counter() - started) / inner)
    return best


def _machine_key() -> dict[str, Any]:
    import platform

    import torch

    model = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model
            )
    except OSError:
        pass
    return {"cpu": model, "torch": torch.__version__, "threads": torch.get_num_threads()}


def cpu_precision_evidence() -> dict[str, Any]:
    """The CPU's measured choice between bf16 and fp32: {"key", "seconds", "choice"}. Timed once per CPU
    model, torch version and thread count, then read from the cache folder (a damaged or foreign entry
    is timed again)."""
    import json

    key, path = _machine_key(), cache_dir() / PRECISION_FILE
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached["key"] == key and cached["choice"] in ("bf16", "fp32"):
            return cached
    except (OSError, ValueError, KeyError, TypeError):
        pass
    seconds = time_matmul()
    choice = "bf16" if seconds["fp32"] >= BF16_MIN_SPEEDUP * seconds["bf16"] else "fp32"
    evidence = {"key": key, "seconds": seconds, "choice": choice}
    from llmclf.runfolder import write_json

    write_json(path, evidence)
    return evidence


def precision_evidence(mode: str) -> dict[str, Any] | None:
    """Why `auto` chose what it did on this CPU (for run_info.json), or None where nothing was timed."""
    if mode != "auto" or cuda() or not cpu_bf16():
        return None
    return cpu_precision_evidence()


def resolve_precision(mode: str) -> str:
    """`auto`: bf16 on a GPU that supports it, fp16 on older CUDA GPUs; on CPU bf16 where the CPU has
    native bf16 instructions (cpu_bf16) and a matmul runs faster in it here (cpu_precision_evidence),
    fp32 elsewhere."""
    import torch

    if mode not in PRECISION_CHOICES:
        raise LlmclfError(f"Unknown precision {mode!r}: choose one of {', '.join(PRECISION_CHOICES)}.")
    if mode == "auto":
        if not cuda():
            return cpu_precision_evidence()["choice"] if cpu_bf16() else "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "fp16" and not cuda():
        raise LlmclfError(
            "--precision fp16 needs a CUDA GPU (mixed-precision fp16 training is GPU-only). Use --precision "
            "auto or fp32 on CPU (or bf16, fast on CPUs with AVX512-BF16 or AMX)."
        )
    if mode == "bf16" and cuda() and not torch.cuda.is_bf16_supported():
        raise LlmclfError("--precision bf16: this GPU has no bf16 support. Use --precision fp16 or auto.")
    return mode


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


def autocast(precision: str | None) -> Any:
    """Mixed-precision context for inference on a model trained with bf16/fp16 (fp32 head, half body)."""
    import torch

    if precision in (None, "fp32"):
        return contextlib.nullcontext()
    return torch.autocast("cuda" if cuda() else "cpu", dtype=torch_dtype(precision))
