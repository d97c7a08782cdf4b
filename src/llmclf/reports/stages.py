"""What a run achieved and what each stage of it contributed, as the report states them.

From the run folder's metrics.json, run_info.json and config.yaml (as dicts; any of their values may be
missing or malformed in a shared folder, so every number is checked before it is shown):

- the verdict: the after-training score (accuracy, or macro-F1 when the test classes are imbalanced),
  the chance level, the probe head's score and the errors out of the test texts, in one line;
- the stages: the baseline before training (the base model with a random head), the linear-probe head
  fine-tuning started from (train.head_init: probe), the fine-tuned model, and the model with the
  lexical part mixed in, each with its test score;
- the losses as they are: the Trainer's `train_loss` is the mean over the run, not the last loss logged.
"""

from __future__ import annotations

import math
from typing import Any

IMBALANCED = 1.5  # largest / smallest test class above this: macro-F1 is the headline, not accuracy
VALIDATION_ROWS = 12  # the validations listed as a table under the curves (a few points read better so)


def number(value: Any) -> float | None:
    """A finite real number, else None (a bool is not one)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def fraction(value: Any) -> float | None:
    value = number(value)
    return value if value is not None and 0 <= value <= 1 else None


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


# ------------------------------------------------------------------------------------ the test split
def class_counts(after: dict) -> list[int]:
    """Test texts per true class: the rows of the after-training confusion matrix."""
    matrix = after.get("confusion_matrix")
    if not isinstance(matrix, list) or not all(isinstance(row, list) for row in matrix):
        return []
    counts = [sum(v for v in row if number(v) is not None) for row in matrix]
    return [int(c) for c in counts]


def errors(after: dict) -> int | None:
    """Wrong test predictions: the texts off the diagonal of the confusion matrix."""
    matrix, counts = after.get("confusion_matrix"), class_counts(after)
    if not counts or len(counts) != len(matrix) or any(len(row) != len(counts) for row in matrix):
        return None
    right = sum(int(number(matrix[i][i]) or 0) for i in range(len(counts)))
    return sum(counts) - right


def imbalanced(counts: list[int]) -> bool:
    return bool(counts) and (min(counts) == 0 or max(counts) / min(counts) > IMBALANCED)


def chance(counts: list[int]) -> dict[str, float]:
    """Chance levels: accuracy of always guessing the largest class (its share of the test texts), its
    macro-F1, and the expected macro-F1 of a uniform random guess (precision p_c, recall 1/k per class)."""
    k, n = len(counts), sum(counts)
    if not k or not n:
        return {}
    shares = [c / n for c in counts]
    largest = max(shares)
    random_f1 = sum(2 * p / k / (p + 1 / k) for p in shares) / k
    return {
        "uniform": 1 / k,
        "largest": largest,
        "largest_f1": 2 * largest / (1 + largest) / k,
        "f1": random_f1,
    }


# ------------------------------------------------------------------------------------ the stages
def zero_shot(info: dict) -> bool:
    """Was the evaluation before training zero-shot (the label words' scores under a prompt template)?"""
    return info.get("before_training") == "zero-shot"


def probe_used(info: dict, config: dict) -> bool:
    """Did fine-tuning start from the linear-probe head (train.head_init: probe)?"""
    if isinstance(info.get("probe"), dict):
        return True
    return _dict(config.get("train")).get("head_init") == "probe"


def lexical(info: dict) -> dict:
    """The lexical part's record in run_info.json, {} when the run had none (lexical: off)."""
    return _dict(info.get("lexical"))


def lexical_used(info: dict) -> bool:
    return (number(lexical(info).get("weight")) or 0) > 0


def part_score(info: dict, part: str) -> tuple[float | None, float | None]:
    """(test accuracy, test macro-F1) of one part as the lexical step measured it: model, lexical, mixed."""
    record = lexical(info)
    accuracy = fraction(_dict(record.get("test_accuracy")).get(part))
    return accuracy, fraction(_dict(record.get("test_macro_f1")).get(part))


def model_alone(metrics: dict, info: dict) -> tuple[float | None, float | None]:
    """The fine-tuned model without the lexical part: the after metrics when no lexical part was used."""
    if lexical(info):
        return part_score(info, "model")
    after = metrics["after"]
    return fraction(after.get("accuracy")), fraction(after.get("macro_f1"))


def stage_rows(metrics: dict, info: dict, config: dict) -> list[list[Any]]:
    """stage, test accuracy, test macro-F1, accuracy change from the stage before: in the order they ran."""
    before, after = _dict(metrics.get("before")), metrics["after"]
    rows: list[list[Any]] = []
    levels = chance(class_counts(after))
    if levels:
        rows.append(["chance: always the largest class", levels["largest"], levels["largest_f1"], ""])
    if before:
        rows.append(
            [
                "1. zero-shot before training: the model's next-word scores for the label names"
                if zero_shot(info)
                else "1. baseline before training: random head"
            ]
            + [fraction(before.get("accuracy")), fraction(before.get("macro_f1")), ""]
        )
    if probe_used(info, config):
        probe = fraction(_dict(info.get("probe")).get("test_accuracy"))
        name = f"2. linear-probe head{layer_words(info)}, frozen model: where training started"
        rows.append([name, probe if probe is not None else "not measured on this run", None, ""])
    model = model_alone(metrics, info)
    saved = "" if lexical_used(info) else " = the saved classifier"
    rows.append([f"3. fine-tuned model (LoRA and head){saved}", *model, ""])
    record = lexical(info)
    if record:
        weight = number(record.get("weight")) or 0.0
        if weight > 0:
            name = f"4. with the TF-IDF part (weight {weight:.1f}) = the saved classifier"
            rows.append([name, *part_score(info, "mixed"), ""])
        else:
            rows.append(["4. TF-IDF part: left out (worse on validation)", None, None, ""])
        rows.append(["for comparison: TF-IDF + logistic regression alone", *part_score(info, "lexical"), ""])
    _changes(rows)
    return rows


def _changes(rows: list[list[Any]]) -> None:
    """Fill the change column of the numbered stages: accuracy minus the last numbered stage's."""
    last = None
    for row in rows:
        if not row[0][:1].isdigit() or number(row[1]) is None:
            continue
        if last is not None:
            row[3] = f"{row[1] - last:+.4f}"
        last = row[1]


def layer_words(info: dict) -> str:
    """` on layer L of N` where the run cut its model after a feature layer (model.feature_layer)."""
    chosen = _dict(info.get("feature_layer"))
    layer, total = chosen.get("layer"), chosen.get("of")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (layer, total)) or layer >= total:
        return ""
    return f" on layer {layer} of {total}"


