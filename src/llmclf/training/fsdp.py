"""FSDP: llmclf's own steps around the Trainer, made to work on a model sharded across processes.

Under `accelerate launch` with an FSDP config (ACCELERATE_USE_FSDP set, `fsdp_version: 2`) the Trainer
shards the model with FSDP2 (`fully_shard`): each process holds a slice of every weight, and a forward
pass all-gathers the slices layer by layer, on every process at once. So nothing may run the model
outside the Trainer, and nothing may read a weight without gathering it. Here:

- evaluation (before and after training) runs through `trainer.predict`, which wraps the model on first
  use, runs the same number of batches on every process and gathers the outputs in dataset order
  (padding duplicates dropped): every test row exactly once;
- the linear-probe head init reads the head's inputs through the same `trainer.predict` (a forward hook
  makes the head pass its input through, so the model's own last-token pooling returns the features),
  and writes the fitted weights into the head's shards;
- the final adapter and head are gathered in full (trainable parameters only) for rank 0 to save in the
  same run-folder format as a single-process run.

accelerate has no FSDP route on CPU (it sets MULTI_CPU = DDP over gloo and drops the FSDP plugin), while
torch's FSDP2 runs on a CPU device mesh over gloo; `adopt` switches such a Trainer to FSDP, so the flow is
tested on CPU processes. On GPUs accelerate sets FSDP itself and `adopt` only checks it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from llmclf import distributed
from llmclf.errors import LlmclfError
from llmclf.model.anatomy import activate, head_of
from llmclf.training.callbacks import ReseedAtTrainBegin

log = logging.getLogger("llmclf")
GUIDE = "See README, 'Multi-GPU and multi-node', and examples/accelerate/fsdp.yaml."


def requested() -> bool:
    """The run was launched with an FSDP config (accelerate sets ACCELERATE_USE_FSDP for the workers)."""
    return distributed.fsdp_launch()


def check_launch() -> None:
    """Stop at the start of a run launched with an FSDP version llmclf does not run (before any writing)."""
    version = os.environ.get("FSDP_VERSION", "1")
    if requested() and version != "2":
        raise LlmclfError(
            f"llmclf train runs FSDP2 only, but this launch asks for FSDP version {version} (FSDP_VERSION; "
            "accelerate's default is 1). Set `fsdp_version: 2` in the accelerate config file "
            f"(or pass --fsdp_version 2 to accelerate launch). {GUIDE}"
        )


def check_supported(mode: str, quantized: bool) -> bool:
    """Whether to quantise under FSDP: `--quantize auto` picks full precision there, `4bit` is refused
    (llmclf does not shard 4-bit models). Without FSDP, `quantized` unchanged."""
    if not requested():
        return quantized
    if quantized and mode == "auto":
        log.info("note: FSDP: the model is loaded in full precision (llmclf does not shard 4-bit models)")
        return False
    if quantized:
        # The saved adapter on the 4-bit model did not reproduce the probabilities computed under FSDP
        # (docs/distributed.md), so the sharded 4-bit forward is not trusted.
        raise LlmclfError(
            "FSDP with a 4-bit model (--quantize 4bit) is not supported by llmclf train. Use "
            "--quantize none with FSDP, or 4-bit with DDP (examples/accelerate/ddp.yaml, or torchrun): each GPU "
            f"then holds a whole 4-bit model, about 6 GB for an 8B model. {GUIDE}"
        )
    return quantized


def adopt(trainer: Any) -> None:
    """When FSDP was asked: make sure `trainer` runs FSDP, and shard its model now; a no-op otherwise."""
    if not requested():
        return
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        # CPU processes: accelerate chose DDP over gloo and kept no FSDP plugin. Build the plugin from the
        # launcher's FSDP_* variables, as accelerate does on GPUs, and switch the state to FSDP; FSDP2 then
        # shards over a CPU device mesh.
        plugin_args = trainer.args.fsdp_plugin_args or {}
        plugin = FullyShardedDataParallelPlugin(**plugin_args)
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
        trainer.is_fsdp_enabled = True
    if not trainer.is_fsdp_enabled:
        raise LlmclfError(
            "FSDP was asked (ACCELERATE_USE_FSDP) but the Trainer did not enable it: FSDP needs a process group "
            "(launch with accelerate launch or torchrun; on CPU, with at least 2 processes). " + GUIDE
        )
    trainer.add_callback(ReseedAtTrainBegin())
    # Shard now, as `train()` would: accelerate's FSDP2 prepares the model only together with its optimizer
    # (it swaps the optimizer's parameters for the shards), so `trainer.predict` cannot be the first to
    # wrap it. `train()` later finds both prepared, and keeps them.
    trainer.create_optimizer()
    trainer.model, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.model_wrapped = trainer.model


def _reshard(model: Any) -> None:
    """Free the gathered weights a forward pass left behind (the root module keeps them by default), so
    the model holds only its shards again: what the optimizer and `assign` must see."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def predict_outputs(trainer: Any, input_ids: list[list[int]]) -> np.ndarray:
    """The model's outputs (`logits`) for every row, in input order, through `trainer.predict`.

    Rows go in longest first, so every batch pads little; `trainer.predict` shards the batches across
    processes, gathers them in order and drops the padding duplicates. Every process gets all rows.
    """
    import datasets

    n = len(input_ids)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    order = np.argsort([len(ids) for ids in input_ids], kind="stable")[::-1]
    rows = [input_ids[i] for i in order]
    dataset = datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    # In input order: the Trainer's evaluation sampler groups by length in shuffled groups otherwise.
    trainer._get_eval_sampler = lambda data: torch.utils.data.SequentialSampler(data)
    try:
        out = trainer.predict(dataset, metric_key_prefix="llmclf").predictions
    finally:
        del trainer._get_eval_sampler  # back to the class's method (validation during training)
    out = np.asarray(out[0] if isinstance(out, tuple) else out)
    if out.shape[0] != n:
        raise RuntimeError(f"trainer.predict returned {out.shape[0]} rows for {n} inputs")
    _reshard(trainer.model)
    result = np.empty_like(out)
    result[order] = out
    return result


