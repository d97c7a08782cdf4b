"""Length bucketing: which rows share a forward pass, for every loop that runs the model over many texts.

A pass costs about its padded tokens (rows x its longest row) plus a fixed overhead, so rows are sorted by
length and cut into batches that pad little. Pure numpy: inference, the activation cache, training's
split batches, the server's passes and the sharded evaluation all take their row groups from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

CPU_BATCH = 32
"""`auto` batch on CPU: a pass costs about its tokens there, so the batch size matters little."""
GPU_BATCH_TOKENS = 16_384
"""`auto` budget of padded tokens per batch on a GPU, where a pass over 32 short texts costs about as
much as one over hundreds (benchmarks/gpu.py measures it)."""
GPU_BATCH_MAX = 1024


def length_batches(lengths: list[int] | np.ndarray, batch_size: int | str, device: Any) -> list[np.ndarray]:
    """Row indices, longest first, cut into batches; each pads only to its own longest (its first row).

    `batch_size` texts per batch, or `auto`: 32 on CPU; on CUDA as many as fit GPU_BATCH_TOKENS padded
    tokens (rows x the batch's longest), at most GPU_BATCH_MAX. Every row is in exactly one batch.
    """
    lengths = np.asarray(lengths)
    if batch_size != "auto" or device.type != "cuda":
        order = np.argsort(lengths, kind="stable")[::-1]  # longest first: an out-of-memory shows early
        size = CPU_BATCH if batch_size == "auto" else int(batch_size)
        return [order[i : i + size] for i in range(0, len(order), size)]
    return token_budget_batches(lengths, GPU_BATCH_TOKENS, GPU_BATCH_MAX)


def token_budget_batches(lengths: list[int] | np.ndarray, max_tokens: int, max_rows: int) -> list[np.ndarray]:
    """Row indices, longest first, cut so that each batch padded to its own longest (its first row)
    holds at most `max_tokens` tokens (a single row longer than that is a batch of its own) and at most
    `max_rows` rows. Every row is in exactly one batch."""
    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable")[::-1]
    batches, begin = [], 0
    while begin < len(order):
        longest = max(int(lengths[order[begin]]), 1)
        size = max(1, min(max_rows, max_tokens // longest))
        batches.append(order[begin : begin + size])
        begin += size
    return batches


NEVER_SPLIT = 1e6
"""Pass overhead (in tokens) at and above which rows are never split by length: one pass per batch."""


def padding_groups(lengths: list[int], pass_overhead_tokens: float) -> list[list[int]]:
    """Split rows into forward passes at the least estimated cost, longest first within each pass.

    A pass is costed as its padded tokens (rows x its longest row) plus `pass_overhead_tokens`, what a
    pass costs beyond its tokens, in tokens' worth (weights read from memory, kernel launches, Python).
    On a CPU both matter, so a pass padded to a long outlier can cost more than a second pass; on a
    GPU the overhead dominates and one pass is best.
    Exact: the cheapest passes are contiguous runs of the length-sorted rows, found by dynamic
    programming (O(rows^2) numpy work, a millisecond for a batch of 32)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if len(order) <= 1 or pass_overhead_tokens >= NEVER_SPLIT:
        return [order] if order else []
    longest = np.array([lengths[i] for i in order], dtype=np.float64)  # (n,), descending
    n = len(order)
    best = np.zeros(n + 1)  # best[j]: least cost of the first j sorted rows
    cut = np.zeros(n + 1, dtype=np.int64)  # cut[j]: where the last pass of that solution starts
    for j in range(1, n + 1):
        # the last pass holds sorted rows i..j-1, padded to row i, the longest of them
        costs = best[:j] + longest[:j] * (j - np.arange(j)) + pass_overhead_tokens
        cut[j] = int(np.argmin(costs))  # ties: the first, i.e. the fewest passes
        best[j] = costs[cut[j]]
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = int(cut[j])
    return groups[::-1]


def shard_indices(lengths: Sequence[int], world: int, rank_: int) -> np.ndarray:
    """Row indices scored by process `rank_`: every `world`-th row of the longest-first order.

    Striding (rather than contiguous blocks) gives every process rows of similar lengths, so they
    finish together; each shard is still sorted by length, so batches pad little.
    """
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")[::-1]
    return order[rank_::world]
