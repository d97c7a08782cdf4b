"""Model anatomy: where a sequence-classification model keeps its decoder layers and its head.

A leaf of the model package (it imports no other llmclf module but errors): the loader, the activation
cache, the probe and FSDP all find the parts of a model through these helpers, inside peft or DDP
wrappers alike.

Two kinds of model are told apart by their head. A decoder (Llama, Qwen, ...) has a bias-free `score`
applied to every position and pools the last real token's logits. An encoder (BERT, RoBERTa,
DistilBERT, ...) has a `classifier` fed by its own pooling of the first token ([CLS] -> pooler ->
dropout -> classifier for BERT); the linear layer that outputs the logits may sit inside a small head
module (RoBERTa's dense -> tanh -> out_proj) and has a bias.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from llmclf.errors import LlmclfError

log = logging.getLogger("llmclf")
HEAD_NAMES = ["score", "classifier"]
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
"""Decoder families whose forward passes `inputs_embeds` unchanged into layer 0."""


def unwrap(model: Any) -> Any:
    """The transformers `*ForSequenceClassification` model inside a peft/DDP wrapper."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def activate(logits: torch.Tensor, model: Any) -> torch.Tensor:
    """The head's logits (n, labels) as what they mean, in fp32: class probabilities (softmax), each
    label's probability for a multi-label model (sigmoid), or for a regression model the numbers
    themselves (by `config.problem_type`)."""
    logits = logits.float()
    problem = getattr(unwrap(model).config, "problem_type", None)
    if problem == "regression":
        return logits
    if problem == "multi_label_classification":  # each label on its own
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


def decoder_of(model: Any) -> Any:
    """The decoder stack (`LlamaModel` etc.) of a sequence-classification model, checked to be supported."""
    seq_cls = unwrap(model)
    model_type = getattr(seq_cls.config, "model_type", "?")
    decoder = getattr(seq_cls, getattr(seq_cls, "base_model_prefix", "model"), None)
    if model_type not in SUPPORTED or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        kind = " (an encoder)" if is_encoder(seq_cls) else ""
        raise LlmclfError(
            f"--lora-layers N (frozen-layer caching) supports the decoder families {list(SUPPORTED)}; this "
            f"model is '{model_type}'{kind}. Give --lora-layers all (or auto) to adapt every layer."
        )
    return decoder


def is_encoder(model: Any) -> bool:
    """A bidirectional encoder classifier (BERT, RoBERTa, DistilBERT, ...): a `classifier` head over the
    model's own pooling, where decoders have a `score` head over the last token."""
    seq_cls = unwrap(model)
    return getattr(seq_cls, "score", None) is None and getattr(seq_cls, "classifier", None) is not None


def num_layers(model: Any) -> int:
    return len(decoder_of(model).layers)


AUTO_SHARE = 0.2
"""`lora.layers auto` adapts at least the top fifth of the layers ..."""
MAX_AUTO_SHARE = 0.5
"""... and at most the top half ..."""
SHARE_TOKENS = 20_000
"""... as much as keeps (adapted share x training tokens) at the top fifth of 100,000 tokens: a LoRA
step's compute grows with both, so a shorter training split is adapted deeper for the same time."""


def auto_share(train_tokens: int) -> float:
    """The share of the layers `lora.layers auto` adapts for a training split of `train_tokens` tokens."""
    return min(MAX_AUTO_SHARE, max(AUTO_SHARE, SHARE_TOKENS / max(1, train_tokens)))


def resolve_top_layers(model: Any, layers: int | str | None, share: float = AUTO_SHARE) -> int | None:
    """How many top layers LoRA adapts: None = all; `auto` = the top `share` where caching is supported.

    The one place that decides: an encoder (or another unsupported family) adapts every layer and runs
    without the activation cache; an explicit N there is refused (`check_layers`)."""
    if layers != "auto":
        return layers  # type: ignore[return-value]
    try:
        total = num_layers(model)
    except LlmclfError:
        if is_encoder(model):
            log.info(
                "note: '%s' is an encoder: LoRA adapts all its layers, every step runs the whole model (the "
                "activation cache is for decoders), and the head reads the model's own pooling.",
                getattr(unwrap(model).config, "model_type", "?"),
            )
        return None  # not a supported decoder: adapt every layer, no cache
    return top_layers_of(total, layers, share)


def top_layers_of(total: int, layers: int | str | None, share: float = AUTO_SHARE) -> int | None:
    """How many of a supported decoder's `total` layers LoRA adapts for the setting lora.layers (None:
    all): `auto` is the top `share` (`auto_share`), rounded up."""
    if layers != "auto":
        return layers  # type: ignore[return-value]
    return max(1, math.ceil(round(total * share, 6)))  # round: 30 x 0.2 is 6.000000000000001 in floats


def check_layers(model: Any, top: int) -> int:
    """Index of the first adapted layer when LoRA adapts the top `top` layers."""
    total = num_layers(model)
    if not 0 < top <= total:
        raise LlmclfError(f"--lora-layers {top}: this model has {total} decoder layers; give 1 .. {total}.")
    return total - top


def head_of(model: Any) -> nn.Module:
    """The classification head (`score` or `classifier`), as peft wraps it (its trainable copy is the
    active one)."""
    seq_cls = unwrap(model)
    for name in HEAD_NAMES:
        head = getattr(seq_cls, name, None)
        if head is not None:
            return head
    raise LlmclfError(
        f"This model ({type(seq_cls).__name__}) has no `score` or `classifier` head; llmclf needs a "
        "sequence-classification model with one of those."
    )


def trainable_head(model: Any) -> nn.Linear:
    """The linear layer that outputs the logits, in the head module that training updates (peft's
    trainable copy under `modules_to_save`): the head itself, or its last linear layer where the head is a
    small module (RoBERTa's `classifier.out_proj`). What the probe is copied into."""
    head = head_of(model)
    copies = getattr(head, "modules_to_save", None)
    if copies is not None:
        active = getattr(head, "active_adapter", None)
        active = active[0] if isinstance(active, list | tuple) else active
        head = copies[active or next(iter(copies.keys()))]
    if isinstance(head, nn.Linear):
        return head
    linears = [module for module in head.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise LlmclfError(f"The classification head ({type(head).__name__}) has no linear layer.")
    return linears[-1]  # registered last: the output projection


def upcast_head(model: Any) -> None:
    """The classification head in fp32 over a bf16/fp16 base: the head is trained (and saved) in fp32.
    Matched by suffix, as peft picks the modules it trains in full (DistilBERT's `pre_classifier` too)."""
    for name, module in model.named_modules():
        if name and name.rsplit(".", 1)[-1].endswith(tuple(HEAD_NAMES)):
            module.float()


def head_parameter_names(model: Any) -> list[str]:
    return [n for n, _ in model.named_parameters() if any(f".{h}." in f".{n}" for h in HEAD_NAMES)]


def device_of(model: Any) -> Any:
    return next(model.parameters()).device
