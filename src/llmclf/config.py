"""Run configuration: small typed dataclasses, a YAML overlay of the same fields, and validation.

A run is configured in three layers, each overriding the one before: the defaults below (llmclf's
recipe for small data, chosen by measurement: see docs/performance.md, "Why these defaults"), a YAML file (`--config`),
and command-line flags. The YAML file has one mapping per section:

    data:  {path: news.csv, text_column: text, label_column: label, train_per_class: 200}
    model: {name: smollm2-135m, quantize: auto}
    lora:  {r: 16, alpha: 8}
    train: {epochs: 1, lr: 1.0e-4}
    output: runs/news

`preset: recipe` (or `--preset recipe`) starts from the recipe's own settings (README) instead of llmclf's
defaults; the file and flags still override it.
The resolved configuration is saved as `config.yaml` next to every trained model.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmclf.errors import LlmclfError

QUANTIZE_CHOICES = ("auto", "4bit", "none")
CLASS_WEIGHT_CHOICES = ("auto", "none")
ACTIVATION_CACHE_CHOICES = ("memory", "disk", "off")
HEAD_INIT_CHOICES = ("probe", "random")
LEXICAL_CHOICES = ("auto", "off")
SCHEDULER_CHOICES = ("linear", "cosine", "constant")
PRECISION_CHOICES = ("auto", "bf16", "fp16", "fp32")
ATTN_CHOICES = ("auto", "sdpa", "flash_attention_2", "eager")
POOLING_CHOICES = ("auto", "last", "mean")
TASK_CHOICES = ("single-label", "multi-label", "regression")
AUTO_EPOCH_STEPS = 80  # train.epochs auto: the optimizer steps to reach
AUTO_MAX_EPOCHS = 8
SINGLE_LABEL, MULTI_LABEL, REGRESSION = TASK_CHOICES


def _require(ok: bool, key: str, found: Any, allowed: str) -> None:
    if not ok:
        raise LlmclfError(f"Invalid config value {key}={found!r}: allowed values are {allowed}.")


def _positive_int_or_none(section: str, name: str, value: Any) -> None:
    _require(
        value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0),
        f"{section}.{name}",
        value,
        "a whole number > 0, or empty",
    )


def _number(section: str, name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and (low < value if low_open else low <= value) and value <= high
    bracket = "(" if low_open else "["
    _require(ok, f"{section}.{name}", value, f"a number in {bracket}{low}, {high}]")


@dataclass
class DataConfig:
    """Where the labelled texts come from and how they are split."""

    path: str = "demo"
    """CSV / TSV / JSONL / Parquet file, a folder written by `datasets.save_to_disk`, a Hugging Face
    dataset name, or `demo` for the bundled news-topic demo data."""
    text_column: str = "text"
    """Column holding the input text; a dotted name (`ticket.body`) reaches into nested JSON objects."""
    label_column: str = "label"
    """Column holding the class label (strings or integers; names are kept); dotted names work too."""
    label_separator: str = ","
    """Under task=multi-label: what joins a text's labels in the label column (`sports,politics`); a
    JSONL or Parquet column may hold lists of labels instead."""
    text_pair_column: str | None = None
    """Column holding a second text per row (a hypothesis, an answer, a duplicate candidate): the two
    go to the tokenizer as a pair, the model's own separator or a line break between them. Empty: one
    text per row."""
    eval_data: str | None = None
    """A separate labelled file used as the test split (same columns)."""
    train_per_class: int | None = None
    """Examples sampled per class for training (the recipe's sampling). Empty: use fractions."""
    val_per_class: int | None = None
    """Examples sampled per class for validation."""
    test_per_class: int | None = None
    """Examples sampled per class for the test split."""
    val_fraction: float = 0.1
    """Share of each class for validation when no per-class sizes are given."""
    test_fraction: float = 0.1
    """Share of each class for the test split when no per-class sizes are given."""
    max_length: int = 512
    """Tokens per text; longer texts are truncated (and counted)."""
    drop_invalid: bool = False
    """Drop rows with an empty text or a missing label (and say how many) instead of stopping."""

    def __post_init__(self) -> None:
        _require(
            isinstance(self.path, str) and self.path.strip() != "", "data.path", self.path, "a path or name"
        )
        for name in ("train_per_class", "val_per_class", "test_per_class"):
            _positive_int_or_none("data", name, getattr(self, name))
        _number("data", "val_fraction", self.val_fraction, 0.0, 0.5)
        _number("data", "test_fraction", self.test_fraction, 0.0, 0.5)
        _positive_int_or_none("data", "max_length", self.max_length)
        _require(
            isinstance(self.label_separator, str) and self.label_separator.strip() != "",
            "data.label_separator",
            self.label_separator,
            "one or more characters that are not all spaces",
        )
        if self.text_pair_column is not None:
            _require(
                isinstance(self.text_pair_column, str)
                and self.text_pair_column.strip() != ""
                and self.text_pair_column not in (self.text_column, self.label_column),
                "data.text_pair_column",
                self.text_pair_column,
                "a column name other than the text and label columns",
            )
        if self.train_per_class is None and (self.val_per_class or self.test_per_class):
            raise LlmclfError(
                "data.val_per_class / data.test_per_class need data.train_per_class as well: "
                "give all per-class sizes, or none and use the fractions."
            )


PROMPT_PLACEHOLDER = "{text}"
PROMPT_TEMPLATES: dict[str, str | None] = {
    "none": None,
    "sentence": 'This sentence : "{text}" means in one word:"',
}
"""Named prompt templates: `sentence` is PromptEOL's (Jiang et al. 2023, "Scaling Sentence Embeddings
with Large Language Models"); `none` feeds the text as it is."""


@dataclass
class ModelConfig:
    """Which model to fine-tune and how to load it."""

    name: str = "smollm2-135m"
    """`smollm2-135m` (embedded default), a local folder, a `.gguf` file, or a Hugging Face hub id."""
    quantize: str = "auto"
    """`auto`: 4-bit NF4 on a CUDA GPU with bitsandbytes, full precision otherwise; `4bit`; `none`."""
    trust_remote_code: bool = False
    """Allow model code from the hub: it runs arbitrary Python, so only for authors you trust."""
    precision: str = "auto"
    """Compute precision: `auto` = bf16 on GPUs that support it, fp16 on older CUDA GPUs; on a CPU bf16
    where it has native bf16 and a timed matmul runs faster in it, else fp32; or `bf16`, `fp16`, `fp32`.
    Sets the Trainer's mixed precision and the 4-bit compute dtype."""
    attn_implementation: str = "auto"
    """Attention kernel: `auto` = flash_attention_2 on CUDA when flash-attn is installed (bf16/fp16),
    else sdpa; or `sdpa`, `flash_attention_2`, `eager`."""
    prompt_template: str = "auto"
    """Frame every text in a prompt before the model reads it: `sentence` (`This sentence : "{text}" means
    in one word:"`, whose last token sums the text up), `none`, or your own template holding {text} once;
    `auto`: `sentence` for decoders, `none` for encoders (which pool their own first token). Written into
    the saved tokenizer, so the exported model frames texts alike."""
    feature_layer: int | str = "auto"
    """The decoder layer whose output the head reads: `auto` = the layer whose state a cross-validated
    probe on the training texts scores best (every second layer of the top two thirds), `last`, or a
    layer number (1 = the first). The layers above it are not trained, run, saved or exported. Encoders
    read their own pooling of the last layer."""
    pooling: str = "auto"
    """What a decoder's head reads of that layer's output: `last` (the last real token, the model's own),
    `mean` (the mean over the text's tokens), or `auto`: whichever scores best in the feature layer's
    cross-validated probe (the last token where no layer is scored). Encoders read their own pooling."""
    allow_pickle: bool = False
    """Allow a base model with pickle weights only (`pytorch_model.bin`), read with
    `torch.load(weights_only=True)`; otherwise safetensors only."""

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and self.name.strip() != "", "model.name", self.name, "a model")
        _require(
            self.quantize in QUANTIZE_CHOICES, "model.quantize", self.quantize, ", ".join(QUANTIZE_CHOICES)
        )
        _require(
            self.precision in PRECISION_CHOICES,
            "model.precision",
            self.precision,
            ", ".join(PRECISION_CHOICES),
        )
        _require(
            isinstance(self.prompt_template, str)
            and (
                self.prompt_template in (*PROMPT_TEMPLATES, "auto")
                or self.prompt_template.count(PROMPT_PLACEHOLDER) == 1
            ),
            "model.prompt_template",
            self.prompt_template,
            f"auto, {', '.join(PROMPT_TEMPLATES)}, or a template holding {PROMPT_PLACEHOLDER} exactly once",
        )
        if isinstance(self.feature_layer, str) and self.feature_layer.strip().isdecimal():  # "²" is a digit
            self.feature_layer = int(self.feature_layer)
        _require(
            self.feature_layer in ("auto", "last")
            or (isinstance(self.feature_layer, int) and not isinstance(self.feature_layer, bool))
            and self.feature_layer > 0,
            "model.feature_layer",
            self.feature_layer,
            "auto, last, or a layer number from 1",
        )
        _require(self.pooling in POOLING_CHOICES, "model.pooling", self.pooling, ", ".join(POOLING_CHOICES))
        _require(
            self.attn_implementation in ATTN_CHOICES,
            "model.attn_implementation",
            self.attn_implementation,
            ", ".join(ATTN_CHOICES),
        )


