"""Chat conversations as text: rendered with the tokenizer's chat template, the assistant turns located.

`slm prepare` renders each chat document here (corpora stay free of tokenizers); the assistant
turns become the document's trained character spans, so the loss mask covers exactly them. The
TRL recipe (`hf_trainer.selective_sft_trainer`) labels conversations with the same spans
(`chat_labels`), so both train the same tokens of a conversation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from ..errors import UserError, first_line
from .corpora import Document

# What render_chat's errors name: where the conversation came from, and the way out (slm prepare's here).
PREPARE_ADVICE = ("data.messages_field", "use data.format=prompt_response")


def render_chat(tokenizer: Any, messages: Sequence[dict[str, Any]],
                advice: tuple[str, str] = PREPARE_ADVICE) -> tuple[str, tuple[tuple[int, int], ...]]:
    """A conversation rendered with the tokenizer's chat template, and its assistant turns' character spans.

    The span of assistant message i is [len(P), len(F)) where P renders messages[:i] with the
    generation prompt (what the model is given) and F renders messages[:i+1] (so the span holds the
    answer and the template's end-of-turn text, which the model must learn to produce). Both must be
    prefixes of the whole rendering; a template that rewrites earlier turns (e.g. drops past
    reasoning) cannot be masked this way and is refused. `advice`: what the errors name (the conversation's
    source, and the way out).
    """
    source, way_out = advice
    def render(msgs: Sequence[dict[str, Any]], generation_prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja's errors (raise_exception in templates, bad roles, ...) are about the data
            raise UserError(f"the chat template of {tokenizer.name_or_path} cannot render a conversation of "
                            f"{source}: {first_line(e)}") from None

    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], generation_prompt=True), render(messages[:i + 1])
        if not (full.startswith(upto) and upto.startswith(prompt)):
            raise UserError(f"the chat template of {tokenizer.name_or_path} does not render conversations "
                            "incrementally (a conversation's rendering does not start with that of its first turns), "
                            f"so the assistant turns cannot be located: {way_out}")
        spans.append((len(prompt), len(upto)))
    return full, tuple(spans)


def rendered(tokenizer: Any, doc: Document) -> Document:
    """A chat document (`messages`) as text and trained spans; other documents as they are."""
    if doc.messages is None:
        return doc
    text, trained = render_chat(tokenizer, doc.messages)
    return replace(doc, text=text, trained=trained, messages=None)


def in_spans(first: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """bool per token: whether its first character (`first`, from the offsets mapping) lies in one of the
    character spans [a, b): a token that straddles a span's start belongs to what precedes it."""
    inside = np.zeros(len(first), np.bool_)
    for a, b in spans:
        inside |= (first >= a) & (first < b)
    return inside


def chat_labels(tokenizer: Any, messages: Sequence[dict[str, Any]],
                advice: tuple[str, str] = PREPARE_ADVICE) -> dict[str, list[int]]:
    """A conversation as a pre-tokenized row: `input_ids` of its chat-template rendering, tokenized as
    `apply_chat_template(tokenize=True)` tokenizes it (no special tokens added), and `labels`, the ids on the
    assistant turns' tokens (`render_chat`'s spans, the tokens `slm prepare` trains) and -100 elsewhere."""
    text, spans = render_chat(tokenizer, messages, advice)
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"locating the assistant turns' tokens needs a fast tokenizer (offsets), and "
                        f"{type(tokenizer).__name__} is not one: load it with AutoTokenizer.from_pretrained(..., "
                        "use_fast=True)")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    first = np.fromiter((start for start, _ in enc["offset_mapping"]), np.int64, len(ids))
    trained = in_spans(first, spans)
    return {"input_ids": ids, "labels": [i if t else -100 for i, t in zip(ids, trained.tolist(), strict=True)]}
