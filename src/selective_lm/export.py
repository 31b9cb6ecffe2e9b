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

A partial score store (`scoring.blocks=used`, the default study's: only the blocks its grid reads
are scored) is exported as far as it goes: the blocks with reference losses, and the summary says
how many of how many (`blocks`, `blocks_total`, `note`). A document cut by a block left out gives
one line per piece, with `"complete": false`. `export.blocks=all` scores the missing blocks with
the reference first (in memory, with a progress bar; the store is not changed) and exports all.
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
from .method.loss import forward_hidden, token_entropies, token_losses
from .method.registry import SCORE_KINDS
from .method.selection import scores, select, trainable_mask
from .store.blocks import decode_scores
from .store.layout import OutDir, TokenStore
from .training.models import load_tokenizer, load_trained, token_texts, tokenizer_fingerprint


def _documents(doc_ids: np.ndarray, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(doc id, flat positions) of each document piece over the row-major token stream of blocks `rows`
    (sorted): a document also breaks where a block between two exported ones is not exported."""
    sub = doc_ids[rows]
    flat = sub.reshape(-1)
    gaps = (np.flatnonzero(np.diff(rows) != 1) + 1) * sub.shape[1]
    bounds = np.union1d(np.flatnonzero(np.diff(flat)) + 1, gaps).astype(np.int64)
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


def _complete_scores(cfg: Config, out: OutDir, store: TokenStore, ref: np.ndarray,
                     missing: np.ndarray) -> np.ndarray:
    """The score store's values with the `missing` blocks scored by the reference, as `slm score` would
    store them (rounded to scoring.dtype); in memory: the store itself stays as it is."""
    from .store.frozen import encode_losses, model_token_losses
    from .training.models import load_reference_model

    values = np.array(ref, dtype=np.float32)
    model = load_reference_model(cfg, out)
    bs, dtype = cfg.scoring.batch_size, out.score_dtype("train")
    for start in tqdm(range(0, len(missing), bs), desc="score missing blocks", unit="batch", dynamic_ncols=True):
        rows = missing[start : start + bs]
        ids = torch.from_numpy(np.asarray(store.tokens[rows], dtype=np.int64))
        valid = torch.from_numpy(store.targets(rows, doc_boundaries=False, loss_mask=False))
        losses = model_token_losses(model, ids, valid, cfg.scoring.chunk_size)
        values[rows] = decode_scores(encode_losses(losses, dtype), dtype)
    return values


def _export_rows(cfg: Config, out: OutDir, store: TokenStore, ref: Any) -> tuple[np.ndarray, Any, dict[str, Any]]:
    """(blocks to export, reference losses, what the summary says about them). A partial score store
    (scoring.blocks=used) covers only the blocks a grid reads: export those, or with export.blocks=all
    score the others first."""
    everything = np.arange(store.n_blocks)
    if ref is None:
        return everything, None, {}
    scored = np.isfinite(np.asarray(ref[:, 1:])).all(axis=1)
    if scored.all():
        return everything, ref, {}
    if cfg.export.blocks == "all":
        return everything, _complete_scores(cfg, out, store, ref, np.flatnonzero(~scored)), \
            {"scored_for_export": int((~scored).sum())}
    rows = np.flatnonzero(scored)
    note = (f"the score store is partial (scoring.blocks=used): exported the {len(rows)} of {store.n_blocks} train "
            "blocks that have reference losses; export.blocks=all scores the others first")
    return rows, ref, {"note": note}


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
    rows, ref, coverage = _export_rows(cfg, out, store, ref)
    model = load_trained(cfg.model, run.weights_dir, len(tokenizer))
    model.eval().requires_grad_(False)
    n_blocks, block_len = store.tokens.shape
    keep = np.zeros((n_blocks, block_len), dtype=bool)
    score_arr = np.full((n_blocks, block_len), np.nan, dtype=np.float32)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    bs = 8 if cfg.scoring.batch_size == "auto" else cfg.scoring.batch_size  # the CPU's auto
    with torch.no_grad():
        for start in tqdm(range(0, len(rows), bs), desc=f"export {run.name}", unit="batch", dynamic_ncols=True):
            batch = rows[start : start + bs]
            ids = torch.from_numpy(np.asarray(store.tokens[batch], dtype=np.int64))
            noise = torch.from_numpy(np.array(store.noise_mask[batch])) if store.noise_mask is not None else None
            # The trainer's targets: no document's first token under data.doc_boundaries, no prompt token.
            valid = trainable_mask(torch.from_numpy(store.targets(batch, cfg.data.doc_boundaries)), noise,
                                   oracle=cfg.train.method == "oracle" and noise is not None)
            hidden, head = forward_hidden(model, ids)
            own = token_losses(hidden, head, ids, valid, chunk_size=cfg.scoring.chunk_size)
            ref_rows = torch.from_numpy(np.array(ref[batch])) if ref is not None else None
            # A score kind of the student's own distribution (entropy) reads the trained model's, as it selects.
            entropy = token_entropies(hidden, head, ids, valid, chunk_size=cfg.scoring.chunk_size) \
                if "student_logits" in SCORE_KINDS[rule.score].needs else None
            s = scores(rule.score, own, ref_rows, entropy=entropy)
            chosen = select(s, rule.ratio, rule.strategy, "sequence", valid, gen, temperature=cfg.train.temperature,
                            threshold=rule.threshold)
            keep[batch], score_arr[batch] = chosen.numpy(), torch.where(valid, s, torch.nan).numpy()
    counts = {"blocks": len(rows), "blocks_total": n_blocks, **coverage}
    if cfg.export.format == "hf":
        return {**_export_hf(out.selected_hf, np.asarray(store.tokens[rows]), keep[rows],
                             int(np.isfinite(score_arr).sum()), run.name), **counts}
    documents = store.meta.get("documents") or []
    doc_ids = np.asarray(store.doc_ids)
    doc_sizes = np.bincount(doc_ids.reshape(-1))
    tokens, keep, score_arr = np.asarray(store.tokens)[rows].reshape(-1), keep[rows].reshape(-1), \
        score_arr[rows].reshape(-1)
    path = out.selected_jsonl
    n_docs = n_kept = n_valid = 0
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for doc, pos in _documents(doc_ids, rows):
            ids = tokens[pos].tolist()
            k, sc = keep[pos], score_arr[pos]
            text, spans = _spans(token_texts(tokenizer, ids), k, sc)
            record = {"run": run.name, "doc_id": doc, "source_id": documents[doc] if doc < len(documents) else None,
                      "method": summary["method"], "ratio": summary["ratio"], "score": rule.score,
                      "n_tokens": len(ids), "complete": len(ids) == int(doc_sizes[doc]),
                      "n_selected": int(k.sum()), "text": text, "spans": spans,
                      "selected_text": "".join(text[s["start"]:s["end"]] for s in spans)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n_docs, n_kept, n_valid = n_docs + 1, n_kept + int(k.sum()), n_valid + int(np.isfinite(sc).sum())
    return {"path": str(path), "documents": n_docs, "selected_tokens": n_kept,
            "selected_frac": n_kept / max(n_valid, 1), **counts}


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