def layer_sentence(info: dict) -> str:
    """Which layer the head reads and why, where the run chose or was given one."""
    chosen = _dict(info.get("feature_layer"))
    layer, total = chosen.get("layer"), chosen.get("of")
    pooled = (
        " It reads the mean of the text's token states, not the last token's (model.pooling)."
        if info.get("pooling") == "mean"
        else ""
    )
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (layer, total)):
        return pooled
    return _layer_why(chosen, layer, total) + pooled


def _layer_why(chosen: dict, layer: int, total: int) -> str:
    why = (
        "the layer whose state a cross-validated probe on the training texts scored best"
        if chosen.get("chosen_by") == "cross-validation"
        else "as configured"
    )
    if layer >= total:
        return f" The head reads the last layer ({total}), {why} (model.feature_layer)."
    return (
        f" The head reads layer {layer} of {total}, {why} (model.feature_layer); the {total - layer} layers"
        " above it were cut away: they are not trained, run or saved."
    )


def metrics_caption(metrics: dict, info: dict, config: dict) -> str:
    n = metrics["after"].get("n")
    start = f"On the test split ({n} texts)." if number(n) is not None else "On the test split."
    start += layer_sentence(info)
    baseline = " Before training is the baseline: the base model with a randomly initialised head."
    if zero_shot(info):
        baseline = (
            " Before training is zero-shot: the base model's own scores for each label name as the next word"
            " after the prompt template (model.prompt_template), with no training at all."
        )
        head = (
            " Fine-tuning started from a linear-probe head (train.head_init: probe)."
            if probe_used(info, config)
            else " Fine-tuning started from a random head (train.head_init: random)."
        )
        return start + (baseline + head if metrics.get("before") else "")
    if probe_used(info, config):
        head = (
            " Fine-tuning did not start from that random head but from a linear-probe head (train.head_init:"
            " probe), a logistic regression fitted on the frozen model's features of the training split."
        )
    else:
        head = " Fine-tuning started from that random head (train.head_init: random)."
    return start + (baseline + head if metrics.get("before") else "")


