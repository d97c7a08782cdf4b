"""Hugging Face's text-classification API on `llmclf serve`: the request shapes and answers (app.py adds
the routes, which go through the same limits, security and batching as POST /classify).

- POST /predict, as text-embeddings-inference (TEI) answers it: `{"inputs": "text"}` gets
  `[{"label": ..., "score": ...}, ...]`, every label, most probable first; `{"inputs": ["a", "b"]}` (or
  TEI's `[["a"], ["b"]]`) gets one such list per text, in request order.
- POST /, as Hugging Face's Inference API answers it: the same, except that a single text gets a list
  holding its list too. That is what `huggingface_hub.InferenceClient(base_url=URL)
  .text_classification(text, top_k=k)` sends (`{"inputs": text, "parameters": {"top_k": k}}`, to URL
  itself) and reads (the first list of the answer; TEI's flat list would give it one label, not a list).

Both take TEI's `truncate`, `truncation_direction` and `raw_scores` and the Inference API's `parameters`
(`top_k`, `function_to_apply`). The scores are the classifier's probabilities, those of /classify. What
this server cannot do is refused (422) rather than ignored: raw scores (logits), sigmoid, cutting a text's
start, unknown fields, sentence pairs for a classifier trained on single texts (and single texts for one
trained on pairs). For a single-text classifier a top-level list of two strings is two texts (TEI reads
it as one sentence pair); for one trained on text pairs it is one pair, as in TEI, and `[["a", "b"],
...]` is several. `truncate` left out cuts long
texts at --max-length tokens as in training (TEI's --auto-truncate) and flags nothing in the answer;
`truncate: false` refuses them (413 `text_too_long`, their indexes named).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llmclf.serve.limits import ApiError, check_pairs, check_texts, load_json
from llmclf.targets import SCORE

EXAMPLE = 'Send {"inputs": "a text"} or {"inputs": ["first text", "second text"]}.'
PAIR_EXAMPLE = 'Send {"inputs": ["a text", "its second text"]} or {"inputs": [["a", "a2"], ["b", "b2"]]}.'


class InferenceParameters(BaseModel):
    """`parameters` of Hugging Face's Inference API for text classification."""

    model_config = ConfigDict(extra="forbid", strict=True)
    top_k: int | None = Field(
        default=None, ge=1, description="Only the k most probable labels (default: all)."
    )
    function_to_apply: str | None = Field(
        default=None, description="'softmax' only: the scores are the classifier's probabilities."
    )


class PredictRequest(BaseModel):
    """Body of POST /predict and POST /."""

    model_config = ConfigDict(extra="forbid", strict=True)
    inputs: str | list[str] | list[list[str]] = Field(
        description='A text, or a list of texts (also as TEI\'s [["a"], ["b"]]), each non-blank.',
        examples=["Stocks fell.", ["Stocks fell.", "The team won the final."]],
    )
    truncate: bool | None = Field(
        default=None,
        description="Unset or true: texts over --max-length tokens are cut, as in training; false: refused (413).",
    )
    truncation_direction: str = Field(default="right", description="'right' only: texts are cut at the end.")
    raw_scores: bool = Field(
        default=False, description="false only: the scores are probabilities, not logits."
    )
    parameters: InferenceParameters | None = None


@dataclass(frozen=True)
class PredictCall:
    """What a request asks beyond its texts."""

    single: bool
    """`inputs` was one text, not a list."""
    top_k: int | None
    refuse_cut: bool
    """`truncate: false`: texts over the maximum length are refused, not cut."""
    max_length: int | None


def parse_predict(
    body: bytes, max_texts: int, max_length: int | None, *, pairs: bool = False, function: str = "softmax"
) -> tuple[list[Any], PredictCall]:
    """The texts (or, for a classifier trained on text pairs, the (first, second) pairs: TEI's
    `[["a", "b"], ...]`) of a /predict or / body and what else it asks, or an ApiError naming the
    problem. `function`: what the model applies to its logits, the one `function_to_apply` accepted:
    `softmax`, `sigmoid` (multi-label) or `none` (regression: one number)."""
    request = load_json(body, PredictRequest, PAIR_EXAMPLE if pairs else EXAMPLE)
    _refuse_unsupported(request, function)
    parameters = request.parameters or InferenceParameters()
    single = isinstance(request.inputs, str) or (pairs and _is_one_pair(request.inputs))
    call = PredictCall(single, parameters.top_k, request.truncate is False, max_length)
    if pairs:
        return check_pairs(_pairs(request.inputs), max_texts, PAIR_EXAMPLE, field="inputs"), call
    return check_texts(_texts(request.inputs), max_texts, EXAMPLE, field="inputs"), call


