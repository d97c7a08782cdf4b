"""The `llmclf train` flags, generated from the config dataclasses (llmclf.config), the one source of
their names, types, defaults and help texts.

Each config field `section.field` becomes `--field` (underscores as dashes; `--section-field` where two
sections share a field name) unless FLAG_NAMES keeps an older spelling. Its help is the field's
docstring (`config.field_docs`), its default the dataclass default (shown by argparse), its type read
from the annotation (CONVERTERS for the few that take words as well as numbers), its choices the
config's *_CHOICES. A flag not given leaves the value to the YAML file, the preset or the default: the
parser records which flags were given (`train_overrides` returns only those).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import typing
from dataclasses import dataclass
from typing import Any

from llmclf.config import (
    ACTIVATION_CACHE_CHOICES,
    ATTN_CHOICES,
    CLASS_WEIGHT_CHOICES,
    CONFIG_SECTIONS,
    HEAD_INIT_CHOICES,
    LEXICAL_CHOICES,
    POOLING_CHOICES,
    PRECISION_CHOICES,
    QUANTIZE_CHOICES,
    SCHEDULER_CHOICES,
    TASK_CHOICES,
    RunConfig,
    field_docs,
)


def number_or_words(kind: type, number: str, *words: str) -> Any:
    """An argparse type: a `kind` (int or float) or one of `words`; `number` names it in the error."""
    expected = (
        f"{number}, {', '.join(words[:-1])} or {words[-1]}" if len(words) > 1 else f"{number} or {words[0]}"
    )

    def convert(value: str) -> Any:
        if value in words:
            return value
        try:
            return kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, found {value!r}") from None

    return convert


FLAG_NAMES = {
    "data.path": "--data",
    "model.name": "--model",
    "lora.r": "--lora-r",
    "lora.alpha": "--lora-alpha",
    "lora.dropout": "--lora-dropout",
    "lora.targets": "--lora-targets",
    "lora.layers": "--lora-layers",
}
"""Flags spelt otherwise than generated (`--field`), as users have always typed them."""

CONVERTERS: dict[str, Any] = {
    "lora.targets": str,  # comma-separated; the config splits it
    "lora.layers": number_or_words(int, "a whole number", "auto", "all"),
    "model.feature_layer": number_or_words(int, "a layer number", "auto", "last"),
    "train.epochs": number_or_words(float, "a number", "auto"),
    "train.eval_batch_size": number_or_words(int, "a whole number", "auto"),
    "train.step_tokens": number_or_words(int, "a whole number", "auto"),
}
"""argparse types of the fields whose annotation is not one plain type (with or without None)."""

CHOICES: dict[str, tuple[str, ...]] = {
    "model.quantize": QUANTIZE_CHOICES,
    "model.precision": PRECISION_CHOICES,
    "model.attn_implementation": ATTN_CHOICES,
    "model.pooling": POOLING_CHOICES,
    "train.class_weights": CLASS_WEIGHT_CHOICES,
    "train.lr_scheduler": SCHEDULER_CHOICES,
    "train.head_init": HEAD_INIT_CHOICES,
    "train.lexical": LEXICAL_CHOICES,
    "train.activation_cache": ACTIVATION_CACHE_CHOICES,
    "task": TASK_CHOICES,
}

YAML_ONLY: dict[str, str] = {}
"""Config keys without a flag, each with the reason; today every field has one."""

GROUPS = {"data": "data", "model": "model", "lora": "LoRA", "train": "training", None: "task and output"}
"""Titles of `llmclf train --help`'s sections, by config section (None: RunConfig's own fields)."""

GIVEN = "_train_flags_given"
"""Namespace attribute naming the dests of the train flags given on the command line."""


@dataclass(frozen=True)
class TrainFlag:
    """One config field's flag."""

    flag: str
    section: str | None  # None: a top-level field of RunConfig (`output`)
    name: str
    kind: Any  # argparse type, or bool for a --x/--no-x switch
    choices: tuple[str, ...] | None
    default: Any
    doc: str

    @property
    def key(self) -> str:
        """The config key, also the argparse dest: `train.lr`, `output`."""
        return f"{self.section}.{self.name}" if self.section else self.name


def _fields() -> list[tuple[str | None, dataclasses.Field, str]]:
    """(section, field, docstring) of every config field, sections in order, then RunConfig's own."""
    out = []
    for section, cls in CONFIG_SECTIONS.items():
        docs = field_docs(cls)
        out += [(section, f, docs.get(f.name, "")) for f in dataclasses.fields(cls)]
    docs = field_docs(RunConfig)
    out += [
        (None, f, docs.get(f.name, ""))
        for f in dataclasses.fields(RunConfig)
        if f.name not in CONFIG_SECTIONS
    ]
    return out