@dataclass
class LoraSettings:
    """LoRA adapter shape and placement."""

    r: int = 16
    """Rank of the low-rank update."""
    alpha: float = 32
    """Scaling numerator: the update is scaled by alpha / r (the recipe: 8)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    targets: list[str] | str = "all-linear"
    """Module names to adapt (a list, or comma-separated); `all-linear` = every linear layer of the adapted blocks (attention and
    MLP); `auto` = q/k/v/o projections where the model has them (the recipe; else peft's default for
    the architecture)."""
    layers: int | str | None = "auto"
    """Adapt only the top N decoder layers. The frozen layers below run once per text and their output
    is cached (see train.activation_cache). `auto`, for the decoder families the cache supports: the top
    fifth (6 of SmolLM2's 30 layers) on a training split of 100,000 tokens or more, deeper on a shorter
    one (adapted share x training tokens = 20,000, at most the top half), so a step's compute stays
    about the same; every layer otherwise. `all` (or empty): every layer."""

    def __post_init__(self) -> None:
        _positive_int_or_none("lora", "r", self.r)
        _number("lora", "alpha", self.alpha, 0.0, 1e6, low_open=True)
        _number("lora", "dropout", self.dropout, 0.0, 0.9)
        if isinstance(self.targets, str) and "," in self.targets:
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        ok = (isinstance(self.targets, str) and self.targets != "") or (
            isinstance(self.targets, list) and self.targets and all(isinstance(t, str) for t in self.targets)
        )
        _require(ok, "lora.targets", self.targets, "auto, all-linear, or a list of module names")
        if self.layers == "all":
            self.layers = None
        if self.layers != "auto":
            _positive_int_or_none("lora", "layers", self.layers)


@dataclass
class TrainConfig:
    """Optimisation settings."""

    epochs: float | str = 1.0
    """Passes over the training split. `auto`: enough passes for about 80 optimizer steps, at least 1 and
    at most 8 (one over 1,280 texts or more at batch 16, six over 223), chosen once the training split is
    known and saved resolved; with a validation split the best epoch's weights are kept. Not the default:
    on the suite's two datasets of a few hundred texts it did not beat one pass (docs/accuracy.md)."""
    lr: float = 5e-4
    """Peak learning rate (the recipe: 1e-4)."""
    batch_size: int = 16
    """Training examples per step (the recipe: 8)."""
    eval_batch_size: int | str = "auto"
    """Texts per forward pass when evaluating and predicting (length-sorted batches). `auto`: 32 on CPU;
    on a GPU as many as fit 16,384 padded tokens (a GPU pass costs about the same for 32 short texts as
    for hundreds, so bigger batches pay there)."""
    step_tokens: int | str | None = "auto"
    """Most padded tokens one forward/backward pass holds: a training batch with more runs in parts
    (its rows sorted by length, each part padded to its own longest) whose gradients add up to the
    batch's: the same step, with less memory and less padding. `auto`: 1,024 on CPU, 16,384 on a GPU;
    empty: batches stay whole."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    class_weights: str = "auto"
    """`auto`: inverse class frequency, normalised, in the cross-entropy; `none`: plain cross-entropy."""
    seed: int = 42
    """Seed for sampling, shuffling, initialisation and dropout."""
    report_to: str = "none"
    """Trainer logging integrations: `none`, `all`, or comma-separated names (`tensorboard`, `wandb`, ...)."""
    lr_scheduler: str = "linear"
    """Learning-rate schedule after warm-up: `linear` decay to 0, `cosine`, or `constant`."""
    warmup_ratio: float = 0.1
    """Share of the training steps spent warming the learning rate up from 0."""
    head_init: str = "probe"
    """`probe`: start the head from a logistic regression fitted on the frozen model's features of the
    training split (nearly free with the activation cache); `random`: transformers' random head."""
    lexical: str = "auto"
    """`auto`: also fit TF-IDF (word 1-2-grams and character 2-5-grams) + logistic regression on the
    training split and mix its log-probabilities with the model's, with weight 0.4 (dropped where the
    validation split shows the mix clearly worse than the model alone; single-label tasks only, as it
    mixes class probabilities); `off`: the model alone."""
    activation_cache: str = "memory"
    """Where the frozen layers' outputs are kept when only the top layers are adapted (lora.layers):
    `memory`, also on `disk` (bf16, reused by later runs on the same model and texts), or `off` (run the
    whole model every step)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (non-reentrant): less memory, slower steps."""
    save_steps: int | None = None
    """Also write a checkpoint every this many optimizer steps (for `--resume` mid-epoch). Empty: each
    epoch only."""
    eval_steps: int | None = None
    """Validate every this many optimizer steps as well as at each epoch's end, with a checkpoint at each
    validation so that the best can be kept (train.save_steps still adds checkpoints in between). Empty:
    once per epoch. Needs a validation split."""
    early_stopping_patience: int | None = None
    """Stop when the validation balanced accuracy (regression: MSE) has not improved for this many
    validations in a row (each epoch, or every train.eval_steps) and keep the best validation's weights;
    train.epochs stays the upper bound. Needs a validation split. Empty: train for all the epochs."""
    keep_checkpoint: bool = False
    """Keep the newest checkpoint after a successful run (by default all checkpoints are deleted)."""

    def epochs_for(self, train_texts: int) -> float:
        """The passes to make over `train_texts` training texts: `epochs` as set, or its `auto` rule."""
        if self.epochs != "auto":
            return self.epochs
        steps_per_epoch = max(1, math.ceil(train_texts / self.batch_size))
        return float(min(AUTO_MAX_EPOCHS, max(1, math.ceil(AUTO_EPOCH_STEPS / steps_per_epoch))))

    def __post_init__(self) -> None:
        if self.epochs != "auto":
            _number("train", "epochs", self.epochs, 0.0, 1000.0, low_open=True)
        _number("train", "lr", self.lr, 0.0, 1.0, low_open=True)
        _positive_int_or_none("train", "batch_size", self.batch_size)
        if self.eval_batch_size != "auto":
            _positive_int_or_none("train", "eval_batch_size", self.eval_batch_size)
        if self.step_tokens != "auto":
            _positive_int_or_none("train", "step_tokens", self.step_tokens)
        _number("train", "weight_decay", self.weight_decay, 0.0, 1.0)
        _require(
            self.class_weights in CLASS_WEIGHT_CHOICES,
            "train.class_weights",
            self.class_weights,
            ", ".join(CLASS_WEIGHT_CHOICES),
        )
        for key, choices in (
            ("lr_scheduler", SCHEDULER_CHOICES),
            ("head_init", HEAD_INIT_CHOICES),
            ("lexical", LEXICAL_CHOICES),
            ("activation_cache", ACTIVATION_CACHE_CHOICES),
        ):
            value = getattr(self, key)
            _require(value in choices, f"train.{key}", value, ", ".join(choices))
        _number("train", "warmup_ratio", self.warmup_ratio, 0.0, 0.5)
        _positive_int_or_none("train", "save_steps", self.save_steps)
        _require(
            isinstance(self.keep_checkpoint, bool),
            "train.keep_checkpoint",
            self.keep_checkpoint,
            "true, false",
        )
        _require(
            isinstance(self.seed, int) and not isinstance(self.seed, bool),
            "train.seed",
            self.seed,
            "an integer",
        )
        _require(
            isinstance(self.gradient_checkpointing, bool),
            "train.gradient_checkpointing",
            self.gradient_checkpointing,
            "true or false",
        )
        report_to_list(self.report_to)  # names transformers knows; installed-ness is checked at training
        _positive_int_or_none("train", "eval_steps", self.eval_steps)
        _positive_int_or_none("train", "early_stopping_patience", self.early_stopping_patience)


@dataclass
class RunConfig:
    """Everything one `llmclf train` run needs."""

    data: DataConfig = field(default_factory=DataConfig)
    """Input data and splitting."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model and loading."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapter."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    output: str = "runs/latest"
    """Run folder to write (config, labels, adapter, metrics, predictions)."""
    task: str = SINGLE_LABEL
    """`single-label`: one class per text, from the label column's names; `multi-label`: any number of
    labels per text (joined by data.label_separator, or lists), each decided by its own sigmoid and a
    threshold tuned on the validation split; `regression`: one number per text (a rating, a score), the
    label column holding numbers, trained with mean squared error on targets divided by their standard
    deviation and reported in the column's own units."""

    def __post_init__(self) -> None:
        _require(self.task in TASK_CHOICES, "task", self.task, ", ".join(TASK_CHOICES))
        if self.task != SINGLE_LABEL and self.data.train_per_class is not None:
            raise LlmclfError(
                f"task={self.task} has no classes to sample per class: leave data.train_per_class / "
                "val_per_class / test_per_class out and split by data.val_fraction / data.test_fraction."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


CONFIG_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "lora": LoraSettings,
    "train": TrainConfig,
}


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring (the string right below it in the class body), read from the
    source with `ast`, indentation cleaned: the one text behind `llmclf train --help` and the docs.
    Empty where the source cannot be read (a build without .py files)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


PRESETS: dict[str, dict[str, Any]] = {
    "recipe": {
        "lora": {"r": 16, "alpha": 8, "dropout": 0.05, "targets": "auto", "layers": "all"},
        "train": {
            "epochs": 1.0,
            "lr": 1e-4,
            "batch_size": 8,
            "weight_decay": 0.01,
            "lr_scheduler": "linear",
            "warmup_ratio": 0.0,
            "head_init": "random",
            "lexical": "off",
        },
        "model": {"prompt_template": "none", "feature_layer": "last", "pooling": "last"},
    },
}
"""Named sets of values under the YAML file and flags. `recipe`: the hand-made recipe llmclf productises
(r 16, alpha 8, q/k/v/o, lr 1e-4, batch 8, one epoch, every layer, a random head, no lexical part)."""


def build_config(overlay: dict[str, Any] | None = None) -> RunConfig:
    """Defaults ← preset (if `preset` names one) ← a nested dict of the same shape as the YAML file."""
    overlay = dict(overlay or {})
    preset = overlay.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise LlmclfError(
                f"Invalid config value preset={preset!r}: allowed values are {', '.join(PRESETS)}."
            )
        overlay = merge(PRESETS[preset], overlay)
    top_level = {"output", "task"}
    unknown = set(overlay) - set(CONFIG_SECTIONS) - top_level
    if unknown:
        raise LlmclfError(
            f"Unknown config section(s) {sorted(unknown)}: allowed are {sorted(CONFIG_SECTIONS) + sorted(top_level)}."
        )
    sections: dict[str, Any] = {}
    for name, cls in CONFIG_SECTIONS.items():
        values = overlay.get(name) or {}
        if not isinstance(values, dict):
            raise LlmclfError(
                f"Config section '{name}' must be a mapping of keys to values, found {values!r}."
            )
        bad = set(values) - set(field_names(cls))
        if bad:
            raise LlmclfError(
                f"Unknown key(s) {sorted(bad)} in config section '{name}': allowed are {field_names(cls)}."
            )
        sections[name] = cls(**values)
    output = overlay.get("output", RunConfig.output)
    if not isinstance(output, str) or not output:
        raise LlmclfError(f"Invalid config value output={output!r}: allowed values are a folder path.")
    return RunConfig(output=output, task=overlay.get("task", RunConfig.task), **sections)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise LlmclfError(f"Config file not found: {p}. Give the path of a YAML file (see examples/).")
    return parse_yaml(p.read_text(encoding="utf-8"), p)


def parse_yaml(text: str, source: str | Path) -> dict[str, Any]:
    """A config file's mapping; `source` names the file in errors."""
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise LlmclfError(f"Config file {source} is not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise LlmclfError(
            f"Config file {source} must hold a mapping with sections data/model/lora/train/output."
        )
    return loaded


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge two nested dicts; values in `override` win, sections merge key by key."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults ← YAML file ← overrides (e.g. command-line flags)."""
    base = read_yaml(path) if path else {}
    return build_config(merge(base, overrides or {}))


EXTRAS = {"tensorboard": "pip install 'llmclf[tensorboard]'"}


def report_to_list(value: str | list[str], *, require_installed: bool = False) -> list[str]:
    """`train.report_to` as the list of Trainer integrations it names, or an error naming the fix.

    Accepts `none`, `all`, one name or a comma-separated list of the names transformers knows. With
    `require_installed` (at training time, not when a saved config is read elsewhere) each named
    integration's package must be importable.
    """
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    if names in ([], ["none"]):
        return []
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    if names == ["all"]:
        return get_available_reporting_integrations() if require_installed else ["all"]
    known = sorted(INTEGRATION_TO_CALLBACK)
    unknown = [n for n in names if n not in INTEGRATION_TO_CALLBACK]
    if unknown:
        raise LlmclfError(
            f"Invalid config value train.report_to={value!r}: {unknown} not known to transformers. Allowed: "
            f"none, all, or a comma-separated list of {', '.join(known)}."
        )
    if require_installed:
        available = set(get_available_reporting_integrations())
        absent = [n for n in names if n not in available]
        if absent:
            how = "; ".join(EXTRAS.get(n, f"pip install {n}") for n in absent)
            raise LlmclfError(
                f"--report-to {','.join(absent)}: the package is not installed. Install it: {how}"
            )
    return names
