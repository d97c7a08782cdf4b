"""A rough time estimate for a run on the CPU, printed before the long steps start.

From the model's size, the tokens of each split and this CPU's measured matrix-multiply rate: a
forward pass costs about 2 FLOPs per parameter per token, a training step about 3 times that (the
backward pass computes the activations' gradients through the adapted layers). The model runs at
about half of the plain matmul rate (docs/performance.md), and the estimate says it is rough.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from llmclf import runtime

log = logging.getLogger("llmclf")
MODEL_EFFICIENCY = 0.5
"""Share of the plain matmul rate a whole model's pass reaches (small kernels, attention, norms)."""
NOTE_FROM_SECONDS = 60.0
"""Below this the estimate is logged at INFO only; from it on, as a note a --quiet run shows too."""


@dataclass
class Work:
    """What a run computes, in tokens: every split's tokens, and the share of the model adapted."""

    parameters: int
    tokens: dict[str, int]  # train, val, test
    epochs: float
    adapted_share: float  # 1.0: every layer runs every step; less: the frozen part ran once (cache)
    validations: int  # passes over the validation split during and after training
    scored_tokens: int = 0  # tokens run once through the whole model to choose the feature layer


def flops(work: Work) -> float:
    """Floating-point operations of the run's forward and backward passes."""
    p, t, a = work.parameters, work.tokens, work.adapted_share
    once = 2 * p * (1 - a) * sum(t.values())  # the frozen layers, once per text (0 without a cache)
    before = 2 * p * a * t["test"]
    training = 3 * 2 * p * a * t["train"] * work.epochs
    validation = 2 * p * a * t["val"] * work.validations
    after = 2 * p * t["test"]  # the whole model, as the saved classifier runs
    return once + before + training + validation + after + 2 * p * work.scored_tokens


def matmul_rate(precision: str) -> float:
    """FLOP/s of a plain matrix multiply in `precision` on this CPU (bf16 timing cached per machine)."""
    rows, width, out = runtime.MATMUL_SHAPE
    seconds = (
        runtime.cpu_precision_evidence()["seconds"]
        if runtime.cpu_bf16()
        else runtime.time_matmul(repeats=2, inner=4)
    )
    return 2 * rows * width * out / seconds["bf16" if precision == "bf16" else "fp32"]


def estimate_seconds(work: Work, rate: float) -> float:
    return flops(work) / (rate * MODEL_EFFICIENCY)


def human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def announce(work: Work, precision: str) -> float | None:
    """Log the estimate on a CPU run (a GPU's rate is not measured here); returns the seconds."""
    if runtime.cuda():
        return None
    rate = matmul_rate(precision)
    seconds = estimate_seconds(work, rate)
    message = (
        "Estimated time on this CPU: roughly %s (%s parameters, %s training tokens x %g epoch(s), "
        "%s tokens to evaluate; measured matmul rate %.0f GFLOP/s in %s)"
    )
    args = (
        human(seconds),
        f"{work.parameters / 1e9:.1f}B" if work.parameters >= 1e9 else f"{work.parameters / 1e6:.3g}M",
        f"{work.tokens['train']:,}",
        work.epochs,
        f"{work.tokens['val'] + work.tokens['test']:,}",
        rate / 1e9,
        precision,
    )
    (log.warning if seconds >= NOTE_FROM_SECONDS else log.info)(
        ("note: " if seconds >= NOTE_FROM_SECONDS else "") + message, *args
    )
    return seconds
