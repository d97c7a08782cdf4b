"""The lexical part of a classifier: TF-IDF of word 1-2-grams and character 2-5-grams + logistic
regression, mixed with the model.

A fine-tuned LLM on a few thousand texts can still lose to keyword matching on keyword-heavy data
(docs/accuracy.md). Training therefore also fits TF-IDF + LR on the training split and mixes the two
log-linearly, p ∝ p_model^(1-w) · p_lexical^w, with w = 0.4, or 0 where the validation split shows the
mix clearly worse than the model alone.

Saved in the run folder's `lexical/` as data only: each part's vocabulary (JSON), its idf, the
coefficients and intercepts (safetensors) and the mixing weight; the vectorisers are rebuilt from fixed
settings. Format 1 (word 1-2-grams alone, runs before 2026-12-03) still loads.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import log_softmax

from llmclf import runtime
from llmclf.errors import LlmclfError
from llmclf.runfolder import atomic_write, write_json

SETTINGS = "lexical.json"
VOCABULARY = "vocabulary.json"
WEIGHTS = "weights.safetensors"
FILES = (SETTINGS, VOCABULARY, WEIGHTS)
FORMAT = 2
FEATURES = (("word", 1, 2), ("char_wb", 2, 5))
"""The TF-IDF parts, (analyzer, shortest, longest n-gram): character n-grams within words catch the
spellings, stems and typos of short texts that whole words miss (docs/accuracy.md#the-lexical-features)."""
WORDS_ONLY = (("word", 1, 2),)
"""The word part alone: format 1's only part (runs before 2026-12-03), and an option of `fit_lexical`."""
MAX_FEATURES = 100_000
"""Most frequent n-grams kept per part: bounds the saved vocabulary (the suite's datasets stay under it)."""
C_GRID = (0.1, 1.0, 10.0, 100.0)
MIX_GRID = tuple(i / 10 for i in range(11))
MIX_WEIGHT = 0.4
"""The lexical part's share in the mix (chosen on the benchmark suite's nine datasets)."""
GUARD_SE = 2.0
"""The mix is dropped where its validation balanced accuracy is this many standard errors of the paired
difference below the model's: a drop the validation texts show, not their noise (on 25 texts two
disagreements are 0.08 of balanced accuracy; docs/accuracy.md)."""
EPS = 1e-12


MAX_CHARS = 20_000
"""Characters of a text (of each text of a pair) the lexical part reads, in training and at inference
alike: a few thousand words are plenty for TF-IDF, and a 1 MB request then costs no more than a long one."""


def lexical_inputs(texts: list[str], pairs: list[str] | None = None) -> list[str]:
    """What TF-IDF reads: the text, or a pair's two texts on two lines (their words counted together),
    each cut to its first MAX_CHARS characters."""
    if pairs is None:
        return [text[:MAX_CHARS] for text in texts]
    return [f"{a[:MAX_CHARS]}\n{b[:MAX_CHARS]}" for a, b in zip(texts, pairs, strict=True)]


def _vectorizer(features: tuple = FEATURES, vocabularies: dict[str, dict[str, int]] | None = None) -> Any:
    """The TF-IDF parts side by side: (n, sum of the vocabularies) sparse rows, one part per analyzer."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import FeatureUnion

    parts = [
        (
            analyzer,
            TfidfVectorizer(
                analyzer=analyzer,
                ngram_range=(low, high),
                sublinear_tf=True,
                max_features=MAX_FEATURES,
                vocabulary=None if vocabularies is None else vocabularies[analyzer],
                dtype=np.float32,
            ),
        )
        for analyzer, low, high in features
    ]
    return FeatureUnion(parts)


@dataclass
class LexicalHead:
    """TF-IDF + a linear layer over it, and the weight of its log-probabilities in the mix."""

    vectorizer: Any
    """The TF-IDF parts (`_vectorizer`), fitted."""
    coef: np.ndarray
    """(labels, vocabulary) weights on the TF-IDF features, the parts' vocabularies one after the other."""
    intercept: np.ndarray
    """(labels,) biases."""
    weight: float = 0.0
    """Share of the lexical log-probabilities in the mix (0: the model alone; 1: TF-IDF alone)."""
    info: dict = field(default_factory=dict)
    """How it was fitted and chosen (C, cross-validated score, the validation scores per weight)."""

    def record(self) -> dict:
        """run_info's record: the mixing weight and what the fit and the validation check found."""
        return {"weight": self.weight, **self.info}

    def log_proba(self, texts: list[str]) -> np.ndarray:
        """(n, labels) log-probabilities of the lexical model alone."""
        if not texts:  # scikit-learn refuses an empty batch
            return np.zeros((0, len(self.intercept)))
        x = self.vectorizer.transform(texts)  # (n, vocabulary), sparse
        return log_softmax(np.asarray(x @ self.coef.T, dtype=np.float64) + self.intercept, axis=1)

    def combine(self, probs: np.ndarray, lexical_log: np.ndarray, weight: float | None = None) -> np.ndarray:
        """The mix of the model's probabilities (n, labels) with the lexical log-probabilities."""
        w = self.weight if weight is None else weight
        if w == 0:
            return probs
        mixed = (1 - w) * np.log(np.clip(probs, EPS, None)) + w * lexical_log
        return np.exp(log_softmax(mixed, axis=1))

    def save(self, folder: Path) -> None:
        """Write `folder` (a run's `lexical/`): settings, vocabularies and arrays, each atomically."""
        from safetensors.numpy import save_file

        terms, arrays = {}, {"coef": self.coef, "intercept": self.intercept}
        for analyzer, part in self.vectorizer.transformer_list:
            terms[analyzer] = [""] * len(part.vocabulary_)
            for term, i in part.vocabulary_.items():
                terms[analyzer][i] = term
            arrays[f"idf_{analyzer}"] = part.idf_
        features = [[a, *part.ngram_range] for a, part in self.vectorizer.transformer_list]
        settings = {"format": FORMAT, "features": features, "weight": self.weight, "info": self.info}
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}
        write_json(folder / SETTINGS, settings)
        atomic_write(
            folder / VOCABULARY,
            lambda tmp: tmp.write_text(json.dumps(terms, ensure_ascii=False), encoding="utf-8"),
        )
        atomic_write(folder / WEIGHTS, lambda tmp: save_file(arrays, str(tmp)))

    @classmethod
    def load(cls, folder: Path, num_labels: int) -> LexicalHead:
        """Read `folder` (a run's `lexical/`), checking every shape and value against the run's labels."""
        from safetensors.numpy import load_file

        def bad(what: str) -> LlmclfError:
            return LlmclfError(
                f"{folder}: {what}. The run folder's lexical part is damaged: copy the run folder again, or "
                "train again."
            )

        try:
            settings = json.loads((folder / SETTINGS).read_text(encoding="utf-8"))
            terms = json.loads((folder / VOCABULARY).read_text(encoding="utf-8"))
            arrays = load_file(str(folder / WEIGHTS))
        except Exception as exc:  # any parse failure of an untrusted file is the same answer
            raise bad(f"cannot be read ({type(exc).__name__})") from None
        weight = settings.get("weight") if isinstance(settings, dict) else None
        features, terms, arrays = _parts(settings, terms, arrays, bad)
        if not isinstance(weight, int | float) or isinstance(weight, bool) or not 0 <= weight <= 1:
            raise bad(f"{SETTINGS} holds weight={weight!r}, not a number in [0, 1]")
        for analyzer, part in terms.items():
            if (
                not isinstance(part, list)
                or not all(isinstance(t, str) for t in part)
                or len(set(part)) != len(part)
            ):
                raise bad(f"{VOCABULARY}: the {analyzer} part is not a list of distinct strings")
        size = sum(len(part) for part in terms.values())
        shapes = {f"idf_{a}": (len(part),) for a, part in terms.items()}
        shapes |= {"coef": (num_labels, size), "intercept": (num_labels,)}
        for name, shape in shapes.items():
            if name not in arrays or arrays[name].shape != shape or not np.isfinite(arrays[name]).all():
                raise bad(f"{WEIGHTS}: '{name}' is not a finite array of shape {shape}")
        vocabularies = {a: {t: i for i, t in enumerate(part)} for a, part in terms.items()}
        vectorizer = _vectorizer(features, vocabularies)
        for analyzer, part in vectorizer.transformer_list:
            part.idf_ = arrays[f"idf_{analyzer}"]
        return cls(vectorizer, arrays["coef"], arrays["intercept"], float(weight), settings.get("info") or {})


