"""Which of a text's token states a decoder's head reads: the last real token's (the model's own), or the
mean over the text's real tokens (model.pooling).

A decoder classifier (`LlamaForSequenceClassification`, ...) runs its head on every position and keeps
the last real token's logits. Mean pooling stays inside that code: a hook on the decoder's final norm
replaces each position's normed state by the mean of the row's real (unmasked) positions, so the position
the model keeps holds the mean, whatever path runs the decoder (a full forward, the activation cache's
upper pass, the probe's feature pass). The lower pass of the activation cache swaps the final norm out,
so the cached states stay per token.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from llmclf.errors import LlmclfError
from llmclf.model.anatomy import decoder_of, is_encoder

POOLINGS = ("last", "mean")
"""What a decoder's head can read: `last` (the last real token, the model's own) or `mean`."""
_HOOKS = "_llmclf_pooling_hooks"


def pool(states: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(batch, seq, hidden) states and their (batch, seq) attention mask -> (batch, hidden): the rightmost
    real token's state (either padding side), or the mean over the real tokens."""
    if pooling == "mean":
        return masked_mean(states, mask)[:, 0]
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(dim=1)
    return states[torch.arange(states.shape[0], device=states.device), last.to(states.device)]


def masked_mean(states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, seq, hidden) -> (batch, 1, hidden): the mean over each row's real positions, summed in
    fp32 (a bf16 sum over hundreds of tokens loses digits); all positions where there is no mask."""
    if mask is None:
        return states.float().mean(dim=1, keepdim=True).to(states.dtype)
    weights = mask.to(device=states.device, dtype=torch.float32).unsqueeze(-1)  # (batch, seq, 1)
    total = (states.float() * weights).sum(dim=1, keepdim=True)
    return (total / weights.sum(dim=1, keepdim=True).clamp(min=1.0)).to(states.dtype)


def check_pooling(model: Any, pooling: str) -> Any:
    """The decoder whose head `pooling` applies to (None: the model's own pooling stays, as for encoders
    with `last`); a clear error where it cannot apply."""
    if pooling not in POOLINGS:
        raise LlmclfError(f"model.pooling is {pooling!r}; give one of {', '.join(POOLINGS)} (or auto).")
    if is_encoder(model):
        if pooling == "mean":
            raise LlmclfError(
                "--pooling mean: this model is an encoder, whose head reads its own pooling. Give --pooling "
                "auto for encoders."
            )
        return None
    try:
        return decoder_of(model)
    except LlmclfError as err:
        if pooling == "last":
            return None  # the model's own pooling
        raise LlmclfError(f"--pooling mean: {err} Give --pooling last (or auto) for this model.") from err


def use_pooling(model: Any, pooling: str) -> None:
    """Make `model`'s head read `pooling`; idempotent (`last` removes llmclf's mean-pooling hooks)."""
    decoder = check_pooling(model, pooling)
    if decoder is None:
        return
    for handle in getattr(decoder, _HOOKS, []):
        handle.remove()
    setattr(decoder, _HOOKS, [])
    if pooling == "last":
        return
    # Per thread: the server's threads may run the model at once, each with its own batch's mask.
    stash = threading.local()

    def keep_mask(_module: Any, args: tuple, kwargs: dict) -> None:
        stash.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    def mean_of_tokens(_module: Any, _args: Any, output: torch.Tensor) -> torch.Tensor:
        mask = getattr(stash, "mask", None)
        if mask is not None and mask.dim() != 2:  # a 4-D mask built by the caller: not ours to read
            raise LlmclfError("model.pooling mean needs the (batch, seq) attention mask; got a 4-D mask.")
        return masked_mean(output, mask).expand_as(output)  # (batch, seq, hidden): the mean everywhere

    setattr(
        decoder,
        _HOOKS,
        [
            decoder.register_forward_pre_hook(keep_mask, with_kwargs=True),
            decoder.norm.register_forward_hook(mean_of_tokens),
        ],
    )


def pooling_of(model: Any) -> str:
    """The pooling `use_pooling` set on this model (`last` where none was set)."""
    try:
        decoder = decoder_of(model)
    except LlmclfError:
        return "last"
    return "mean" if getattr(decoder, _HOOKS, None) else "last"
