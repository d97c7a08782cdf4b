"""Model anatomy: where a sequence-classification model keeps its decoder layers and its head.

A leaf of the model package (it imports no other llmclf module but errors): the loader, the activation
cache, the probe and FSDP all find the parts of a model through these helpers, inside peft or DDP
wrappers alike.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from llmclf.errors import LlmclfError

HEAD_NAMES = ["score", "classifier"]
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
"""Decoder families whose forward passes `inputs_embeds` unchanged into layer 0."""


def unwrap(model: Any) -> Any:
    """The transformers `*ForSequenceClassification` model inside a peft/DDP wrapper."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_of(model: Any) -> Any:
    """The decoder stack (`LlamaModel` etc.) of a sequence-classification model, checked to be supported."""
    seq_cls = unwrap(model)
    model_type = getattr(seq_cls.config, "model_type", "?")
    decoder = getattr(seq_cls, getattr(seq_cls, "base_model_prefix", "model"), None)
    if model_type not in SUPPORTED or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        raise LlmclfError(
            f"--lora-layers (frozen-layer caching) supports the decoder families {list(SUPPORTED)}; this "
            f"model is '{model_type}'. Leave --lora-layers unset to adapt every layer."
        )
    return decoder


def num_layers(model: Any) -> int:
    return len(decoder_of(model).layers)


def resolve_top_layers(model: Any, layers: int | str | None) -> int | None:
    """How many top layers LoRA adapts: None = all; `auto` = the top fifth where caching is supported."""
    if layers != "auto":
        return layers  # type: ignore[return-value]
    try:
        total = num_layers(model)
    except LlmclfError:
        return None  # not a supported decoder: adapt every layer, no cache
    return max(1, math.ceil(total / 5))


def check_layers(model: Any, top: int) -> int:
    """Index of the first adapted layer when LoRA adapts the top `top` layers."""
    total = num_layers(model)
    if not 0 < top <= total:
        raise LlmclfError(f"--lora-layers {top}: this model has {total} decoder layers; give 1 .. {total}.")
    return total - top


def head_of(model: Any) -> nn.Module:
    """The classification head (`score`), as peft wraps it (its trainable copy is the active one)."""
    seq_cls = unwrap(model)
    head = getattr(seq_cls, "score", None)
    if head is None:
        raise LlmclfError("This model has no `score` head; frozen-layer caching needs a decoder classifier.")
    return head


def trainable_head(model: Any) -> nn.Module:
    """The head module that training updates (peft's trainable copy under `modules_to_save`)."""
    head = head_of(model)
    copies = getattr(head, "modules_to_save", None)
    if copies is not None:
        active = getattr(head, "active_adapter", None)
        active = active[0] if isinstance(active, list | tuple) else active
        return copies[active or next(iter(copies.keys()))]
    return head


def upcast_head(model: Any) -> None:
    """The classification head in fp32 over a bf16/fp16 base: the head is trained (and saved) in fp32."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in HEAD_NAMES:
            module.float()


def head_parameter_names(model: Any) -> list[str]:
    return [n for n, _ in model.named_parameters() if any(f".{h}." in f".{n}" for h in HEAD_NAMES)]


def device_of(model: Any) -> Any:
    return next(model.parameters()).device
