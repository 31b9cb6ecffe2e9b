"""`slm prepare`: take each split of the corpus (`corpora/`), tokenize and pack it into a token store.

Packing: every document is tokenized without special tokens and followed by one EOS; the
documents are concatenated and cut into blocks of `data.block_len`. The final incomplete
block is dropped (`dropped_tail_tokens` in meta.json); no other token is lost or repeated.
`data.max_tokens` caps a split: the stream stops once the cap is reached (the last document
is cut there). The `train` split gets injected noise when `data.noise_rate > 0` (noise.py):
then `noise_kind.npy` holds every token's kind id (names in meta.json `noise.kind_names`; the
EOS is clean) and `noise_mask.npy` is True on the noise kinds only (`noise.KINDS`).

A store is written streaming — blocks are appended to .npy files whose header is rewritten
in place at the end (`layout.BlockFile`) — so memory stays bounded whatever the corpus size,
and atomically (`files.atomic_dir`), so a killed prepare never leaves a half store behind.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import __version__
from .config import SPLITS, Config
from .corpora import CORPORA, Document
from .errors import UserError, did_you_mean
from .files import atomic_dir, write_json
from .layout import STORE_FORMAT, BlockFile, OutDir, load_store, store_config_fingerprint
from .noise import KIND_NAMES, KINDS, NOISE_IDS, NoiseInjector, is_noise, noise_chars, token_kinds

BATCH_DOCS = 64  # documents per tokenizer call: fast tokenizers batch in Rust, memory stays small
FLUSH_BLOCKS = 256  # blocks gathered before each write


class _Packer:
    """Concatenate documents and write full blocks; only the unfinished blocks stay in memory."""

    def __init__(self, root: Path, block_len: int, cap: int | None, noise: bool) -> None:
        self.block_len, self.cap = block_len, cap
        self.files = {"tokens": BlockFile(root / "tokens.npy", np.int32, block_len),
                      "doc_ids": BlockFile(root / "doc_ids.npy", np.int32, block_len)}
        if noise:
            self.files["noise_mask"] = BlockFile(root / "noise_mask.npy", np.bool_, block_len)
            self.files["noise_kind"] = BlockFile(root / "noise_kind.npy", np.uint8, block_len)
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.n_pending = self.accepted = self.n_docs = self.stored_docs = 0
        self.source_ids: list[str] = []
        self.origins: list[str] = []
        self.origin_codes = bytearray()  # per document: index into self.origins
        self.origin_tokens = np.zeros(256, np.int64)
        self.kind_tokens = np.zeros(len(KIND_NAMES), np.int64)
        self.hash = hashlib.sha256()

    def add(self, doc: Document, ids: np.ndarray, kinds: np.ndarray) -> bool:
        """Append one document (EOS included); True once the cap is reached."""
        if self.cap is not None:
            ids, kinds = ids[: self.cap - self.accepted], kinds[: self.cap - self.accepted]
        if doc.origin not in self.origins:
            self.origins.append(doc.origin)
        self.origin_codes.append(self.origins.index(doc.origin))
        if doc.source_id is not None:
            self.source_ids.append(doc.source_id)
        self.pending.append((ids, np.full(len(ids), self.n_docs, np.int32), kinds))
        self.n_docs += 1
        self.n_pending += len(ids)
        self.accepted += len(ids)
        if self.n_pending >= FLUSH_BLOCKS * self.block_len:
            self._flush()
        return self.cap is not None and self.accepted >= self.cap

    def _flush(self) -> None:
        tokens, docs, kinds = (np.concatenate(parts) for parts in zip(*self.pending, strict=True))
        n = len(tokens) // self.block_len * self.block_len
        if n:
            rows = {"tokens": tokens[:n], "doc_ids": docs[:n],
                    "noise_mask": is_noise(kinds[:n]), "noise_kind": kinds[:n]}
            for name, f in self.files.items():
                f.append(rows[name].reshape(-1, self.block_len))
                self.hash.update(rows[name].tobytes())
            self.kind_tokens += np.bincount(kinds[:n], minlength=len(self.kind_tokens))
            codes = np.frombuffer(bytes(self.origin_codes), np.uint8)[docs[:n]]
            self.origin_tokens += np.bincount(codes, minlength=256)
            self.stored_docs = int(docs[n - 1]) + 1
        self.pending = [(tokens[n:], docs[n:], kinds[n:])]
        self.n_pending = len(tokens) - n

    def finish(self) -> None:
        if self.pending:
            self._flush()
        self.close(finished=True)

    def close(self, finished: bool = False) -> None:
        for f in self.files.values():
            if not f.f.closed:
                f.close(finished)


def _batches(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    it = (d for d in docs if d.text.strip())
    while batch := list(itertools.islice(it, size)):
        yield batch


def write_store(path: str | Path, docs: Iterable[Document], tokenizer: Any, block_len: int, *,
                cap: int | None = None, injector: NoiseInjector | None = None,
                meta: dict[str, Any] | None = None, label: str = "store") -> dict[str, Any]:
    """Tokenize, inject noise (if `injector`), pack and write one store atomically; returns its meta.json.

    `docs` may be a generator of any length: it is consumed in batches of BATCH_DOCS.
    """
    from .models import tokenizer_fingerprint

    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError(f"tokenizer {tokenizer.name_or_path} has no EOS token: packing needs a document separator")
    if injector is not None and not tokenizer.is_fast:
        raise UserError("noise injection maps characters to tokens and needs a fast tokenizer; "
                        "set data.noise_rate=0 or use a tokenizer with a tokenizer.json")
    path = Path(path)
    with atomic_dir(path) as tmp, tqdm(total=cap, unit="tok", desc=f"prepare {label}", disable=None) as bar:
        packer = _Packer(tmp, block_len, cap, noise=injector is not None)
        try:
            for batch in _batches(docs, BATCH_DOCS):
                if _pack_batch(batch, tokenizer, eos, injector, packer, bar):
                    break
            packer.finish()
        finally:
            packer.close()
        if packer.n_docs == 0:
            raise UserError(f"{label}: the corpus has no non-empty documents")
        n_blocks = packer.files["tokens"].rows
        if n_blocks == 0:
            raise UserError(f"{label}: {packer.accepted} tokens do not fill one block of "
                            f"data.block_len={block_len}; add documents or lower data.block_len")
        n_tokens = n_blocks * block_len
        info = {
            "format": STORE_FORMAT,
            "tokenizer": tokenizer.name_or_path, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "eos_id": int(eos), "block_len": block_len, "n_blocks": n_blocks, "n_tokens": n_tokens,
            "n_docs": packer.stored_docs, "dropped_tail_tokens": packer.accepted - n_tokens,
            "max_tokens": cap, "capped": cap is not None and packer.accepted >= cap,
            "tokens_by_origin": {o: int(packer.origin_tokens[i]) for i, o in enumerate(packer.origins)},
            "noise": _noise_meta(injector, packer, n_tokens),
            "fingerprint": packer.hash.hexdigest()[:16],
            "created_by": __version__,
            **(meta or {}),
        }
        if packer.source_ids:
            info["documents"] = packer.source_ids[: packer.stored_docs]
        write_json(tmp / "meta.json", info)
    return info


def _pack_batch(batch: list[Document], tokenizer: Any, eos: int, injector: NoiseInjector | None,
                packer: _Packer, bar: tqdm) -> bool:
    """Tokenize one batch of documents into the packer; True once the cap is reached."""
    texts, spans = [], []
    for doc in batch:
        text, sp = injector.inject(doc.text, doc.group, doc.protect) if injector else (doc.text, [])
        texts.append(text)
        spans.append(sp)
    # verbose=False: documents longer than the model's context are expected here, they get cut into blocks
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=injector is not None, verbose=False)
    for i, doc in enumerate(batch):
        ids = np.asarray([*enc["input_ids"][i], eos], np.int32)
        kinds = np.zeros(len(ids), np.uint8)
        if injector is not None:
            kinds[:-1] = token_kinds(np.asarray(enc["offset_mapping"][i], np.int64).reshape(-1, 2), spans[i])
            injector.observe(len(ids), int(np.count_nonzero(is_noise(kinds))), len(texts[i]), noise_chars(spans[i]))
        before = packer.accepted
        full = packer.add(doc, ids, kinds)
        bar.update(packer.accepted - before)
        if full:
            return True
    return False


def _noise_meta(injector: NoiseInjector | None, packer: _Packer, n_tokens: int) -> dict[str, Any] | None:
    if injector is None:
        return None
    return {"rate": injector.rate, "kinds": injector.weights,
            "kind_names": list(KIND_NAMES), "noise_kinds": list(KINDS),
            "realized_rate": float(packer.kind_tokens[NOISE_IDS].sum() / n_tokens),
            "realized_by_kind": {k: float(packer.kind_tokens[i] / n_tokens) for i, k in enumerate(KIND_NAMES)}}


# --------------------------------------------------------------------------- the stage


def prepare(cfg: Config, out: str | Path | OutDir, splits: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Write `out/data/<split>/` for each split (default: all the corpus has); returns a summary per split."""
    from .models import load_tokenizer, tokenizer_fingerprint

    data, out = cfg.data, OutDir.of(out)
    plans = CORPORA[data.corpus](data)
    names = list(splits) if splits else [s for s in (*SPLITS, *sorted(plans)) if s in plans]
    for split in names:
        if split not in plans:
            raise UserError(f"no split {split!r} in data.corpus={data.corpus}{did_you_mean(split, plans)} "
                            f"(available: {', '.join(plans)})")
    tokenizer = load_tokenizer(cfg.model)
    tok_fp = tokenizer_fingerprint(tokenizer)
    summary: dict[str, dict[str, Any]] = {}
    for split in dict.fromkeys(names):
        start = time.perf_counter()
        meta = _reusable_meta(out.store_dir(split), store_config_fingerprint(cfg, split), tok_fp)
        if meta is not None:  # same config and tokenizer: nothing to redo
            summary[split] = _summary(meta, 0.0, reused=True)
            continue
        noisy = split == "train" and data.noise_rate > 0
        injector = NoiseInjector(data.noise_rate, data.noise_kinds, data.seed) if noisy else None
        meta = write_store(out.store_dir(split), plans[split].documents, tokenizer, data.block_len,
                           cap=data.cap(split), injector=injector, label=f"split {split}",
                           meta={"split": split, "seed": data.seed, "tokenizer": cfg.model.tokenizer or cfg.model.name,
                                 "config_fingerprint": store_config_fingerprint(cfg, split), **plans[split].meta})
        summary[split] = _summary(meta, time.perf_counter() - start, reused=False)
    return summary


def _reusable_meta(path: Path, config_fp: str, tokenizer_fp: str) -> dict[str, Any] | None:
    """The meta of an intact store at `path` built from the same config and tokenizer, else None."""
    if not (path / "meta.json").is_file():
        return None
    try:
        meta = load_store(path).meta
    except UserError:
        return None
    ok = meta.get("config_fingerprint") == config_fp and meta.get("tokenizer_fingerprint") == tokenizer_fp
    return meta if ok else None


def _summary(meta: dict[str, Any], seconds: float, reused: bool) -> dict[str, Any]:
    out = {k: meta[k] for k in ("n_blocks", "n_tokens", "n_docs")}
    if meta["noise"]:
        out["noise_rate"] = round(meta["noise"]["realized_rate"], 4)
    return {**out, "seconds": round(seconds, 2), "reused": reused}
