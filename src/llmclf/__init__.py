"""llmclf: turn a decoder LLM into a text classifier by (Q)LoRA fine-tuning.

Train from a pandas DataFrame (or a file path, a list of dicts, a `datasets.Dataset`) with the command
line's options as keyword arguments, then load the run folder and predict:

    import pandas as pd
    from llmclf import Classifier, train

    frame = pd.read_csv("news.csv")                     # any frame with a text and a label column
    result = train(data=frame, text_column="text", label_column="label", output="runs/news",
                   model="smollm2-135m", epochs=2, lr=5e-4, train_per_class=200)
    result.output                                       # the run folder, as `llmclf train --output` writes it
    result.metrics["after"]["accuracy"]                 # test metrics "before" and "after" training
    result.seconds
    clf = Classifier.load(result.output)
    clf.predict(["Stocks rallied after the rate cut"])

`train` runs what `llmclf train` runs. Its options are the config's fields by the flags' names, with
underscores: `epochs`, `lr`, `batch_size`, `train_per_class`, `eval_data`, `drop_invalid`, `lexical`,
`seed`, ... (`llmclf train --help`, docs/options.md); `model` names the base model, `lora_r`,
`lora_alpha`, ... shape the adapter, `output` is the run folder, `preset` (`recipe`) starts from the
recipe's settings. An unknown option is refused with the closest real one; a wrong value with the
config's own message. `overwrite`, `quiet` and `resume` are `--overwrite`, `--quiet` and `--resume`.

The first argument (or `config=`) is a base under the options: a `RunConfig`, a YAML file, or a nested
dict shaped like the YAML file:

    train(load_config("examples/demo.yaml"))            # a RunConfig, as the command line builds it
    train("examples/demo.yaml", epochs=3)               # a YAML file, with an option over it
    train(data=frame, config={"train": {"lr": 1e-4}, "lora": {"r": 8}})

Data in memory (`data=`, and `eval_data=` for a test split of your own) is checked like a file: a missing
column is named with the frame's columns, an empty text or a missing label with the frame's index (or
left out, counted, with `drop_invalid=True`). The run folder keeps the columns used as `data.jsonl`
(`eval_data.jsonl`), which `llmclf train --data RUN/data.jsonl` splits alike; config.yaml names the data
`<DataFrame: N rows, sha256 …>` (the start of the file's SHA-256), and run_info.json's `data_in_memory`
records the kind, rows, hash and file.

`train_config(config, **options)` returns the `RunConfig` that `train` would run, without running it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from llmclf.errors import LlmclfError
from llmclf.version import __version__

if TYPE_CHECKING:
    from llmclf.config import RunConfig
    from llmclf.training.pipeline import RunResult

# oneDNN keeps one compiled kernel per input shape in two caches (1,024 entries each by default), and
# texts come in every length: capped so that a bf16 process stops growing (docs/performance.md). Read at
# the first oneDNN call, so set on import; a value the user set wins.
KERNEL_CACHE_CAPACITY = "64"
for _name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_name, KERNEL_CACHE_CAPACITY)

__all__ = ["Classifier", "LlmclfError", "RunConfig", "RunResult", "__version__", "load_config", "train"]

OPTION_NAMES = {("data", "path"): "data", ("model", "name"): "model"}
"""Options named otherwise than their field, as the flags are (`--data`, `--model`). lora's fields, and a
field that two sections share, take the section as a prefix (`lora_r`), like their flags."""
SYNONYMS = {
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "model_name": "model",
    "output_dir": "output",
    "per_device_train_batch_size": "batch_size",
}
"""Names from transformers' TrainingArguments and elsewhere, answered with llmclf's."""


def train(
    config: RunConfig | dict | str | os.PathLike | None = None,
    *,
    data: Any = None,
    eval_data: Any = None,
    overwrite: bool = False,
    quiet: bool = False,
    resume: str | None = None,
    **options: Any,
) -> RunResult:
    """Train, evaluate before and after, and write the run folder, as `llmclf train` does.

    `config`: a `RunConfig`, a YAML file or a nested dict, under `options` (the config's fields by the
    flags' names: `epochs`, `lr`, `model`, `lora_r`, `output`, `preset`, ...). `data` / `eval_data`: a
    file path (or hub dataset name, or `demo`), a pandas DataFrame, a list of dicts or a
    `datasets.Dataset`. Returns the run folder, the test metrics before and after, and the seconds taken.
    """
    from llmclf import runtime
    from llmclf.datafiles import from_memory
    from llmclf.runfolder import tidy_if_failed
    from llmclf.training import pipeline

    memory: dict[str, Any] = {}
    for key, value in (("data", data), ("eval_data", eval_data)):
        if isinstance(value, str | os.PathLike):
            options[key] = value
        elif value is not None:
            memory[key] = value
    resolved = train_config(config, **options)
    for key, value in memory.items():  # read once the text and label columns are known
        dc = resolved.data
        memory[key] = from_memory(value, dc.text_column, dc.label_column, key, dc.text_pair_column)
        setattr(dc, "path" if key == "data" else "eval_data", memory[key].marker)
    runtime.set_threads()  # as the command line does
    with tidy_if_failed(resolved.output):  # a run that fails before writing anything reusable can rerun
        return pipeline.run_training(resolved, overwrite=overwrite, quiet=quiet, resume=resume, memory=memory)


def train_config(config: RunConfig | dict | str | os.PathLike | None = None, **options: Any) -> RunConfig:
    """The `RunConfig` that `train(config, **options)` runs: defaults ← preset ← `config` ← `options`."""
    from llmclf import config as cfg

    if config is None:
        base: dict[str, Any] = {}
    elif isinstance(config, cfg.RunConfig):
        base = config.to_dict()
        if "preset" in options:
            raise LlmclfError(
                "preset= goes under a YAML file or a config dict, not over a RunConfig (whose every value "
                "is set already): give it to load_config, or the options alone."
            )
    elif isinstance(config, dict):
        base = config
    elif isinstance(config, str | os.PathLike):
        base = cfg.read_yaml(config)
    else:
        raise LlmclfError(
            f"config= takes a RunConfig, a YAML file or a nested dict; got {type(config).__name__}."
        )
    names = option_names()
    overlay: dict[str, Any] = {}
    for key, value in options.items():
        if key not in names:
            raise LlmclfError(_unknown_option(key, names))
        section, name = names[key]
        value = os.fspath(value) if isinstance(value, os.PathLike) else value
        (overlay.setdefault(section, {}) if section else overlay)[name] = value
    return cfg.build_config(cfg.merge(base, overlay))


def option_names() -> dict[str, tuple[str | None, str]]:
    """`train`'s options: name → (config section or None for the top level, field)."""
    from llmclf.config import CONFIG_SECTIONS, field_names

    fields = [(section, name) for section, cls in CONFIG_SECTIONS.items() for name in field_names(cls)]
    shared = {name for _, name in fields if sum(name == other for _, other in fields) > 1}
    names: dict[str, tuple[str | None, str]] = {
        "output": (None, "output"),
        "task": (None, "task"),
        "preset": (None, "preset"),
    }
    for section, name in fields:
        prefixed = section == "lora" or name in shared
        names[OPTION_NAMES.get((section, name), f"{section}_{name}" if prefixed else name)] = (section, name)
    return names


def _unknown_option(key: str, names: dict[str, tuple[str | None, str]]) -> str:
    import difflib

    by_field = {name: option for option, (_, name) in names.items() if option != name}
    close = SYNONYMS.get(key) or by_field.get(key)
    close = close or next(iter(difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)), None)
    hint = f" Did you mean {close}=?" if close else ""
    return (
        f"Unknown option {key}= for llmclf.train.{hint} Options: {', '.join(sorted(names))}; and config, "
        "overwrite, quiet, resume."
    )


def __getattr__(name: str):
    # Lazy, so that `import llmclf` (and `llmclf --help`, `report`, `compare`) does not import torch.
    if name == "Classifier":
        from llmclf.inference.classifier import Classifier

        return Classifier
    if name == "RunResult":
        from llmclf.training.pipeline import RunResult

        return RunResult
    if name in ("RunConfig", "load_config"):
        from llmclf import config

        return getattr(config, name)
    raise AttributeError(name)
