"""The command line's parser: every subcommand's flags, and the train flags as config overrides."""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
from typing import Any

from llmclf.config import (
    ACTIVATION_CACHE_CHOICES,
    ATTN_CHOICES,
    CLASS_WEIGHT_CHOICES,
    HEAD_INIT_CHOICES,
    LEXICAL_CHOICES,
    PRECISION_CHOICES,
    PRESETS,
    QUANTIZE_CHOICES,
    SCHEDULER_CHOICES,
    RunConfig,
)
from llmclf.version import __version__


def int_or_auto(value: str) -> int | str:
    """argparse type of --eval-batch-size: a whole number or `auto`."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, found {value!r}") from None


def float_or_auto(value: str) -> float | str:
    """argparse type of serve --pass-overhead-tokens: a finite number >= 0 or `auto`."""
    if value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not 0 <= number < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number of 0 or more, or auto, found {value!r}")
    return number


def layers_value(value: str) -> int | str:
    """argparse type of --lora-layers: a whole number, `auto` or `all`."""
    if value in ("auto", "all"):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, auto or all, found {value!r}") from None


# flag, config section (None: top level), field, type, help
TRAIN_FLAGS: list[tuple[str, str | None, str, Any, str]] = [
    (
        "--data",
        "data",
        "path",
        str,
        "CSV/TSV/JSONL/Parquet file, datasets folder, hub dataset name, or 'demo'",
    ),
    (
        "--text-column",
        "data",
        "text_column",
        str,
        "column with the text; a dotted name (ticket.body) reaches into JSON objects",
    ),
    (
        "--label-column",
        "data",
        "label_column",
        str,
        "column with the label; dotted names reach into JSON objects too",
    ),
    ("--eval-data", "data", "eval_data", str, "separate labelled file used as the test split"),
    ("--train-per-class", "data", "train_per_class", int, "training examples sampled per class"),
    ("--val-per-class", "data", "val_per_class", int, "validation examples sampled per class"),
    ("--test-per-class", "data", "test_per_class", int, "test examples sampled per class"),
    ("--val-fraction", "data", "val_fraction", float, "share of each class for validation"),
    ("--test-fraction", "data", "test_fraction", float, "share of each class for test"),
    ("--max-length", "data", "max_length", int, "tokens per text; longer texts are truncated"),
    ("--model", "model", "name", str, "smollm2-135m (default), a local folder, a .gguf file, or a hub id"),
    ("--quantize", "model", "quantize", QUANTIZE_CHOICES, "auto: 4-bit NF4 on a CUDA GPU (default)"),
    (
        "--precision",
        "model",
        "precision",
        PRECISION_CHOICES,
        "auto: chosen for this machine: on a GPU bf16 where supported, else fp16; on a CPU bf16 where "
        "timed faster, else fp32",
    ),
    (
        "--attn-implementation",
        "model",
        "attn_implementation",
        ATTN_CHOICES,
        "auto: flash_attention_2 on CUDA if flash-attn is installed, else sdpa",
    ),
    ("--lora-r", "lora", "r", int, "LoRA rank"),
    ("--lora-alpha", "lora", "alpha", float, "LoRA alpha"),
    ("--lora-dropout", "lora", "dropout", float, "LoRA dropout"),
    (
        "--lora-targets",
        "lora",
        "targets",
        str,
        "all-linear (default), auto (q/k/v/o), or comma-separated module names",
    ),
    (
        "--lora-layers",
        "lora",
        "layers",
        layers_value,
        "adapt the top N layers only (the frozen rest runs once, cached); auto (default) or all",
    ),
    ("--epochs", "train", "epochs", float, "passes over the training data"),
    ("--lr", "train", "lr", float, "learning rate"),
    ("--batch-size", "train", "batch_size", int, "training batch size"),
    (
        "--eval-batch-size",
        "train",
        "eval_batch_size",
        int_or_auto,
        "inference batch: texts, or auto (default: 32 on CPU, up to 16384 tokens on a GPU)",
    ),
    (
        "--step-tokens",
        "train",
        "step_tokens",
        int_or_auto,
        "padded tokens per training pass; longer batches run in parts (default auto: 1024 on CPU)",
    ),
    ("--weight-decay", "train", "weight_decay", float, "AdamW weight decay"),
    ("--class-weights", "train", "class_weights", CLASS_WEIGHT_CHOICES, "auto: inverse frequency (default)"),
    ("--seed", "train", "seed", int, "random seed"),
    ("--lr-scheduler", "train", "lr_scheduler", SCHEDULER_CHOICES, "learning-rate schedule"),
    ("--warmup-ratio", "train", "warmup_ratio", float, "share of steps warming up the learning rate"),
    ("--head-init", "train", "head_init", HEAD_INIT_CHOICES, "probe: start the head from a linear probe"),
    (
        "--lexical",
        "train",
        "lexical",
        LEXICAL_CHOICES,
        "auto: mix in TF-IDF + LR in equal shares (off where validation shows it hurts); off: the model alone",
    ),
    (
        "--activation-cache",
        "train",
        "activation_cache",
        ACTIVATION_CACHE_CHOICES,
        "with --lora-layers: cache frozen-layer outputs in memory (default), also on disk, or off",
    ),
    (
        "--report-to",
        "train",
        "report_to",
        str,
        "Trainer logging integration, e.g. tensorboard",
    ),
    ("--save-steps", "train", "save_steps", int, "also checkpoint every N steps (default: each epoch)"),
    (
        "--eval-steps",
        "train",
        "eval_steps",
        int,
        "validate (and checkpoint) every N steps as well as each epoch (default: each epoch only)",
    ),
    (
        "--early-stopping-patience",
        "train",
        "early_stopping_patience",
        int,
        "stop after N validations without improvement, keeping the best; --epochs is the upper bound",
    ),
    ("--output", None, "output", str, "run folder to write"),
]
TRAIN_SWITCHES = [
    ("--drop-invalid", "data", "drop_invalid", "drop rows with empty text or missing label (counted)"),
    ("--trust-remote-code", "model", "trust_remote_code", "allow model code from the hub (runs Python)"),
    (
        "--gradient-checkpointing",
        "train",
        "gradient_checkpointing",
        "recompute activations: less memory, slower",
    ),
    (
        "--allow-pickle",
        "model",
        "allow_pickle",
        "allow pickle weights (pytorch_model.bin), weights_only load",
    ),
    ("--keep-checkpoint", "train", "keep_checkpoint", "keep the newest checkpoint after a successful run"),
]


def _dest(section: str | None, name: str) -> str:
    return f"{section}.{name}" if section else name


def _with_default(text: str, value: Any) -> str:
    """A flag's help with the config's own default appended, so that no hand-typed default goes stale
    (a help that explains its default in words, or a default of None, is left as written)."""
    if value is None or "default" in text:
        return text
    shown = (
        f"{value:g}" if isinstance(value, float) else ",".join(value) if isinstance(value, list) else value
    )
    return f"{text} (default {shown})"


def _add_train(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "train",
        parents=[common],
        help="fine-tune, evaluate before/after, save a run folder",
        description="Fine-tune a classifier. Flags override the --config file.",
    )
    p.add_argument("--config", help="YAML file with sections data/model/lora/train/output")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="start from named settings (recipe: the hand-made recipe's own) instead of llmclf's defaults",
    )
    defaults = RunConfig().to_dict()
    for flag, section, name, kind, text in TRAIN_FLAGS:
        text = _with_default(text, defaults[section][name] if section else defaults[name])
        if isinstance(kind, tuple):
            p.add_argument(flag, dest=_dest(section, name), choices=kind, default=None, help=text)
        else:
            p.add_argument(flag, dest=_dest(section, name), type=kind, default=None, help=text)
    for flag, section, name, text in TRAIN_SWITCHES:
        p.add_argument(
            flag, dest=_dest(section, name), action="store_const", const=True, default=None, help=text
        )
    # The Trainer's own spellings, as shortcuts: they set the same field as --precision.
    precision = p.add_mutually_exclusive_group()
    for flag in ("bf16", "fp16"):
        precision.add_argument(
            f"--{flag}",
            dest=_dest("model", "precision"),
            action="store_const",
            const=flag,
            default=None,
            help=f"same as --precision {flag}",
        )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        metavar="CHECKPOINT",
        help="continue the interrupted run in --output from its newest complete checkpoint, or from CHECKPOINT",
    )


def positive_int(value: str) -> int:
    """argparse type: a whole number > 0, so a bad value is a usage error before anything loads."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number > 0, found {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number > 0, found {number}")
    return number


