"""`slm export-selected`: the training documents with the tokens a run's selection keeps, as JSONL or HF.

For building a "concentrated" dataset from the selection. The run's final model gives its
own per-token losses, the score store the reference's, and the run's own strategy, score
kind and ratio pick the tokens — per block (`sequence` scope), with a generator seeded by
`train.seed`, so the export is deterministic. One line per document (a document spans
blocks): its text, the selected character spans, the selected text, and per-span mean scores.

`export.format=hf` (`--format hf`) writes instead a `datasets` directory with one row per block
of the train store: `input_ids`, `labels` (the token where it is selected, -100 elsewhere) and
`attention_mask`, so any trainer that shifts labels the Hugging Face way (transformers'
causal-LM loss: position t's logits predict `labels[t + 1]`) trains on exactly the selected
tokens, without this package: `datasets.load_from_disk(path)` and transformers' `Trainer`.
A supervised fine-tuning store's prompt tokens are never selected, so their labels are -100.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import Config
from .errors import UserError
from .files import atomic_dir, atomic_path
from .layout import OutDir
from .loss import forward_hidden, token_losses
from .models import load_tokenizer, load_trained, token_texts, tokenizer_fingerprint
from .selection import scores, select, trainable_mask


def _documents(doc_ids: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(doc id, flat positions) of each document, in order, over the row-major token stream."""
    flat = doc_ids.reshape(-1)
    bounds = np.flatnonzero(np.diff(flat)) + 1
    for start, stop in zip(np.r_[0, bounds], np.r_[bounds, flat.size], strict=True):
        yield int(flat[start]), np.arange(start, stop)


def _spans(texts: list[str], keep: np.ndarray, score: np.ndarray) -> tuple[str, list[dict[str, Any]]]:
    """Join token texts; return the text and the maximal runs of kept tokens as character spans."""
    offsets = np.cumsum([0] + [len(t) for t in texts])
    spans: list[dict[str, Any]] = []
    i = 0
    while i < len(texts):
        if not keep[i]:
            i += 1
            continue
        j = i
        while j < len(texts) and keep[j]:
            j += 1
        finite = score[i:j][np.isfinite(score[i:j])]
        spans.append({"start": int(offsets[i]), "end": int(offsets[j]),
                      "score": float(finite.mean()) if finite.size else None})
        i = j
    return "".join(texts), spans


def export_selected(cfg: Config, out: str | Path | OutDir) -> dict[str, Any]:
    """Write `out/selected.jsonl` for the run that `train.*` names (each line names the run); returns counts."""
    out = OutDir.of(out)
    run = out.run(cfg.run_name())
    summary = run.summary  # says `run slm train` when the run has not finished
    if cfg.reference.is_self and cfg.train.needs_reference():
        raise UserError(f"export-selected rescores with a stored reference; reference.mode={cfg.reference.mode} "
                        "selected with the student's own weights, online: nothing to rescore with")
    rule = cfg.train.selection_rule()
    store = out.store("train")
    tokenizer = load_tokenizer(cfg.model)
    ref = out.scores("train", store, tokenizer_fingerprint(tokenizer), cfg.scoring.dtype) \
        if cfg.train.needs_reference() else None
    model = load_trained(cfg.model, run.weights_dir, len(tokenizer))
    model.eval().requires_grad_(False)
    n_blocks, block_len = store.tokens.shape
    keep = np.zeros((n_blocks, block_len), dtype=bool)
    score_arr = np.full((n_blocks, block_len), np.nan, dtype=np.float32)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    bs = cfg.scoring.batch_size
    with torch.no_grad():
        for start in tqdm(range(0, n_blocks, bs), desc=f"export {run.name}", unit="batch", dynamic_ncols=True):
            rows = slice(start, min(start + bs, n_blocks))
            ids = torch.from_numpy(np.asarray(store.tokens[rows], dtype=np.int64))
            noise = torch.from_numpy(np.array(store.noise_mask[rows])) if store.noise_mask is not None else None
            # The trainer's targets: no document's first token under data.doc_boundaries, no prompt token.
            valid = trainable_mask(torch.from_numpy(store.targets(rows, cfg.data.doc_boundaries)), noise,
                                   oracle=cfg.train.method == "oracle" and noise is not None)
            hidden, head = forward_hidden(model, ids)
            own = token_losses(hidden, head, ids, valid, chunk_size=cfg.scoring.chunk_size)
            ref_rows = torch.from_numpy(np.array(ref[rows])) if ref is not None else None
            s = scores(rule.score, own, ref_rows)
            chosen = select(s, rule.ratio, rule.strategy, "sequence", valid, gen, temperature=cfg.train.temperature,
                            threshold=rule.threshold)
            keep[rows], score_arr[rows] = chosen.numpy(), torch.where(valid, s, torch.nan).numpy()
    if cfg.export.format == "hf":
        return _export_hf(out.selected_hf, np.asarray(store.tokens), keep, int(np.isfinite(score_arr).sum()),
                          run.name)
    documents = store.meta.get("documents") or []
    path = out.selected_jsonl
    n_docs = n_kept = n_valid = 0
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for doc, pos in _documents(np.asarray(store.doc_ids)):
            ids = np.asarray(store.tokens).reshape(-1)[pos].tolist()
            k, sc = keep.reshape(-1)[pos], score_arr.reshape(-1)[pos]
            text, spans = _spans(token_texts(tokenizer, ids), k, sc)
            record = {"run": run.name, "doc_id": doc, "source_id": documents[doc] if doc < len(documents) else None,
                      "method": summary["method"], "ratio": summary["ratio"], "score": rule.score,
                      "n_tokens": len(ids), "n_selected": int(k.sum()), "text": text, "spans": spans,
                      "selected_text": "".join(text[s["start"]:s["end"]] for s in spans)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n_docs, n_kept, n_valid = n_docs + 1, n_kept + int(k.sum()), n_valid + int(np.isfinite(sc).sum())
    return {"path": str(path), "documents": n_docs, "selected_tokens": n_kept,
            "selected_frac": n_kept / max(n_valid, 1)}


def _export_hf(path: Path, tokens: np.ndarray, keep: np.ndarray, n_valid: int, run_name: str) -> dict[str, Any]:
    """The blocks with their selection as labels, written atomically as a `datasets` directory (built in
    memory: the store's size in Python lists)."""
    import datasets

    labels = np.where(keep, tokens, -100)
    table = {"input_ids": tokens.astype(np.int64).tolist(), "labels": labels.astype(np.int64).tolist(),
             "attention_mask": np.ones_like(tokens, dtype=np.int8).tolist()}
    with atomic_dir(path) as tmp:
        datasets.Dataset.from_dict(table).save_to_disk(str(tmp))
    n_kept = int(keep.sum())
    return {"path": str(path), "run": run_name, "blocks": len(tokens), "selected_tokens": n_kept,
            "selected_frac": n_kept / max(n_valid, 1)}
