"""Corpora behind one registry: `data.corpus` names an entry of `CORPORA`.

The contract: a corpus is a function `(data: DataConfig) -> dict[split, Split]`. Each `Split`
holds an iterable of `Document`s (consumed once, streamed: it may be a generator over a corpus
larger than memory) and extra `meta.json` fields for that split (`sources`, `problems`, ...).
`slm prepare` tokenizes and packs the documents, injects noise into `train` when
`data.noise_rate > 0`, and writes one token store per split. The splits the study reads are
`reference` (the reference model's data), `train`, and the `eval.splits` (by default
`val_clean`, `val_noisy`); a corpus may provide any subset and more. Documents with `trained`
spans (or `messages`, see `Document`) give supervised fine-tuning stores, whose `loss_mask.npy`
is False on the prompt tokens.

Adding a corpus is one new file in this package:

    # corpora/mycorpus.py
    from . import Document, Split, register

    @register("mycorpus")
    def mycorpus(data):
        docs = [Document(t) for t in ("first document", "second document")]
        return {"train": Split(docs, {"sources": {"corpus": "mycorpus"}})}

Every module of this package is imported when the registry is first used, so the file is all
it takes (`data.corpus=mycorpus`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ...config import DataConfig


@dataclass(frozen=True)
class Document:
    """One document to pack. `group` (e.g. a CHAMP problem) keeps foreign-step noise from its own
    group; the first `protect` characters are never corrupted; `origin` is counted in meta.json;
    `source_id` is listed there so exported selections can name their source.

    Supervised fine-tuning data: `trained` holds the character spans [start, end) of `text` that
    are trained (a response, the assistant turns); None trains all of it. A chat corpus cannot
    render its conversations without the tokenizer, so it gives `messages` (role/content dicts)
    and an empty `text`: `slm prepare` renders them with the tokenizer's chat template into
    `text` and `trained` (`chat.render_chat`), which keeps corpora free of model loading.

    `labels`: character spans [start, end) of `text` with a label kind (`noise.LABEL_KINDS`: CHAMP's
    annotated first wrong step); recorded in `noise_kind.npy` of a `Split` with `labelled=True`.
    """

    text: str
    source_id: str | None = None
    group: str | None = None
    protect: int = 0
    origin: str = "custom"
    trained: tuple[tuple[int, int], ...] | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    labels: tuple[tuple[int, int, str], ...] | None = None


@dataclass(frozen=True)
class Split:
    """A split's documents (an iterable consumed once) and extra fields for its meta.json; `labelled`:
    its documents' `labels` are recorded (noise_kind.npy even without injected noise)."""

    documents: Iterable[Document]
    meta: dict[str, Any] = field(default_factory=dict)
    labelled: bool = False


Corpus = Callable[["DataConfig"], dict[str, Split]]
CORPORA: dict[str, Corpus] = {}


def register(name: str) -> Callable[[Corpus], Corpus]:
    """Decorator: make a corpus function available as `data.corpus=<name>`."""

    def add(fn: Corpus) -> Corpus:
        CORPORA[name] = fn
        return fn

    return add


def _discover() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_discover()
