"""Running under a launcher (`torchrun`, `accelerate launch`): who does what when several processes run.

The Hugging Face Trainer already shards the training data and averages gradients (DDP) or shards the
model (FSDP) once the launcher's environment variables are set. What llmclf does around the Trainer
must be made multi-process; this module owns the process group and what the processes share:

- the model source is resolved (GGUF conversion, hub download) by the main process first, the others
  wait and then find it cached;
- only the main process clears and writes the run folder and prints the report;
- every process loads the same seeded splits; the class weights are checked to be identical
  (`check_identical`); the test split is scored in shards (inference/predict.py) and gathered here.

Single-process runs take none of these paths: every helper falls back to the plain behaviour.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from llmclf.errors import LlmclfError


def launched() -> bool:
    """True when a launcher started several processes (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def cpu_processes() -> bool:
    """Launched without CUDA: accelerate (and the Trainer's `use_cpu`) must be told, or it runs each
    process alone (DistributedType.NO) instead of multi-CPU DDP over gloo."""
    return launched() and not torch.cuda.is_available()


def fsdp_launch() -> bool:
    """`accelerate launch` with an FSDP config (it sets ACCELERATE_USE_FSDP for the workers)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def _state() -> Any:
    """accelerate's process state; it creates the process group (nccl on CUDA, gloo on CPU) once."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_processes())


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Join the process group for the block when launched (so barriers work before the Trainer exists);
    leave it at the end, once every process got there (rank 0's writes are done). After an error the
    group is left as it is: the other processes may never reach a barrier."""
    if launched():
        _state()
    yield
    if active():
        barrier()
        torch.distributed.destroy_process_group()


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
