"""The run's steps around the model: where it comes from and how it runs, loading it, cutting it at the
feature layer, LoRA on it, merging LoRA for inference, and run_info's records of these."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from llmclf import distributed, runtime
from llmclf.config import SINGLE_LABEL, RunConfig
from llmclf.errors import LlmclfError
from llmclf.inference.task import Task
from llmclf.model.adapter import merge_in_place, merged_at_inference
from llmclf.model.anatomy import (
    is_encoder,
    num_layers,
    resolve_top_layers,
    top_layers_of,
    trainable_head,
)
from llmclf.model.label_words import zero_shot_head
from llmclf.model.layer_choice import MAX_TEXTS
from llmclf.model.loading import add_lora, load_classifier, resolve_quantize
from llmclf.model.pooling import use_pooling
from llmclf.model.prompt import apply_template, resolve_template, separate_pairs
from llmclf.model.sources import resolve_model_source
from llmclf.training import backend as backends
from llmclf.training import checkpoints, estimate, fsdp
from llmclf.training.backend import Backend, Encoded
from llmclf.training.feature_layer import FeatureLayer, pick_feature_layer
from llmclf.training.heads import SPLITS

log = logging.getLogger("llmclf")


@dataclass
class ModelChoice:
    """Where the base model comes from and how it runs, resolved once for the run."""

    source: str
    quantized: bool
    precision: str
    attn: str
    precision_evidence: dict | None = None
    """On a CPU with native bf16 under `auto`: the timed matmuls that chose bf16 or fp32."""


def resolve_model(config: RunConfig) -> ModelChoice:
    """The model's source (downloaded or converted once, by the main process first) and how it runs."""
    mc = config.model
    with distributed.main_process_first():  # the others then find it cached
        source = resolve_model_source(mc.name)
    quantized = fsdp.check_supported(mc.quantize, resolve_quantize(mc.quantize))
    precision = runtime.resolve_precision(mc.precision)
    attn = runtime.resolve_attn_implementation(mc.attn_implementation, precision)
    return ModelChoice(source, quantized, precision, attn, runtime.precision_evidence(mc.precision))


def load_model(config: RunConfig, task: Task, choice: ModelChoice) -> tuple[Any, Any]:
    """Base model + classification head (4-bit where chosen), its tokenizer framing texts in the prompt
    template."""
    mc = config.model
    log.info(
        "Loading %s (%s, %s, %s) ...",
        mc.name,
        "4-bit NF4" if choice.quantized else "full precision",
        choice.precision,
        choice.attn,
    )
    loaded = load_classifier(
        choice.source,
        task.labels,
        quantize=choice.quantized,
        trust_remote_code=mc.trust_remote_code,
        precision=choice.precision,
        attn_implementation=choice.attn,
        gradient_checkpointing=config.train.gradient_checkpointing,
        allow_pickle=mc.allow_pickle,
        problem_type=None if task.name == SINGLE_LABEL else task.problem_type,  # sigmoid, or no function
    )
    # framed texts everywhere the tokenizer runs, the saved and exported tokenizer included
    apply_template(loaded.tokenizer, resolve_template(mc.prompt_template, loaded.model))
    if config.data.text_pair_column:  # a separator between a pair's texts, where the tokenizer has none
        separate_pairs(loaded.tokenizer)
    return loaded.model, loaded.tokenizer


def cut_at_feature_layer(
    config: RunConfig,
    model: Any,
    tokenizer: Any,
    encoded: Encoded,
    task: Task,
    choice: ModelChoice,
    start: checkpoints.ResumePoint,
    depth: float,
) -> tuple[torch.Tensor | None, FeatureLayer]:
    """The label words' zero-shot head (None where it does not apply), then the model cut after its
    feature layer (model.feature_layer), which scores that head on the whole model first. A resumed run
    takes the layer and the metrics before training that the interrupted run saved. The head then reads
    the pooling chosen with the layer (model.pooling)."""
    zero_shot = (
        None
        if task.name != SINGLE_LABEL
        or fsdp.requested()
        or resolve_template(config.model.prompt_template, model) is None
        else zero_shot_head(model, tokenizer, task.labels, choice.source)
    )
    layer = pick_feature_layer(
        config.model.feature_layer,
        model,
        encoded,
        pooling=config.model.pooling,
        pad_id=tokenizer.pad_token_id,
        zero_shot=zero_shot if start.before is None else None,
        precision=choice.precision,
        batch_size=config.train.eval_batch_size,
        seed=config.train.seed,
        recorded=start.layer,
        regression=task.name != SINGLE_LABEL,  # numbers, or multi-hot rows: scored by ridge regression
        start_of=cache_start_of(model, config, depth),
    )
    use_pooling(model, layer.pooling)  # before anything reads the head's input (cache, probe, training)
    return zero_shot, layer