def predict_proba(trainer: Any, input_ids: list[list[int]]) -> np.ndarray:
    """Class probabilities (float64), as `inference.predict.predict_proba` computes them: softmax of fp32 logits."""
    logits = predict_outputs(trainer, input_ids)
    if logits.size == 0:
        return np.zeros((0, trainer.model.config.num_labels), dtype=np.float64)
    return activate(torch.from_numpy(logits), trainer.model).double().numpy()  # probabilities, or numbers


def head_inputs(trainer: Any, input_ids: list[list[int]]) -> np.ndarray:
    """What the classification head sees for each text (n, hidden): the final hidden state at the token
    the model pools (its last non-pad token), read through the sharded model."""
    # The head returns its input unchanged, so the model's own pooling yields (batch, hidden) "logits".
    hook = head_of(trainer.model).register_forward_hook(lambda module, args, output: args[0])
    try:
        return predict_outputs(trainer, input_ids).astype(np.float32)
    finally:
        hook.remove()


def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write a full-size `value` into `param`, which FSDP may hold as a shard (DTensor); the value is
    taken from rank 0 and scattered, so every process ends with the same weights."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.to(dtype=param.dtype)
    with torch.no_grad():
        if isinstance(param, DTensor):
            value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
        else:
            value = value.to(param.device)
        param.copy_(value)


def trainable_state_dict(model: Any) -> dict[str, torch.Tensor] | None:
    """The trainable weights (LoRA, the head's trained copy) gathered in full on CPU: rank 0 gets the dict,
    the other processes None. Every process must call it (the gather is collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)
    return state if distributed.is_main() else None