def _is_one_pair(inputs: str | list[str] | list[list[str]]) -> bool:
    return isinstance(inputs, list) and len(inputs) == 2 and all(isinstance(t, str) for t in inputs)


def _pairs(inputs: str | list[str] | list[list[str]]) -> list[list[str]]:
    """TEI's pair inputs: `["a", "b"]` (one pair) or `[["a", "b"], ...]`."""
    if _is_one_pair(inputs):
        return [list(inputs)]
    if isinstance(inputs, str) or any(isinstance(item, str) for item in inputs):
        raise ApiError(
            422,
            "unsupported_input",
            f"This classifier was trained on text pairs: each input is a list of two texts. {PAIR_EXAMPLE}",
        )
    return list(inputs)


def _texts(inputs: str | list[str] | list[list[str]]) -> list[str]:
    if isinstance(inputs, str):
        return [inputs]
    texts, pairs = [], []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            texts.append(item)
        elif len(item) == 1:
            texts.append(item[0])
        else:
            pairs.append(i)
    if pairs:
        raise ApiError(
            422,
            "unsupported_input",
            f"Input(s) at index {pairs[:20]} are lists of {len(inputs[pairs[0]])} texts (a sentence pair, in "
            f"TEI); this classifier takes one text per input. {EXAMPLE}",
            index=pairs,
        )
    return texts


def _refuse_unsupported(request: PredictRequest, applied: str = "softmax") -> None:
    function = request.parameters.function_to_apply if request.parameters else None
    if request.raw_scores and applied != "none":  # a regression model's score is its raw output
        problem = "raw_scores: true asks for logits"
    elif request.truncation_direction.lower() != "right":
        problem = f"truncation_direction {request.truncation_direction[:20]!r} asks to cut a text's start"
    elif function not in (None, applied):
        problem = f"function_to_apply {function[:20]!r} asks for other scores"
    else:
        return
    answers = {
        "none": "the regression model's number (function_to_apply none)",
        "sigmoid": "each label's own probability (sigmoid)",
    }.get(applied, "the classifier's probabilities (softmax)")
    raise ApiError(
        422,
        "unsupported_parameter",
        f"{problem}; this server answers with {answers}, cutting long texts at the end as in training. "
        "Leave that field out.",
    )


def _ranked(call: PredictCall, predictions: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Each text's labels and probabilities, most probable first (ties in label order), top_k of them."""
    if call.refuse_cut:
        cut = [i for i, p in enumerate(predictions) if p["truncated"]]
        if cut:
            limit = f"{call.max_length} tokens" if call.max_length else "the maximum length"
            raise ApiError(
                413,
                "text_too_long",
                f"Text(s) at index {cut[:20]} are longer than {limit} and the request says truncate: false. "
                "Shorten them, or leave truncate out to have them cut there, as in training.",
                index=cut,
            )
    return [
        [
            {"label": label, "score": score}
            for label, score in sorted(_scores(p).items(), key=lambda kv: -kv[1])[: call.top_k]
        ]
        for p in predictions
    ]


def _scores(prediction: dict[str, Any]) -> dict[str, float]:
    """A classifier's probabilities by label; a regression model's one number, as TEI gives it."""
    if "probabilities" in prediction:
        return prediction["probabilities"]
    return {SCORE: prediction[SCORE]}


def tei_answer(call: PredictCall, predictions: list[dict[str, Any]]) -> Any:
    """TEI's answer: one text's list for a single text, a list of lists for a list."""
    ranked = _ranked(call, predictions)
    return ranked[0] if call.single else ranked


def inference_api_answer(call: PredictCall, predictions: list[dict[str, Any]]) -> Any:
    """The Inference API's answer: a list of lists, one per text, for a single text too."""
    return _ranked(call, predictions)


def predict_schema() -> dict[str, Any]:
    """PredictRequest's JSON schema with its definitions inlined (a request body in an OpenAPI page
    cannot refer to the schema's own `$defs`)."""
    schema = PredictRequest.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        return [inline(value) for value in node] if isinstance(node, list) else node

    return inline(schema)
