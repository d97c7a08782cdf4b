"""Zero-shot from label words: the language model's own next-token scores for the label names.

With a prompt template that ends where the model would name the text (`... means in one word:"`), the
decoder's last-token state after the final norm, multiplied by the output embedding of a label's first
token, is the model's logit for that label as the next word. Copied into the classification head, the
untrained classifier is a zero-shot classifier: the evaluation before training shows what the model
knows before any fine-tuning instead of chance.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from llmclf.model.anatomy import is_encoder, trainable_head, unwrap

log = logging.getLogger("llmclf")
WORDLIKE = re.compile(r"[^\W\d_]", re.UNICODE)
"""A label is a word where it holds a letter (`Sports`, `sci/tech`; not `0`, `4`, `__3`)."""


def label_token_ids(tokenizer: Any, labels: list[str]) -> list[int] | None:
    """Each label's first token as the next word after the template (no leading space: the template
    ends in a quote), or None where a label is no word or two labels share their first token."""
    if not all(WORDLIKE.search(label) for label in labels):
        return None
    first = []
    for label in labels:
        ids = tokenizer(label.strip(), add_special_tokens=False)["input_ids"]
        if not ids:
            return None
        first.append(ids[0])
    return first if len(set(first)) == len(first) else None


def output_embeddings(model: Any, source: str | None) -> torch.Tensor | None:
    """The language-model head's weights (vocab, hidden): the input embeddings where tied, else
    `lm_head.weight` read from the base model's safetensors files; None where neither is there."""
    seq_cls = unwrap(model)
    if getattr(seq_cls.config, "tie_word_embeddings", False):
        return seq_cls.get_input_embeddings().weight
    if source is None or not Path(source).is_dir():
        return None
    from safetensors import safe_open

    for path in sorted(Path(source).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if "lm_head.weight" in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                return f.get_tensor("lm_head.weight")
    return None


def zero_shot_head(model: Any, tokenizer: Any, labels: list[str], source: str | None) -> torch.Tensor | None:
    """Head weights (labels, hidden) scoring each label's word, or None where zero-shot does not apply
    (an encoder, labels that are no words, no output embeddings)."""
    if is_encoder(model):
        return None
    ids = label_token_ids(tokenizer, labels)
    if ids is None:
        return None
    embeddings = output_embeddings(model, source)
    if embeddings is None or embeddings.shape[1] != trainable_head(model).weight.shape[1]:
        return None
    return embeddings[ids].detach().float().clone()


def set_head(model: Any, weight: torch.Tensor) -> torch.Tensor:
    """Copy `weight` (labels, hidden) into the head; returns the weights it had."""
    head = trainable_head(model)
    before = head.weight.detach().clone()
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight.dtype))
    return before
