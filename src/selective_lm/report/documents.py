"""report.md's table of the training documents a run trained least and most, for any corpus.

From the run's own totals (`runs/<run>/doc_selection.npz`: per document, the weight it trained and the target
tokens it read, summed over every step by the trainer), so the share is what the run really trained, not a
replay. The documents a selection keeps dropping are where a user reads for the garbage in their data; the step-0
excess loss (`step0.py`) says how far the reference was ahead of the student there, and a snippet shows the text.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..analysis.documents import extremes, group_means, trained_shares
from ..errors import UserError
from ..store.layout import OutDir, TokenStore
from ..training.models import token_texts
from .selection import NA, fmt, md_table
from .step0 import read_step0

DOC_ROWS = 5  # documents in each of the two tables
MIN_DOC_TOKENS = 20  # a document read for fewer targets is not ranked: its share rests on a handful of tokens
SNIPPET_TOKENS = 160  # at least SNIPPET_CHARS characters with a byte-level tokenizer
SNIPPET_CHARS = 100
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def md_text(text: str) -> str:
    """Text as literal Markdown (a table cell): one line, HTML escaped, Markdown's markup characters backslashed."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(" ".join(text.split()), quote=False))


def main_run(runs: dict[str, dict[str, Any]], candidates: Sequence[str]) -> str | None:
    """The run the table is about: the first top-k run of `candidates` (the report's order), else the first one."""
    return next((n for n in candidates if runs[n].get("method") == "topk"), next(iter(candidates), None))


def snippet(store: TokenStore, doc: int, tokenizer: Any) -> str:
    """The start of document `doc` (doc ids increase along the store: a binary search finds it), decoded."""
    flat_docs = store.doc_ids.reshape(-1)
    start = int(np.searchsorted(flat_docs, doc))
    if tokenizer is None or start >= flat_docs.size or flat_docs[start] != doc:
        return NA
    end = min(start + SNIPPET_TOKENS, flat_docs.size)
    ids = np.asarray(store.tokens.reshape(-1)[start:end])[np.asarray(flat_docs[start:end]) == doc]
    text = " ".join("".join(token_texts(tokenizer, ids.tolist())).split())
    return md_text(text[:SNIPPET_CHARS] + ("…" if len(text) > SNIPPET_CHARS else "")) or NA


def _doc_excess(out: OutDir, store: TokenStore, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each document's mean step-0 excess loss and its token count, over the blocks where it was measured."""
    excess = read_step0(out, store, np.zeros(0, np.int64)).excess
    if not excess:
        return np.full(len(docs), np.nan), np.zeros(len(docs), np.int64)
    rows = np.array(sorted(excess))
    return group_means(np.asarray(store.doc_ids[rows]), np.stack([excess[r] for r in rows.tolist()]), docs)


def documents_section(out: OutDir, run: str | None, entry: dict[str, Any], tokenizer: Any) -> str:
    """The section: `run`'s DOC_ROWS documents of lowest and of highest trained share, with their step-0 excess
    and the start of their text; `entry` is its results.json entry (its method, and its steps: to say when the
    totals cover fewer)."""
    title = "## Documents trained least and most"
    path = out.run(run).doc_selection if run else None
    if path is None or not path.is_file():
        why = "no selecting run" if run is None else f"no runs/{run}/doc_selection.npz (trained before it existed)"
        return f"{title}\n\nNo per-document selection: {why}."
    with np.load(path) as z:
        doc_ids, selected, valid, counted = z["doc_ids"], z["selected"], z["valid"], int(z["steps"])
    keep, shares = trained_shares(selected, valid, MIN_DOC_TOKENS)
    if not keep.size:
        return f"{title}\n\n`{run}` read no document for {MIN_DOC_TOKENS} target tokens or more."
    low, high = extremes(shares, DOC_ROWS)
    chosen = np.concatenate([low, high])
    docs = doc_ids[keep[chosen]]
    try:
        store: TokenStore | None = out.store("train")
    except UserError:
        store = None
    mean, count = _doc_excess(out, store, docs) if store is not None else (np.full(len(docs), np.nan), None)
    rows = []
    for i, pos in enumerate(chosen.tolist()):
        d = int(docs[i])
        excess = NA if count is None or not count[i] else f"{mean[i]:+.3f} ({count[i]:,} tokens)"
        rows.append([f"{d}", fmt(shares[pos], ".3f"), f"{valid[keep[pos]]:,.0f}", excess,
                     snippet(store, d, tokenizer) if store is not None else NA])
    steps = entry.get("steps")
    over = f"its {counted} steps" if steps is None or counted >= steps else \
        f"its last {counted} of {steps} steps, as it resumed from a checkpoint made before these totals"
    left = len(doc_ids) - keep.size
    header = ["document", "share trained", "targets read", "mean excess (step 0)", "start of the document"]
    text = [title, f"Per training document (its id in `data/train/doc_ids.npy`): the share of its target tokens "
            f"that `{run}` trained — trained weight ÷ targets read, summed over {over} (`runs/{run}/"
            f"doc_selection.npz`) — among the {keep.size:,} documents it read for at least {MIN_DOC_TOKENS} targets"
            + (f" ({left:,} read for fewer are left out)" if left else "") + ". *Mean excess*: the base model's "
            "loss minus the reference's (the score every student starts from) over the document's tokens in the "
            "train blocks the base model was evaluated on (— where none)."
            + (" Top-k on excess loss trains least the documents the reference predicts no better than the base "
               "model: text unlike the reference's data (garbage, boilerplate, another language) or text both find "
               "easy." if entry.get("method") == "topk" else "")
            + ("" if tokenizer is not None else " No tokenizer given: no text shown.")]
    text += ["### Trained least", md_table(header, rows[: len(low)])]
    if len(high):
        text += ["### Trained most", md_table(header, rows[len(low):])]
    return "\n\n".join(text)