# ------------------------------------------------------------------------------------ the verdict
def verdict(metrics: dict, info: dict, config: dict) -> str:
    """One line: the score after training, chance level, the probe (and model alone), the errors."""
    after = metrics["after"]
    counts = class_counts(after)
    levels = chance(counts)
    accuracy = fraction(after.get("accuracy"))
    parts = []
    if imbalanced(counts) and fraction(after.get("macro_f1")) is not None:
        parts.append(f"test macro-F1 {after['macro_f1']:.4f} after training (the test classes are imbalanced")
        parts[-1] += f"; accuracy {accuracy:.4f})" if accuracy is not None else ")"
        if levels:
            parts.append(
                f"chance level: macro-F1 {levels['f1']:.4f} guessing at random, accuracy "
                f"{levels['largest']:.4f} always guessing the largest class"
            )
    else:
        parts.append(
            f"test accuracy {accuracy:.4f} after training" if accuracy is not None else "no accuracy"
        )
        if levels:
            k = len(counts)
            how = (
                f"1 in {k} classes" if levels["largest"] <= levels["uniform"] + 1e-9 else "the largest class"
            )
            parts.append(f"chance level {levels['largest']:.4f} ({how})")
    before = fraction(_dict(metrics.get("before")).get("accuracy"))
    if zero_shot(info) and before is not None:
        parts.append(f"zero-shot before training: accuracy {before:.4f}")
    probe = fraction(_dict(info.get("probe")).get("test_accuracy"))
    if probe is not None:
        parts.append(f"the linear-probe head alone (before fine-tuning): accuracy {probe:.4f}")
    model, mixed = part_score(info, "model")[0], part_score(info, "mixed")[0]
    if lexical_used(info) and model is not None and mixed is not None:
        parts.append(
            f"the fine-tuned model alone: accuracy {model:.4f}, the TF-IDF part adds {mixed - model:+.4f}"
        )
    wrong, n = errors(after), number(after.get("n"))
    if wrong is not None and n is not None:
        parts.append(f"{wrong} error{'s' * (wrong != 1)} out of {int(n)} test texts")
    return "Verdict: " + "; ".join(parts) + "."


# ------------------------------------------------------------------------------------ losses, validations
def log_entries(info: dict) -> list[dict]:
    log = info.get("log_history")
    return [e for e in log if isinstance(e, dict)] if isinstance(log, list) else []


def loss_rows(info: dict) -> list[list[Any]]:
    """The mean training loss over the run (the Trainer's train_loss) and the last loss logged."""
    rows: list[list[Any]] = [["mean training loss over the run", number(info.get("train_loss"))]]
    logged = [e for e in log_entries(info) if number(e.get("loss")) is not None]
    if logged:
        step = f" (step {logged[-1]['step']})" if number(logged[-1].get("step")) is not None else ""
        rows.append([f"last logged training loss{step}", float(logged[-1]["loss"])])
    return rows


VALIDATION_KEYS = ("eval_accuracy", "eval_balanced_accuracy")


def validation_rows(info: dict, keys: tuple[str, ...] = VALIDATION_KEYS) -> list[list[Any]]:
    """step, epoch, loss and the `keys` (accuracy, balanced accuracy) of each validation; [] when there
    are more than VALIDATION_ROWS (the curves show them) or none."""
    keys = ("step", "epoch", "eval_loss", *keys)
    rows = [[number(e.get(k)) for k in keys] for e in log_entries(info) if "eval_loss" in e]
    for row in rows:
        row[0] = int(row[0]) if row[0] is not None else None
        row[1] = f"{row[1]:.2f}" if row[1] is not None else None
    return rows if len(rows) <= VALIDATION_ROWS else []
