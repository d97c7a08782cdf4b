"""A prompt template around every text, put into the tokenizer itself.

A decoder's last-token state says more about a text when the text is framed as a question the model
answers in its next token (PromptEOL: `This sentence : "{text}" means in one word:"`). The template is
written into the fast tokenizer's post-processor, next to the special tokens it already adds, so every
path that tokenises (training, the activation cache, `Classifier`, the server) and the exported
tokenizer (plain transformers, `pipeline()`) frame the text alike, and truncation keeps the template
whole. Nothing here runs code from a run folder: the template is token ids in `tokenizer.json`.
"""

from __future__ import annotations

import json
from typing import Any

from llmclf.config import PROMPT_PLACEHOLDER as PLACEHOLDER
from llmclf.config import PROMPT_TEMPLATES as TEMPLATES
from llmclf.errors import LlmclfError
from llmclf.model.anatomy import is_encoder

PIECES = ("llmclf_prefix", "llmclf_suffix")
"""Names of the template's two parts among the post-processor's special tokens."""
SEPARATOR = "llmclf_separator"
PAIR_SEPARATOR = "\n"
"""Between a pair's two texts where the tokenizer puts nothing there (a decoder's; BERT has [SEP])."""


def resolve_template(value: str, model: Any = None) -> str | None:
    """The template string a config value names: `auto` (sentence for a decoder, none for an encoder,
    which pools its own first token), a name of TEMPLATES, or the template itself (with {text} once,
    checked by the config)."""
    if value == "auto":
        return None if model is not None and is_encoder(model) else TEMPLATES["sentence"]
    return TEMPLATES[value] if value in TEMPLATES else value


def _template_piece(name: str, ids: list[int], tokenizer: Any) -> dict[str, Any]:
    return {"id": name, "ids": ids, "tokens": tokenizer.convert_ids_to_tokens(ids)}


def _with_template(processor: dict | None, prefix: list[str], suffix: list[str]) -> dict:
    """A post-processor (as JSON) that adds the template's pieces around the text ($A), inside whatever
    special tokens the tokenizer already adds (Llama 3's BOS, BERT's [CLS] ... [SEP])."""
    processor, template = _template_processing(processor)
    for key in ("single", "pair"):
        pieces, out = template[key], []
        for piece in pieces:
            seq = piece.get("Sequence", {}).get("id")
            if seq == "A":  # the first text; a pair's second text gets no frame of its own
                out += [{"SpecialToken": {"id": name, "type_id": 0}} for name in prefix]
            out.append(piece)
            if seq == ("B" if key == "pair" else "A"):
                out += [{"SpecialToken": {"id": name, "type_id": 0}} for name in suffix]
        template[key] = out
    return processor


def apply_template(tokenizer: Any, template: str | None) -> None:
    """Put `template` (None: nothing) into the tokenizer's post-processor; kept by save_pretrained."""
    if template is None:
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LlmclfError(
            f"The prompt template needs a fast tokenizer; {type(tokenizer).__name__} is not one. Give "
            "--prompt-template none."
        )
    from tokenizers import Tokenizer

    before, after = template.split(PLACEHOLDER)
    ids = [tokenizer(part, add_special_tokens=False)["input_ids"] if part else [] for part in (before, after)]
    state = json.loads(backend.to_str())
    if any(name in json.dumps(state.get("post_processor")) for name in PIECES):
        raise LlmclfError("This tokenizer already holds a prompt template (a run folder's copy).")
    prefix, suffix = ([name] if part else [] for name, part in zip(PIECES, ids, strict=True))
    processor = _with_template(state.get("post_processor"), prefix, suffix)
    _specials(processor).update(
        {name: _template_piece(name, part, tokenizer) for name, part in zip(PIECES, ids, strict=True) if part}
    )
    state["post_processor"] = processor
    backend.post_processor = Tokenizer.from_str(json.dumps(state)).post_processor


def _specials(processor: dict) -> dict:
    """The special-token table of the TemplateProcessing that holds the template pieces."""
    if processor.get("type") == "Sequence":
        return _specials(next(p for p in processor["processors"] if p.get("type") == "TemplateProcessing"))
    return processor.setdefault("special_tokens", {})


def template_ids(tokenizer: Any) -> dict[str, list[int]]:
    """The prefix and suffix token ids the tokenizer's template adds (empty lists where none)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()).get("post_processor") if backend is not None else None
    found = {name: [] for name in PIECES}
    for processor in (state or {}).get("processors", [state or {}]):
        for name, token in (processor.get("special_tokens") or {}).items():
            if name in found:
                found[name] = list(token["ids"])
    return found


def _plain_template() -> dict:
    """A post-processor (as JSON) that adds nothing: the text ($A), or the pair ($A $B)."""
    return {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {},
    }


def _template_processing(processor: dict | None) -> tuple[dict, dict]:
    """(the post-processor to install, its TemplateProcessing to edit), one added where it has none."""
    plain = _plain_template()
    if processor is None:
        return plain, plain
    if processor.get("type") == "TemplateProcessing":
        return processor, processor
    inner = processor.get("processors", []) if processor.get("type") == "Sequence" else [processor]
    found = next((p for p in inner if p.get("type") == "TemplateProcessing"), None)
    if found is not None:
        return processor, found
    return {"type": "Sequence", "processors": [*inner, plain]}, plain


def separate_pairs(tokenizer: Any) -> None:
    """Put PAIR_SEPARATOR's tokens between a pair's two texts where the tokenizer's pair rule puts
    nothing between them, so that "A" + "B" never reads as one text. Kept by save_pretrained, so the
    exported tokenizer and `pipeline()` join pairs alike."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LlmclfError(
            f"Text pairs need a fast tokenizer; {type(tokenizer).__name__} is not one. Use a model with a "
            "tokenizer.json."
        )
    from tokenizers import Tokenizer

    state = json.loads(backend.to_str())
    processor, template = _template_processing(state.get("post_processor"))
    pieces = template["pair"]
    kinds = [next(iter(piece)) for piece in pieces]
    ids = [piece.get("Sequence", {}).get("id") for piece in pieces]
    a, b = ids.index("A"), ids.index("B")
    if "SpecialToken" in kinds[a + 1 : b]:
        return  # BERT's [SEP], or a separator already there
    sep = tokenizer(PAIR_SEPARATOR, add_special_tokens=False)["input_ids"]
    pieces.insert(a + 1, {"SpecialToken": {"id": SEPARATOR, "type_id": 0}})
    template.setdefault("special_tokens", {})[SEPARATOR] = _template_piece(SEPARATOR, sep, tokenizer)
    state["post_processor"] = processor
    backend.post_processor = Tokenizer.from_str(json.dumps(state)).post_processor
