"""Chat conversations as text: rendered with the tokenizer's chat template, the assistant turns located.

`slm prepare` renders each chat document here (corpora stay free of tokenizers); the assistant
turns become the document's trained character spans, so the loss mask covers exactly them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..errors import UserError, first_line
from .corpora import Document


def render_chat(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> tuple[str, tuple[tuple[int, int], ...]]:
    """A conversation rendered with the tokenizer's chat template, and its assistant turns' character spans.

    The span of assistant message i is [len(P), len(F)) where P renders messages[:i] with the
    generation prompt (what the model is given) and F renders messages[:i+1] (so the span holds the
    answer and the template's end-of-turn text, which the model must learn to produce). Both must be
    prefixes of the whole rendering; a template that rewrites earlier turns (e.g. drops past
    reasoning) cannot be masked this way and is refused.
    """
    def render(msgs: Sequence[dict[str, Any]], generation_prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja's errors (raise_exception in templates, bad roles, ...) are about the data
            raise UserError(f"the chat template of {tokenizer.name_or_path} cannot render a conversation of "
                            f"data.messages_field: {first_line(e)}") from None

    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], generation_prompt=True), render(messages[:i + 1])
        if not (full.startswith(upto) and upto.startswith(prompt)):
            raise UserError(f"the chat template of {tokenizer.name_or_path} does not render conversations "
                            "incrementally (a conversation's rendering does not start with that of its first turns), "
                            "so the assistant turns cannot be located: use data.format=prompt_response")
        spans.append((len(prompt), len(upto)))
    return full, tuple(spans)


def rendered(tokenizer: Any, doc: Document) -> Document:
    """A chat document (`messages`) as text and trained spans; other documents as they are."""
    if doc.messages is None:
        return doc
    text, trained = render_chat(tokenizer, doc.messages)
    return replace(doc, text=text, trained=trained, messages=None)