def positive_int_or_auto(value: str) -> int | str:
    """argparse type of predict/evaluate --batch-size: a whole number > 0 or `auto`."""
    return value if value == "auto" else positive_int(value)


def add_loading_options(p: argparse.ArgumentParser) -> None:
    """How a run folder's base model is loaded: the caller's choices, never the folder's."""
    p.add_argument(
        "--base-model",
        default=None,
        help="your own copy of the base model the run was trained from (folder, .gguf, alias or hub id); "
        "checked to be the same model (default: the one the run recorded)",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the base model's or tokenizer's own Python code to run (only for authors you trust)",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow a base model with pickle weights only, read with torch.load(weights_only=True)",
    )


def add_precision_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default=None,
        help="compute precision of the loaded model (default: as the run was trained, or fp32 where this "
        "machine cannot run that; auto: chosen for this machine)",
    )


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    add_loading_options(p)
    add_precision_option(p)
    p.add_argument(
        "--batch-size",
        type=positive_int_or_auto,
        default=None,
        help="texts per forward pass, or auto (default: as in training)",
    )
    p.add_argument(
        "--max-length", type=positive_int, default=None, help="tokens per text (default: as in training)"
    )


def _add_predict(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("predict", parents=[common], help="label new texts with a trained run")
    p.add_argument("run_dir", help="run folder written by `llmclf train`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="CSV/TSV/JSONL/Parquet file to label")
    src.add_argument("--text", action="append", help="a text to label (repeatable); prints the result")
    p.add_argument("--output", help="file to write (format by extension); required with --input")
    p.add_argument("--text-column", default=None, help="text column of --input (default: as in training)")
    p.add_argument(
        "--prediction-column", default="label", help="name of the added label column (default label)"
    )
    p.add_argument(
        "--drop-invalid",
        action="store_true",
        help="leave rows with an empty text unlabelled (kept in the output, counted) instead of stopping",
    )
    _add_inference_options(p)


def _add_evaluate(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("evaluate", parents=[common], help="metrics of a trained run on a labelled file")
    p.add_argument("run_dir", help="run folder written by `llmclf train`")
    p.add_argument("--data", required=True, help="labelled CSV/TSV/JSONL/Parquet file")
    p.add_argument("--text-column", default=None, help="default: as in training")
    p.add_argument("--label-column", default=None, help="default: as in training")
    p.add_argument("--output", help="metrics JSON to write (default RUN_DIR/evaluation_<file>.json)")
    p.add_argument("--drop-invalid", action="store_true", help="drop rows with empty text or missing label")
    _add_inference_options(p)


def _add_export(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "export", parents=[common], help="write a standalone merged model for plain transformers"
    )
    p.add_argument("run_dir", help="run folder written by `llmclf train`")
    p.add_argument("--output", required=True, help="folder to write the merged model to")
    add_loading_options(p)


def _add_report(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("report", parents=[common], help="rebuild report.html/report.md of a run folder")
    p.add_argument("run_dir", help="run folder written by `llmclf train`")
    p.add_argument("--top", type=positive_int, default=10, help="confidently wrong examples to show (10)")


def _add_compare(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("compare", parents=[common], help="config differences and metrics of several runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by `llmclf train`")
    p.add_argument("--output", help="also write the table to this file (.md or .csv)")


def _add_serve(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[common], help="serve a trained run over HTTP (FastAPI, batching)")
    p.add_argument("run_dir", help="run folder written by `llmclf train`")
    add_loading_options(p)
    add_precision_option(p)
    # Defaults live in llmclf.serve.app.ServeOptions (None here: not given).
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port, 0 for any free one (default 8000)")
    for flag, default, text in [
        ("--max-batch-size", 32, "most rows per forward pass, merged across requests"),
        ("--max-texts", 64, "most texts per request (more: 413)"),
        ("--max-body-bytes", 1_048_576, "largest request body (more: 413)"),
        ("--max-queue", 256, "most rows waiting for a pass (more: 503 with Retry-After)"),
    ]:
        p.add_argument(flag, type=positive_int, help=f"{text} (default {default})")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        help="longest wait before a pass for the callers just answered to send again (default 10)",
    )
    p.add_argument(
        "--pass-overhead-tokens",
        type=float_or_auto,
        help="what a forward pass costs beyond its tokens, in tokens; rows of different lengths are "
        "split into passes where padding would cost more (default auto: timed by the warm-up)",
    )
    p.add_argument(
        "--max-length", type=positive_int, default=None, help="tokens per text (default: as trained)"
    )
    _add_serve_protection(p)


def _add_serve_protection(p: argparse.ArgumentParser) -> None:
    """serve's connection limits, timeouts and access control (defaults in ServeOptions)."""
    p.add_argument(
        "--max-connections",
        type=positive_int,
        help="most open connections served at once; a request on one more gets 503 (default 64)",
    )
    for flag, default, text in [
        ("--header-timeout-s", 10, "seconds a connection may take to send a request's headers"),
        ("--body-timeout-s", 30, "seconds a request's body may take to arrive (then 408)"),
        ("--graceful-timeout-s", 10, "on SIGTERM, seconds to wait for requests in flight"),
    ]:
        p.add_argument(flag, type=float, help=f"{text} (default {default})")
    p.add_argument(
        "--allowed-hosts",
        action="append",
        metavar="NAME[,NAME...]",
        help="host names clients may address the server by (the Host header), beyond localhost, "
        "127.0.0.1, ::1, the --host address and IP addresses; others get 400, which stops web pages "
        "from reaching it by DNS rebinding. Repeatable; * allows any, *.example.com its subdomains",
    )
    p.add_argument(
        "--api-key",
        help="require `Authorization: Bearer KEY` on every endpoint but /health (401 otherwise). "
        "Prefer the environment variable LLMCLF_API_KEY: a command line is visible to other users",
    )
    p.add_argument(
        "--docs",
        action="store_true",
        default=None,
        help="serve /docs (Swagger UI: the browser loads its script and styles from the jsDelivr CDN) "
        "and /openapi.json (default off)",
    )


GLOBAL_SWITCHES = [
    ("--quiet", "print only results and errors"),
    ("--verbose", "show library warnings and tracebacks"),
]


class Parser(argparse.ArgumentParser):
    """argparse with usage errors in the CLI's one form: one `error:` paragraph, exit status 2.

    Flags are never abbreviated (`--epoch 2` is not taken for `--epochs`, nor `--text-col` for
    `--text-column`); an unknown flag or choice is answered with the closest real one, and an unknown
    flag with the usage of its own subcommand."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False  # subparsers are made by this class too
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        message += _choice_hint(message)
        self.exit(2, f"error: {message}{'' if message.endswith('?') else '.'} See `{self.prog} --help`.\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self._subcommand(getattr(parsed, "command", None)) or self
            known = [o for a in command._actions + self._actions for o in a.option_strings]
            command.print_usage(sys.stderr)
            command.error(f"unrecognized arguments: {' '.join(extras)}{_flag_hint(extras, known)}")
        return parsed

    def _subcommand(self, name: str | None) -> argparse.ArgumentParser | None:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and name in action.choices:
                return action.choices[name]
        return None


def _flag_hint(extras: list[str], known: list[str]) -> str:
    """`; did you mean --output?` for misspelt flags close to real ones (difflib)."""
    pairs = []
    for extra in extras:
        flag = extra.split("=")[0]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.7) if flag.startswith("--") else []
        pairs += [(flag, close[0])] if close else []
    if len(pairs) == 1:
        return f"; did you mean {pairs[0][1]}?"
    return ("; did you mean " + ", ".join(f"{c} for {f}" for f, c in pairs) + "?") if pairs else ""


def _choice_hint(message: str) -> str:
    """` (did you mean 'train'?)` for an invalid choice close to a valid one."""
    found = re.search(r"invalid choice: '?([^'(]*?)'? \(choose from (.*)\)", message)
    if not found:
        return ""
    choices = [c.strip().strip("'") for c in found.group(2).split(",")]
    close = difflib.get_close_matches(found.group(1), choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="llmclf", description="Fine-tune an LLM into a text classifier.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # Accepted before or after the subcommand; SUPPRESS keeps the top-level value when a subcommand omits it.
    common = Parser(add_help=False)
    for flag, text in GLOBAL_SWITCHES:
        parser.add_argument(flag, action="store_true", help=text)
        common.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_predict, _add_evaluate, _add_export, _add_serve, _add_report, _add_compare):
        add(sub, common)
    return parser


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags given on the command line, as a nested dict shaped like the YAML file."""
    out: dict[str, Any] = {}
    specs = [(s, n) for _, s, n, _, _ in TRAIN_FLAGS] + [(s, n) for _, s, n, _ in TRAIN_SWITCHES]
    for section, name in specs:
        value = getattr(args, _dest(section, name))
        if value is None:
            continue
        if section is None:
            out[name] = value
        else:
            out.setdefault(section, {})[name] = value
    if getattr(args, "preset", None):
        out["preset"] = args.preset
    return out


def name_flags(message: str) -> str:
    """Add the command-line flag to a config error that names only its key (`train.lr=-1.0` → `--lr`)."""
    specs = [(f, s, n) for f, s, n, _, _ in TRAIN_FLAGS] + [(f, s, n) for f, s, n, _ in TRAIN_SWITCHES]
    for flag, section, name, *_ in specs:
        if f"Invalid config value {_dest(section, name)}=" in message:
            return f"{message.rstrip('.')} (flag {flag}, or key {_dest(section, name)} in the --config file)."
    return message
