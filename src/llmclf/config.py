"""Run configuration: small typed dataclasses, a YAML overlay of the same fields, and validation.

A run is configured in three layers, each overriding the one before: the defaults below (the recipe's
settings), a YAML file (`--config`), and command-line flags. The YAML file has one mapping per section:

    data:  {path: news.csv, text_column: text, label_column: label, train_per_class: 200}
    model: {name: smollm2-135m, quantize: auto}
    lora:  {r: 16, alpha: 8}
    train: {epochs: 1, lr: 1.0e-4}
    output: runs/news

The resolved configuration is saved as `config.yaml` next to every trained model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmclf.errors import LlmclfError

QUANTIZE_CHOICES = ("auto", "4bit", "none")
CLASS_WEIGHT_CHOICES = ("auto", "none")


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
    """Column holding the input text."""
    label_column: str = "label"
    """Column holding the class label (strings or integers; names are kept)."""
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
        if self.train_per_class is None and (self.val_per_class or self.test_per_class):
            raise LlmclfError(
                "data.val_per_class / data.test_per_class need data.train_per_class as well: "
                "give all per-class sizes, or none and use the fractions."
            )


@dataclass
class ModelConfig:
    """Which model to fine-tune and how to load it."""

    name: str = "smollm2-135m"
    """`smollm2-135m` (embedded default), a local folder, a `.gguf` file, or a Hugging Face hub id."""
    quantize: str = "auto"
    """`auto`: 4-bit NF4 on a CUDA GPU with bitsandbytes, full precision otherwise; `4bit`; `none`."""
    trust_remote_code: bool = False
    """Allow model code from the hub. Off by default: it runs arbitrary Python."""
    allow_pickle: bool = False
    """Allow a base model with pickle weights only (`pytorch_model.bin`), read with
    `torch.load(weights_only=True)`. Off by default: safetensors only."""

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and self.name.strip() != "", "model.name", self.name, "a model")
        _require(
            self.quantize in QUANTIZE_CHOICES, "model.quantize", self.quantize, ", ".join(QUANTIZE_CHOICES)
        )


@dataclass
class LoraSettings:
    """LoRA adapter shape (the recipe's defaults)."""

    r: int = 16
    """Rank of the low-rank update."""
    alpha: float = 8
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    targets: list[str] | str = "auto"
    """Module names to adapt; `auto` = q/k/v/o projections where the model has them (else peft's
    default for the architecture); `all-linear` = every linear layer."""

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


@dataclass
class TrainConfig:
    """Optimisation settings (the recipe's defaults)."""

    epochs: float = 1.0
    """Passes over the training split."""
    lr: float = 1e-4
    """Peak learning rate."""
    batch_size: int = 8
    """Training examples per step."""
    eval_batch_size: int = 32
    """Examples per forward pass when evaluating and predicting."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    class_weights: str = "auto"
    """`auto`: inverse class frequency, normalised, in the cross-entropy; `none`: plain cross-entropy."""
    seed: int = 42
    """Seed for sampling, shuffling, initialisation and dropout."""
    report_to: str = "none"
    """Trainer logging integration (`tensorboard`, `wandb`, ...), `none` by default."""
    save_steps: int | None = None
    """Also write a checkpoint every this many optimizer steps (for `--resume` mid-epoch). Empty: each
    epoch only."""
    keep_checkpoint: bool = False
    """Keep the newest checkpoint after a successful run (by default all checkpoints are deleted)."""

    def __post_init__(self) -> None:
        _number("train", "epochs", self.epochs, 0.0, 1000.0, low_open=True)
        _number("train", "lr", self.lr, 0.0, 1.0, low_open=True)
        _positive_int_or_none("train", "batch_size", self.batch_size)
        _positive_int_or_none("train", "eval_batch_size", self.eval_batch_size)
        _number("train", "weight_decay", self.weight_decay, 0.0, 1.0)
        _require(
            self.class_weights in CLASS_WEIGHT_CHOICES,
            "train.class_weights",
            self.class_weights,
            ", ".join(CLASS_WEIGHT_CHOICES),
        )
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "lora": LoraSettings,
    "train": TrainConfig,
}


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def build_config(overlay: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, overlaid with a nested dict of the same shape as the YAML file."""
    overlay = dict(overlay or {})
    unknown = set(overlay) - set(SECTIONS) - {"output"}
    if unknown:
        raise LlmclfError(
            f"Unknown config section(s) {sorted(unknown)}: allowed are {sorted(SECTIONS) + ['output']}."
        )
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
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
    return RunConfig(output=output, **sections)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise LlmclfError(f"Config file not found: {p}. Give the path of a YAML file (see examples/).")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise LlmclfError(f"Config file {p} is not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise LlmclfError(f"Config file {p} must hold a mapping with sections data/model/lora/train/output.")
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


def config_from_saved(path: str | Path) -> RunConfig:
    """The resolved config saved in a run folder."""
    return build_config(read_yaml(path))
