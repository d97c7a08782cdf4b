"""Load a run's LoRA adapter and head onto the base model, refusing one that does not fit.

peft only warns about missing or unexpected adapter weights (and the command line silences warnings),
so an adapter stripped of its LoRA tensors would load and predict with the base model's random head.
Here every tensor the model expects must be in the file with its shape, and nothing else may be.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmclf.errors import LlmclfError
from llmclf.model.anatomy import HEAD_NAMES, num_layers

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def load_adapter(model: Any, folder: Path, labels: list[str]) -> Any:
    """`model` wrapped with the adapter and trained head saved in `folder`, checked against the file."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    weights = folder / ADAPTER_WEIGHTS
    saved = _saved_shapes(weights)
    _check_head_rows(saved, weights, labels)
    try:
        peft_model = PeftModel.from_pretrained(model, str(folder))
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise LlmclfError(
            f"{folder}: the adapter does not fit the base model ({type(exc).__name__}: {str(exc)[:300]}). "
            "The run folder is damaged or belongs to another base model: copy it again, or train again."
        ) from None
    expected = {name: tuple(t.shape) for name, t in get_peft_model_state_dict(peft_model).items()}
    problems = [f"missing {name}" for name in sorted(set(expected) - set(saved))]
    problems += [f"unexpected {name}" for name in sorted(set(saved) - set(expected))]
    problems += [
        f"{name} has shape {list(saved[name])}, the model needs {list(expected[name])}"
        for name in sorted(set(saved) & set(expected))
        if saved[name] != expected[name]
    ]
    problems += _top_layer_problems(peft_model)
    if problems:
        raise LlmclfError(
            f"{weights} does not match the model it adapts: {'; '.join(problems[:5])}"
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            + ". The run folder is damaged or edited: copy it again, or train again."
        )
    return peft_model


def _top_layer_problems(peft_model: Any) -> list[str]:
    """LoRA on the top k layers (`layers_to_transform`) ends at the model's last layer, as training put it:
    a model built with more or fewer layers (an edited feature_layer) would load the adapter silently."""
    wanted = getattr(peft_model.peft_config.get("default"), "layers_to_transform", None)
    if not isinstance(wanted, list) or not wanted:
        return []
    try:
        total = num_layers(peft_model)
    except LlmclfError:
        return []
    if max(wanted) == total - 1:
        return []
    return [
        f"it adapts layers {min(wanted)}..{max(wanted)} (0-based), the top of a {max(wanted) + 1}-layer model, "
        f"but the model has {total} layers"
    ]


def _saved_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # any parse failure of an untrusted file is the same answer
        raise LlmclfError(
            f"{weights} is not a readable safetensors file ({type(exc).__name__}). The run folder is "
            "damaged: copy it again, or train again."
        ) from None


def _check_head_rows(saved: dict[str, tuple[int, ...]], weights: Path, labels: list[str]) -> None:
    """The head has one row per label of labels.json: a tampered label list is named as such."""
    for name, shape in saved.items():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in HEAD_NAMES and shape[0] != len(labels):
            raise LlmclfError(
                f"{weights}: the classification head has {shape[0]} outputs but labels.json lists "
                f"{len(labels)} labels. The run folder is damaged or edited: copy it again, or train again."
            )


def merge_lora(model: Any) -> Any:
    """The base model with the LoRA update folded into its weights, peft's wrappers gone and the trained
    head kept: no adapter matmuls per layer. The LoRA matrices are fp32, so over bf16/fp16 weights the
    sum W + scale * B @ A is computed in fp32 and rounded once (tested): still rounded, so a merged
    half-precision model's probabilities differ a little from the unmerged one's (docs/performance.md)."""
    return model.merge_and_unload()


def merged_at_inference(*, quantized: bool, sharded: bool) -> bool:
    """Whether a run predicts with LoRA folded into its base weights: the one place this is decided. Merged
    wherever the base is plain weights held whole (a 4-bit base would be rounded again, a sharded one is
    not held whole): a pass then runs no adapter matmuls (docs/performance.md#per-pass-overhead). Training's
    evaluation after training runs merged too (`merge_in_place`), so a reload gives the probabilities the
    run wrote."""
    return not quantized and not sharded


def merge_in_place(model: Any) -> None:
    """Fold LoRA into the base weights of a trained peft model, keeping the adapter's matrices so that
    they can still be saved: the same arithmetic as `merge_lora` (peft's `merge`), hence the same model."""
    model.merge_adapter()


def drop_lora_dropout(model: Any) -> int:
    """Replace the LoRA layers' dropout (an identity in eval mode, still a module call per layer) by
    `nn.Identity`, for a model that is only used for inference. Returns how many were replaced."""
    from torch import nn

    count = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for name, dropout in dropouts.items():
                if not isinstance(dropout, nn.Identity):
                    dropouts[name] = nn.Identity()
                    count += 1
    return count
