"""Load the tokenizer and the classification model (4-bit where asked), and add LoRA."""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmclf import distributed
from llmclf.errors import LlmclfError
from llmclf.model.anatomy import HEAD_NAMES, check_layers, is_encoder, num_layers
from llmclf.model.sources import hub_errors
from llmclf.runtime import torch_dtype

LLAMA_STYLE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def load_tokenizer(source: str, *, trust_remote_code: bool = False) -> Any:
    """Tokenizer with a pad token: Llama-style tokenizers have none, so EOS stands in (the recipe)."""
    from transformers import AutoTokenizer

    with hub_errors(source):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LlmclfError(f"Tokenizer of '{source}' has neither a pad nor an EOS token to pad with.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_quantize(mode: str) -> bool:
    """True when the model should be loaded in 4-bit NF4."""
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if mode == "auto":
        return torch.cuda.is_available() and has_bnb
    if mode == "4bit" and not has_bnb:
        raise LlmclfError(
            "--quantize 4bit needs bitsandbytes: pip install 'llmclf[gpu]' (or bitsandbytes>=0.49)."
        )
    return mode == "4bit"


def bnb_config(head_names: list[str], dtype: torch.dtype) -> Any:
    """4-bit NF4 with double quantisation; matmuls in `dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        # The head stays in full precision: a 4-bit head cannot be trained (peft #1720).
        llm_int8_skip_modules=head_names,
    )


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    quantized: bool


def load_classifier(
    source: str,
    labels: list[str],
    *,
    quantize: bool = False,
    trust_remote_code: bool = False,
    for_training: bool = True,
    tokenizer_source: str | None = None,
    precision: str = "fp32",
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
    layers: int | None = None,
    base_layers: int | None = None,
    problem_type: str | None = None,
) -> LoadedModel:
    """Base model with a `num_labels` classification head, pad token set in tokenizer and config.

    `tokenizer_source`: where the tokenizer lives when not beside the weights (a run folder's copy).
    `revision`: the hub commit to load (a reloaded run's recorded one).
    `layers`: build and load only the first `layers` decoder layers (a run cut at its feature layer);
    `base_layers`: the layer count the run recorded for the base model, checked.
    `problem_type`: transformers' name of the task (`regression`: one output, no softmax).
    `precision` (resolved: bf16/fp16/fp32) is the 4-bit compute dtype,
    and the weight dtype of a non-quantised model; `attn_implementation` is passed to transformers.
    """
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(tokenizer_source or source, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
        "trust_remote_code": trust_remote_code,
        # Pickle weights only when asked, and then through torch.load(weights_only=True) (CVE-2025-32434).
        "use_safetensors": None if allow_pickle else True,
        "weights_only": True,
    }
    if problem_type:
        kwargs["problem_type"] = problem_type
    dtype = torch_dtype(precision)
    if revision:
        kwargs["revision"] = revision
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if layers is not None:
        kwargs.update(cut_config(source, layers, kwargs, base_layers))
    if quantize:
        kwargs["quantization_config"] = bnb_config(HEAD_NAMES, dtype)
        # One whole model per process: under DDP each rank loads onto its own GPU (LOCAL_RANK).
        kwargs["device_map"] = {"": distributed.local_rank() if torch.cuda.is_available() else "cpu"}
    else:
        kwargs["dtype"] = dtype
    with hub_errors(source):
        model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    # The pooling looks up the last non-pad token through config.pad_token_id (transformers #34055).
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # no KV cache: classification is one forward pass
    if is_encoder(model):
        # An encoder pools a fixed position ([CLS] first) and counts positions from the left: padding
        # goes on the right, as the model was trained (saved with the tokenizer, so the export pads so too).
        tokenizer.padding_side = "right"
    if quantize:
        from peft import prepare_model_for_kbit_training

        # Upcasts the weights left in full precision (embeddings, norms, head) to fp32. Done for
        # inference too, so a reloaded 4-bit run computes exactly as the model did at the end of training.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing and for_training,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if not quantize and torch.cuda.is_available() and not distributed.fsdp_launch():
        model = model.to(distributed.cuda_device())  # (under FSDP the Trainer moves each shard to its GPU)
    return LoadedModel(model, tokenizer, quantize)


def cut_config(
    source: str, layers: int, kwargs: dict[str, Any], base_layers: int | None = None
) -> dict[str, Any]:
    """The config overrides that load the base model cut after `layers` decoder layers, as training cut
    it (`layer_choice.truncate`): the layer count, and the per-layer attention kinds where the config
    lists them (Qwen2/3, Gemma; a count that disagrees with the list fails validation on save). A run
    folder asking for more layers than the base model has (new, random layers) is refused."""
    from transformers import AutoConfig

    keys = ("trust_remote_code", "revision")
    with hub_errors(source):
        config = AutoConfig.from_pretrained(source, **{k: kwargs[k] for k in keys if k in kwargs})
    total = config.num_hidden_layers
    fits = isinstance(layers, int) and not isinstance(layers, bool) and 1 <= layers <= total
    if not fits or base_layers not in (None, total):
        raise LlmclfError(
            f"The run reads layer {layers!r} of {base_layers or 'a model'}, and {source} has {total} decoder "
            "layers: the run folder "
            "does not belong to this base model. Give the base model it was trained on (--base-model)."
        )
    overrides: dict[str, Any] = {"num_hidden_layers": layers}
    if isinstance(getattr(config, "layer_types", None), list):
        overrides["layer_types"] = config.layer_types[:layers]
    return overrides


def lora_targets(model: Any, targets: list[str] | str) -> list[str] | str | None:
    """`auto`: the recipe's q/k/v/o where they exist, else peft's per-architecture default (None).

    `all-linear` on an encoder: every linear layer by full name (the blocks and the pooler, which LoRA
    adapts and the export merges) but those of the head. peft's own all-linear leaves out only the head
    module itself, so it would adapt the layers inside RoBERTa's `classifier` (trained in full anyway)
    and fail on DistilBERT's `pre_classifier` (peft trains it in full: its name ends in `classifier`)."""
    if targets == "all-linear" and is_encoder(model):
        return [
            name
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not _in_head(name)
        ]
    if targets != "auto":
        return targets
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return LLAMA_STYLE_TARGETS if set(LLAMA_STYLE_TARGETS) <= names else None


def _in_head(name: str) -> bool:
    """Whether a module is (inside) one that peft trains in full for a classifier: a path part ending in a
    head name, as peft matches `modules_to_save`."""
    return any(part.endswith(tuple(HEAD_NAMES)) for part in name.split("."))


def add_lora(
    model: Any,
    *,
    r: int,
    alpha: float,
    dropout: float,
    targets: list[str] | str,
    seed: int,
    top_layers: int | None = None,
) -> Any:
    """Wrap in a peft LoRA model; task SEQ_CLS makes peft train and save the head (`modules_to_save`).

    `top_layers`: adapt only the top N decoder layers (the frozen ones below can then be cached)."""
    from peft import LoraConfig, TaskType, get_peft_model

    layer_kwargs: dict[str, Any] = {}
    if top_layers is not None:
        start = check_layers(model, top_layers)
        layer_kwargs = {
            "layers_to_transform": list(range(start, num_layers(model))),
            "layers_pattern": "layers",
        }
    target_modules = lora_targets(model, targets)
    if top_layers is not None and target_modules == "all-linear":
        # peft takes a layer subset only with explicit names: every linear layer inside the blocks.
        target_modules = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and ".layers." in n
            }
        )
    torch.manual_seed(seed)  # LoRA A matrices are random: same seed, same start
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        **layer_kwargs,
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise LlmclfError(
            f"LoRA targets {targets!r} do not match this model's modules ({exc}). Use --lora-targets auto or "
            "all-linear, or names of its linear layers."
        ) from None
    # Trained weights in fp32 (master weights): with a bf16/fp16 base, peft keeps LoRA in fp32 but the
    # head's trainable copy inherits the base dtype, and fp16 gradients break the Trainer's grad scaler.
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return peft_model


class PackedLinear(nn.Module):
    """A bf16 linear layer for inference on a CPU, its weight reordered once into oneDNN's blocked layout.

    A plain bf16 `nn.Linear` on a CPU hands oneDNN the weight in PyTorch's row-major layout, and oneDNN
    reorders it into its blocked one on every call: for a pass of a few tokens that copy, not the
    arithmetic, is most of the cost (docs/performance.md#per-pass-overhead). The same kernel on the
    pre-reordered weight gives bit-identical outputs (tested). `weight` is the packed tensor (a
    Parameter, so the model's parameter list and memory stay as they were); `unpacked()` gives the plain
    layer back (export, copies)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bf16 in, as autocast casts a plain linear layer's input; the kernel takes rows (tokens, features).
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        out = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        return out.view(*shape[:-1], self.out_features)

    def unpacked(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.weight.detach().to_dense(), requires_grad=False)
        linear.bias = self.bias
        return linear

    def __deepcopy__(self, memo: dict) -> PackedLinear:
        return PackedLinear(copy.deepcopy(self.unpacked(), memo))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def can_pack(model: Any) -> bool:
    """Whether `pack_linears` applies: bf16 weights on a CPU whose oneDNN runs bf16 (AVX512-BF16 / AMX
    or an emulation of them that PyTorch's own bf16 matmuls use too)."""
    return (
        torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        and all(p.device.type == "cpu" for p in model.parameters())
        and any(_packable(m) for m in model.modules())
    )


def pack_linears(model: Any) -> int:
    """Replace every bf16 `nn.Linear` of an inference model on a CPU by a `PackedLinear`, in place (inside
    peft's LoRA layers too: their base layer); fp32 layers (head, LoRA matrices) stay as they are.
    Returns how many were packed."""
    return _swap(model, _packable, PackedLinear)


def unpack_linears(model: Any) -> int:
    """Undo `pack_linears`, in place: plain `nn.Linear` layers with the same weights."""
    return _swap(model, lambda m: isinstance(m, PackedLinear), lambda m: m.unpacked())


def _packable(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.weight.dtype == torch.bfloat16


def _swap(model: nn.Module, match: Any, replace: Any) -> int:
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if match(child)
    ]
    for parent, name, child in targets:
        setattr(parent, name, replace(child))
    return len(targets)