def _parts(settings: Any, terms: Any, arrays: dict, bad: Any) -> tuple[tuple, dict, dict]:
    """The saved parts' settings, vocabularies by analyzer and arrays (idf per analyzer), read as this
    format: format 1 held one word part (its vocabulary a list, its idf `idf`)."""
    if not isinstance(settings, dict):
        raise bad(f"{SETTINGS} is not a JSON object")
    if settings.get("format") == 1 and settings.get("ngrams") == [1, 2]:
        arrays = {("idf_word" if k == "idf" else k): v for k, v in arrays.items()}
        return WORDS_ONLY, {"word": terms}, arrays
    known = {tuple(tuple(f) for f in features): features for features in (FEATURES, WORDS_ONLY)}
    features = known.get(tuple(map(tuple, settings.get("features") or [])))
    if settings.get("format") != FORMAT or features is None:
        raise bad(f"{SETTINGS} is not format {FORMAT} with the TF-IDF parts {[list(f) for f in FEATURES]}")
    names = [f[0] for f in features]
    if not isinstance(terms, dict) or sorted(terms) != sorted(names):
        raise bad(f"{VOCABULARY} does not hold one vocabulary per part ({', '.join(names)})")
    return features, terms, arrays


def sklearn_class_weight(class_weights: list[float] | None) -> dict[int, float] | None:
    """The run's class weights as scikit-learn's `class_weight`, rescaled to mean 1. They sum to 1 (the
    recipe's normalisation), and scikit-learn multiplies the loss by them but not the penalty: as they
    were, 77 balanced classes fitted with C/77, and the linear heads underfitted."""
    if class_weights is None:
        return None
    scale = len(class_weights) / sum(class_weights)
    return {i: w * scale for i, w in enumerate(class_weights)}


