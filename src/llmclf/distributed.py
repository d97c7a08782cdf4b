"""Running under a launcher (`torchrun`, `accelerate launch`): who does what when several processes run.

The Hugging Face Trainer already shards the training data and averages gradients (DDP) or shards the
model (FSDP) once the launcher's environment variables are set. What llmclf does around the Trainer
must be made multi-process here (under FSDP, where no process holds the whole model, fsdp.py runs the
evaluation, the probe and the saving through the Trainer instead):

- the model source is resolved (GGUF conversion, hub download) by the main process first, the others
  wait and then find it cached;
- only the main process clears and writes the run folder and prints the report;
- every process loads the same seeded splits; the class weights are checked to be identical;
- test-set evaluation is sharded: each process scores every `world`-th row of the length-sorted order
  (balanced work, little padding), the shards are gathered, and every row is scored exactly once.

Single-process runs take none of these paths: every helper falls back to the plain behaviour.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from llmclf.errors import LlmclfError


def launched() -> bool:
    """True when a launcher started several processes (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def cpu_processes() -> bool:
    """Launched without CUDA: accelerate (and the Trainer's `use_cpu`) must be told, or it runs each
    process alone (DistributedType.NO) instead of multi-CPU DDP over gloo."""
    return launched() and not torch.cuda.is_available()


def fsdp() -> bool:
    """`accelerate launch` with an FSDP config (it sets ACCELERATE_USE_FSDP for the workers)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def _state() -> Any:
    """accelerate's process state; it creates the process group (nccl on CUDA, gloo on CPU) once."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_processes())


def setup() -> None:
    """Join the process group now when launched, so barriers work before the Trainer exists."""
    from llmclf import fsdp as fsdp_support  # (it imports this module)

    fsdp_support.check_launch()
    if launched():
        _state()


def active() -> bool:
    return launched() and torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def local_rank() -> int:
    """Index of this process on its machine: the GPU it owns."""
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def is_main() -> bool:
    """The process that writes files and prints (global rank 0)."""
    return rank() == 0


def barrier() -> None:
    if active():
        torch.distributed.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block first (e.g. downloads, converts); the others then run it too."""
    if not active():
        yield
        return
    with _state().main_process_first():
        yield


def cuda_device() -> torch.device:
    """This process's GPU: one per local rank under a launcher."""
    return torch.device("cuda", local_rank())


def shutdown() -> None:
    """Leave the process group at the end of a launched run (avoids torch's exit-time warning)."""
    if active():
        barrier()
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------- consistency
def all_gather(value: Any) -> list[Any]:
    """Every process's `value`, in rank order (just `[value]` in one process)."""
    if not active():
        return [value]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def check_identical(value: Any, what: str) -> None:
    """Stop when the processes disagree on something they each computed (splits, class weights)."""
    values = all_gather(value)
    if any(v != values[0] for v in values[1:]):
        differing = [r for r, v in enumerate(values) if v != values[0]]
        raise LlmclfError(
            f"The {what} differ between processes (ranks {differing} vs rank 0): each process must read the "
            "same data with the same seed. Give every process the same --data file and --seed."
        )


# ---------------------------------------------------------------------------------- sharded scoring
def shard_indices(lengths: Sequence[int], world: int, rank_: int) -> np.ndarray:
    """Row indices scored by process `rank_`: every `world`-th row of the longest-first order.

    Striding (rather than contiguous blocks) gives every process rows of similar lengths, so they
    finish together; each shard is still sorted by length, so batches pad little.
    """
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")[::-1]
    return order[rank_::world]


def reassemble(parts: Sequence[tuple[np.ndarray, np.ndarray]], n: int, width: int) -> np.ndarray:
    """Put the gathered (row indices, rows) shards back in input order; every row exactly once."""
    out = np.zeros((n, width), dtype=np.float64)
    seen = np.zeros(n, dtype=np.int64)
    for idx, rows in parts:
        idx = np.asarray(idx, dtype=np.int64)
        out[idx] = rows
        np.add.at(seen, idx, 1)
    if n and not (seen == 1).all():
        raise RuntimeError(f"sharded scoring covered rows {int((seen == 1).sum())}/{n} exactly once")
    return out


def sharded_predict_proba(
    model: Any,
    tokenizer: Any,
    input_ids: list[list[int]],
    *,
    batch_size: int,
    desc: str,
    progress: bool | None = None,
) -> np.ndarray:
    """`evaluation.predict_proba` over all rows, the work split across processes; all get the result."""
    from llmclf.evaluation import predict_proba

    if not active():
        return predict_proba(
            model, tokenizer, input_ids=input_ids, batch_size=batch_size, desc=desc, progress=progress
        )
    idx = shard_indices([len(ids) for ids in input_ids], world_size(), rank())
    local = predict_proba(
        model,
        tokenizer,
        input_ids=[input_ids[i] for i in idx],
        batch_size=batch_size,
        desc=desc,
        progress=False if not is_main() else progress,
    )
    return reassemble(all_gather((idx, local)), len(input_ids), model.config.num_labels)


def evaluate(
    model: Any,
    tokenizer: Any,
    input_ids: list[list[int]],
    label_ids: list[int],
    labels: list[str],
    *,
    batch_size: int,
    desc: str,
    progress: bool | None = None,
) -> tuple[dict, np.ndarray]:
    """Metrics over the whole test split (scored once, sharded when launched) and the probabilities."""
    from llmclf.evaluation import compute_metrics

    probs = sharded_predict_proba(
        model, tokenizer, input_ids, batch_size=batch_size, desc=desc, progress=progress
    )
    return compute_metrics(label_ids, probs.argmax(axis=1), labels), probs