def cache_start_of(model: Any, config: RunConfig, depth: float) -> Callable[[int], int | None] | None:
    """The activation cache's first layer were the model cut after layer L (None for an L where every
    layer is adapted), where this run will build a cache; None where it will not. `depth`: the share of
    the layers `lora.layers auto` adapts."""
    layers = config.lora.layers
    try:
        if (
            is_encoder(model)
            or backends.cache_use(top_layers_of(num_layers(model), layers, depth), config.train)
            != backends.CACHED
        ):
            return None
    except LlmclfError:  # not a decoder the cache supports
        return None

    def start_of(layer: int) -> int | None:
        top = top_layers_of(layer, layers, depth)
        return layer - top if top is not None and top < layer else None

    return start_of


def adapt(model: Any, config: RunConfig, depth: float) -> tuple[Any, int | None]:
    """LoRA on the (possibly cut) model, `depth` its share of the layers under `lora.layers auto`. Returns
    it and how many top layers LoRA adapts (None: all)."""
    lc = config.lora
    top_layers = resolve_top_layers(model, lc.layers, depth)
    model = add_lora(
        model,
        r=lc.r,
        alpha=lc.alpha,
        dropout=lc.dropout,
        targets=lc.targets,
        seed=config.train.seed,
        top_layers=top_layers,
    )
    return model, top_layers


def lora_info(top_layers: int | None, config: RunConfig, depth: float) -> dict:
    """run_info's record of the layers LoRA adapted (None: all) and the share `lora.layers auto` chose."""
    return {"adapted": top_layers, "setting": config.lora.layers, "auto_share": depth}


def head_input_info(layer: FeatureLayer, zero_shot: torch.Tensor | None) -> dict:
    """run_info's record of what the head reads (layer, pooling) and of the evaluation before training."""
    return {
        "before_training": "zero-shot" if zero_shot is not None else "random head",
        "feature_layer": None if layer.choice is None else layer.choice.info(),
        "pooling": layer.pooling,
    }


def planned_work(model: Any, encoded: Encoded, config: RunConfig, depth: float) -> estimate.Work:
    """What the run will compute, for the time estimate: base parameters (4-bit ones count as two,
    being packed in pairs), tokens per split, the adapted share of the layers, the layer choice's pass
    (the whole model left uncut: an upper bound)."""
    top_layers = resolve_top_layers(model, config.lora.layers, depth)
    epochs = config.train.epochs
    parameters = sum(
        p.numel() * (2 if hasattr(p, "quant_state") else 1)
        for name, p in model.named_parameters()
        if "lora_" not in name
    )
    tokens = {name: sum(len(ids) for ids in encoded.ids[name]) for name in SPLITS}
    share = 1.0 if top_layers is None else top_layers / num_layers(model)
    validations = (math.ceil(epochs) + 1) if tokens["val"] else 0  # each epoch, and the lexical check
    sampled = min(1.0, MAX_TEXTS / max(1, len(encoded.ids["train"])))  # the layer pass's share of train
    scored = round(tokens["train"] * sampled) + tokens["test"] if config.model.feature_layer == "auto" else 0
    return estimate.Work(parameters, tokens, epochs, share, validations, scored)


def fold_target_scale(model: Any, task: Task) -> None:
    """Multiply the regression head's outputs by the target scale, so that the saved and exported model
    outputs the column's own units (an elementwise scaling: a shard under FSDP scales alike)."""
    if not task.regression:
        return
    head = trainable_head(model)
    with torch.no_grad():
        head.weight.mul_(task.scale.scale)
        if head.bias is not None:
            head.bias.mul_(task.scale.scale)


def merge_for_inference(backend: Backend, quantized: bool) -> bool:
    """LoRA folded into the trained model's weights where the saved classifier will predict that way
    (`adapter.merged_at_inference`), so that what training scores from here on is what a reload computes.
    Returns whether it did, for run_info.json (`lora_merged`), which `Classifier.load` follows."""
    merged = merged_at_inference(quantized=quantized, sharded=backend.sharded)
    if merged:
        merge_in_place(backend.model)
    return merged