def _kind(key: str, hint: Any) -> Any:
    if key in CONVERTERS:
        return CONVERTERS[key]
    types = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    if len(types) == 1 and types[0] in (str, int, float, bool):
        return types[0]
    raise TypeError(f"config field {key}: no command-line type for {hint}; add it to CONVERTERS or YAML_ONLY")


@functools.cache
def train_flags() -> tuple[TrainFlag, ...]:
    """Every config field's flag, in the config's order."""
    fields = [(s, f, d) for s, f, d in _fields() if (f"{s}.{f.name}" if s else f.name) not in YAML_ONLY]
    generated = [f"--{f.name.replace('_', '-')}" for _, f, _ in fields]
    flags = []
    for (section, fld, doc), name in zip(fields, generated):
        key = f"{section}.{fld.name}" if section else fld.name
        if generated.count(name) > 1:
            name = f"--{section}-{fld.name.replace('_', '-')}"
        cls = CONFIG_SECTIONS[section] if section else RunConfig
        kind = _kind(key, typing.get_type_hints(cls)[fld.name])
        flag = FLAG_NAMES.get(key, name)
        flags.append(TrainFlag(flag, section, fld.name, kind, CHOICES.get(key), fld.default, doc))
    return tuple(flags)


def help_text(flag: TrainFlag) -> str:
    """The field's docstring on one line, config keys it mentions (`train.epochs`) as their flags, and
    the default as argparse shows it."""
    flags = {f.key: f.flag for f in train_flags()}
    text = re.sub(
        r"\b[a-z]+\.[a-z_]+\b", lambda m: flags.get(m.group(0), m.group(0)), " ".join(flag.doc.split())
    )
    text = text.replace("%", "%%")
    return text if flag.default is None else f"{text} (default %(default)s)"


def _mark(namespace: argparse.Namespace, dest: str) -> None:
    setattr(namespace, GIVEN, getattr(namespace, GIVEN, frozenset()) | {dest})


class _Store(argparse.Action):
    """Store the value and record that the flag was given."""

    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None
    ) -> None:
        setattr(namespace, self.dest, values)
        _mark(namespace, self.dest)


class StoreConst(argparse.Action):
    """store_const that records that the flag was given (--bf16, --fp16)."""

    def __init__(self, option_strings: list[str], dest: str, const: Any, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, const=const, **kwargs)

    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None
    ) -> None:
        setattr(namespace, self.dest, self.const)
        _mark(namespace, self.dest)


class _Switch(argparse.BooleanOptionalAction):
    """--x / --no-x that records that it was given; the help as written on every Python (3.10 appends
    its own default text)."""

    def __init__(self, *args: Any, help: str | None = None, **kwargs: Any) -> None:  # noqa: A002
        super().__init__(*args, **kwargs)
        self.help = help

    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None
    ) -> None:
        super().__call__(parser, namespace, values, option_string)
        _mark(namespace, self.dest)


def add_train_flags(p: argparse.ArgumentParser) -> dict[str | None, Any]:
    """Add every config field's flag to `p`, in one argument group per config section (described by the
    section's docstring); returns the groups by section, None for the output group."""
    groups: dict[str | None, Any] = {}
    for section, title in GROUPS.items():
        cls = CONFIG_SECTIONS.get(section) if section else None
        groups[section] = p.add_argument_group(title, " ".join((cls.__doc__ or "").split()) if cls else None)
    for flag in train_flags():
        group, text = groups[flag.section], help_text(flag)
        if flag.kind is bool:
            group.add_argument(flag.flag, dest=flag.key, action=_Switch, default=flag.default, help=text)
        else:
            group.add_argument(
                flag.flag,
                dest=flag.key,
                action=_Store,
                type=flag.kind,
                choices=flag.choices,
                default=flag.default,
                metavar=None if flag.choices else flag.flag[2:].upper().replace("-", "_"),
                help=text,
            )
    return groups


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given on the command line (and only those), as a nested dict shaped like the YAML file."""
    given = getattr(args, GIVEN, frozenset())
    out: dict[str, Any] = {}
    for flag in train_flags():
        if flag.key not in given:
            continue
        value = getattr(args, flag.key)
        if flag.section is None:
            out[flag.name] = value
        else:
            out.setdefault(flag.section, {})[flag.name] = value
    if getattr(args, "preset", None):
        out["preset"] = args.preset
    return out


def name_flags(message: str) -> str:
    """Add the command-line flag to a config error that names only its key (`train.lr=-1.0` → `--lr`)."""
    for flag in train_flags():
        if f"Invalid config value {flag.key}=" in message:
            return f"{message.rstrip('.')} (flag {flag.flag}, or key {flag.key} in the --config file)."
    return message
