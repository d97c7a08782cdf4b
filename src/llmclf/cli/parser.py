"""The command line's parser: every subcommand's flags; the train flags come from the config (flags.py)."""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
from typing import Any

from llmclf.cli.flags import (  # noqa: F401  (train_overrides, name_flags: commands.py's, from here)
    StoreConst,
    add_train_flags,
    name_flags,
    train_overrides,
)
from llmclf.config import PRECISION_CHOICES, PRESETS
from llmclf.version import __version__


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
    groups = add_train_flags(p)
    # The Trainer's own spellings, as shortcuts: they set the same field as --precision.
    precision = groups["model"].add_mutually_exclusive_group()
    for flag in ("bf16", "fp16"):
        precision.add_argument(
            f"--{flag}",
            dest="model.precision",
            action=StoreConst,
            const=flag,
            default=argparse.SUPPRESS,
            help=f"same as --precision {flag}",
        )
    output = groups[None]
    output.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    output.add_argument(
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
    p.add_argument(
        "--pair", action="append", help="the second text of each --text, for a run trained on text pairs"
    )
    p.add_argument("--output", help="file to write (format by extension); required with --input")
    p.add_argument("--text-column", default=None, help="text column of --input (default: as in training)")
    p.add_argument(
        "--text-pair-column", default=None, help="second-text column of --input (default: as in training)"
    )
    p.add_argument(
        "--prediction-column",
        default=None,
        help="name of the added prediction column (default: label; score for a regression run)",
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
    p.add_argument("--text-pair-column", default=None, help="default: as in training")
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
    p.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="then upload the folder to this Hugging Face model repository (user/name; created if "
        "missing), with HF_TOKEN or a cached `hf auth login`",
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
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