def fit_lexical(
    texts: list[str],
    label_ids: list[int],
    num_labels: int,
    class_weights: list[float] | None,
    seed: int,
    features: tuple = FEATURES,
) -> LexicalHead:
    """TF-IDF (`features`: its parts) + logistic regression on the training split, C chosen by
    cross-validated log-loss."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    vectorizer = _vectorizer(features)
    x = vectorizer.fit_transform(texts)  # (n, vocabulary)
    y = np.asarray(label_ids)
    weight = sklearn_class_weight(class_weights)
    folds = min(5, int(np.bincount(y).min()))
    info: dict[str, Any] = {"vocabulary": x.shape[1]}
    if len(np.unique(y)) < 2:
        raise LlmclfError("The lexical part needs at least two classes in the training split.")
    if folds >= 2:
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        lr = LogisticRegressionCV(
            Cs=list(C_GRID),
            cv=cv,
            scoring="neg_log_loss",
            class_weight=weight,
            max_iter=3000,
            random_state=seed,
        )
    else:  # a class with one training text: no folds to choose C on
        lr = LogisticRegression(C=10.0, class_weight=weight, max_iter=3000)
    with warnings.catch_warnings(), runtime.one_blas_thread():  # 1.9 announces changes to their defaults
        warnings.simplefilter("ignore", FutureWarning)
        lr.fit(x, y)
    info["C"] = float(np.ravel(lr.C_)[0]) if folds >= 2 else 10.0
    coef = np.zeros((num_labels, x.shape[1]), dtype=np.float32)
    intercept = np.full(num_labels, -30.0, dtype=np.float32)  # a label absent from training: never likely
    if lr.coef_.shape[0] == 1:  # binary: sklearn keeps one vector for p(class 1) = sigmoid(w.x + b)
        (neg, pos), half = lr.classes_, lr.coef_[0] / 2
        coef[neg], coef[pos] = -half, half
        intercept[neg], intercept[pos] = -lr.intercept_[0] / 2, lr.intercept_[0] / 2
    else:
        coef[lr.classes_], intercept[lr.classes_] = lr.coef_, lr.intercept_
    return LexicalHead(vectorizer, coef, intercept, 0.0, info)


def choose_weight(
    head: LexicalHead, probs: np.ndarray, lexical_log: np.ndarray, label_ids: list[int]
) -> float:
    """Set the head's mixing weight: MIX_WEIGHT, or 0 (the model alone) where the mix's balanced accuracy
    on the validation split falls below the model's own by more than GUARD_SE standard errors of the
    paired difference. Records the scores of every weight of MIX_GRID in `head.info`.

    A fixed mix, not a weight tuned on validation: on the suite's datasets, a few hundred
    validation texts chose weights that did worse on test than the fixed mix (docs/accuracy.md)."""
    from sklearn.metrics import balanced_accuracy_score

    y = np.asarray(label_ids)
    table, predicted = [], {}
    for w in MIX_GRID:
        mixed = head.combine(probs, lexical_log, w)
        predicted[w] = mixed.argmax(axis=1)
        score = float(balanced_accuracy_score(y, predicted[w]))
        loss = float(-np.log(np.clip(mixed[np.arange(len(y)), y], EPS, None)).mean())
        table.append({"weight": w, "balanced_accuracy": score, "log_loss": loss})
    scores = {row["weight"]: row["balanced_accuracy"] for row in table}
    margin = GUARD_SE * paired_standard_error(y, predicted[0.0], predicted[MIX_WEIGHT])
    head.weight = MIX_WEIGHT if scores[MIX_WEIGHT] >= scores[0.0] - margin else 0.0
    head.info["validation"] = table
    head.info["guard"] = {"margin": round(margin, 4), "standard_errors": GUARD_SE}
    return head.weight


def paired_standard_error(y: np.ndarray, first: np.ndarray, second: np.ndarray) -> float:
    """Standard error of the difference in balanced accuracy between two sets of predictions of the same
    texts: each text weighs 1 / (classes x its class's count), and only the texts one set gets right and
    the other wrong move the difference."""
    classes, counts = np.unique(y, return_counts=True)
    weight = 1.0 / (len(classes) * counts[np.searchsorted(classes, y)])  # (n,)
    differ = (first == y).astype(float) - (second == y).astype(float)  # -1, 0 or 1 per text
    return float(np.sqrt(np.sum((weight * differ) ** 2)))
