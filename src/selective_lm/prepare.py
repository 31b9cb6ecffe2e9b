"""`slm prepare`: take each split of the corpus (`corpora/`), tokenize and pack it into a token store.

Packing: every document is tokenized without special tokens and followed by one EOS; the
documents are concatenated and cut into blocks of `data.block_len`. The final incomplete
block is dropped (`dropped_tail_tokens` in meta.json); no other token is lost or repeated.
`data.max_tokens` caps a split: the stream stops once the cap is reached (the last document
is cut there). The `train` split gets injected noise when `data.noise_rate > 0` (noise.py):
then `noise_kind.npy` holds every token's kind id (names in meta.json `noise.kind_names`; the
EOS is clean) and `noise_mask.npy` is True on the noise kinds only (`noise.KINDS`). A split the
corpus marks `labelled` (CHAMP's train and val_noisy) records its documents' labels (the
wrong-step kinds, `noise.LABEL_KINDS`) in `noise_kind.npy` too, with or without injected noise;
meta.json `wrong_step` then holds the kind names, the labelled token count per kind and the
labelled documents' ids. Labels are not noise: not in `noise_mask.npy` nor in the realized rate.

Supervised fine-tuning data (`data.format` prompt_response or chat, custom corpora only): the
documents carry the character spans that are trained (the response, the assistant turns; a
chat conversation is rendered with the tokenizer's chat template, `chat.render_chat`), and
`loss_mask.npy` (bool, the blocks' shape) is True on the tokens whose first character lies in
such a span, and on each document's EOS (the model learns to stop); False on the prompt (a token
straddling the boundary counts where it starts). Training, selection and evaluation see only the
masked-in positions (`TokenStore.targets`): `train.ratio` applies to the response tokens. meta.json
holds `sft` (format, trained token count and share); text stores have no loss_mask.npy.

A store is written streaming (`blocks.BlockFile`: memory bounded whatever the corpus size) and
atomically (`files.atomic_dir`: a killed prepare never leaves a half store behind).

Parallelism (`data.num_proc`): documents go in batches of BATCH_DOCS to `num_proc` worker
processes, each holding the tokenizer once (num_proc=1 tokenizes in this process, no pool).
The main process reads the corpus, injects noise and packs; at most a few batches per worker
are in flight, so memory stays bounded, and results are packed in corpus order. The noise
controller (`NoiseInjector.observe`) learns how the injected text tokenized with a fixed lag
of NOISE_LAG batches whatever `num_proc` is, so a store is byte-identical for every num_proc
(and num_proc is no part of the config fingerprint: such a store is reused as it is).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import multiprocessing
import os
import signal
import sys
import time
from collections import ChainMap, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from . import __version__
from .config import SPLITS, Config, DataConfig
from .config.sections import DEFAULT_CAP
from .data.chat import in_spans, rendered
from .data.corpora import CORPORA, Document
from .data.noise import (
    KIND_IDS,
    KIND_NAMES,
    KINDS,
    LABEL_IDS,
    LABEL_KINDS,
    NOISE_IDS,
    NoiseInjector,
    Span,
    is_noise,
    noise_chars,
    token_kinds,
)
from .errors import UserError, did_you_mean
from .files import atomic_dir, fingerprint, write_json
from .store.blocks import BlockFile
from .store.layout import STORE_FORMAT, OutDir, load_store, store_config_fingerprint

BATCH_DOCS = 16  # documents per tokenizer call and per worker task: small enough for a fine noise feedback
NOISE_LAG = 4  # batch k is injected knowing how batches 0 .. k-NOISE_LAG-1 tokenized (the same for every num_proc)
TASKS_PER_PROC = 2  # batches in flight per worker: one being tokenized, one queued; memory stays bounded
FLUSH_BLOCKS = 256  # blocks gathered before each write


class _Encoded(NamedTuple):
    """One batch of documents tokenized: what a worker sends back (arrays pickle cheaply, lists do not)."""

    ids: np.ndarray  # int32, the documents' tokens concatenated, each document followed by EOS
    lens: np.ndarray  # int64, tokens per document, EOS included
    kinds: np.ndarray | None  # uint8 noise kind id per token (None without noise injection)
    trained: np.ndarray | None = None  # bool per token: trained (loss_mask.npy; None without a loss mask)


Trained = tuple[tuple[int, int], ...] | None  # a document's trained character spans (None: all of it)


def _encode(tokenizer: Any, eos: int, texts: list[str], spans: list[list[Span]] | None,
            trained: list[Trained] | None = None) -> _Encoded:
    """Tokenize a batch (without special tokens, EOS appended); with `spans` label every token's kind, with
    `trained` (one entry per document) mark the tokens whose first character lies in a trained span."""
    # verbose=False: documents longer than the model's context are expected here, they get cut into blocks
    enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                    return_offsets_mapping=spans is not None or trained is not None, verbose=False)
    raw = enc["input_ids"]
    lens = np.fromiter(map(len, raw), np.int64, len(raw))
    starts = np.cumsum(lens) - lens  # of each document's tokens, EOS not counted
    flat = np.fromiter(itertools.chain.from_iterable(raw), np.int32, int(lens.sum()))
    ids = np.insert(flat, starts + lens, eos)
    kinds = mask = None
    if spans is not None or trained is not None:  # fromiter over the flattened pairs: twice as fast as np.asarray
        chain = itertools.chain.from_iterable
        offsets = np.fromiter(chain(chain(enc["offset_mapping"])), np.int64, 2 * len(flat)).reshape(-1, 2)
    if spans is not None:
        kinds = np.zeros(len(ids), np.uint8)
        for i, (start, n, sp) in enumerate(zip(starts, lens, spans, strict=True)):
            if sp:
                kinds[start + i:start + i + n] = token_kinds(offsets[start:start + n], sp)
    if trained is not None:
        mask = np.ones(len(ids), np.bool_)  # the EOS after each document is trained
        for i, (start, n, doc_spans) in enumerate(zip(starts, lens, trained, strict=True)):
            if doc_spans is not None:
                mask[start + i:start + i + n] = in_spans(offsets[start:start + n, 0], doc_spans)
    return _Encoded(ids, lens + 1, kinds, mask)


_worker_state: dict[str, Any] = {}  # a worker process's tokenizer and EOS id, set once by _init_worker


def _init_worker(tokenizer: Any, eos: int) -> None:
    # Ctrl-C reaches the whole process group: the main process handles it and shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_state.update(tokenizer=tokenizer, eos=eos)


def _encode_in_worker(texts: list[str], spans: list[list[Span]] | None, trained: list[Trained] | None) -> _Encoded:
    return _encode(_worker_state["tokenizer"], _worker_state["eos"], texts, spans, trained)


class _Tokenizers:
    """Tokenize batches in this process (num_proc=1: no pool) or in `num_proc` worker processes.

    A context manager: leaving it shuts the pool down (queued batches cancelled), on errors too.
    Workers are forked where the platform can (they start at once and share the loaded tokenizer)
    and, unless TOKENIZERS_PARALLELISM says otherwise, run the tokenizer on one thread each: one
    process per core, and no "process just got forked" warning from the tokenizers library.
    Not `Pool.imap`: it feeds tasks as fast as it can read them (memory unbounded) and waits
    forever for a worker that was killed; `submit` here is called for a bounded window only.
    """

    def __init__(self, tokenizer: Any, eos: int, num_proc: int) -> None:
        self.tokenizer, self.eos, self.num_proc = tokenizer, eos, num_proc
        self.ahead = 1 if num_proc == 1 else TASKS_PER_PROC * num_proc  # batches submitted but not yet packed
        self._pool: ProcessPoolExecutor | None = None
        self._set_env = False

    def __enter__(self) -> _Tokenizers:
        if self.num_proc > 1:
            self._set_env = "TOKENIZERS_PARALLELISM" not in os.environ
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # inherited by the workers
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self._pool = ProcessPoolExecutor(self.num_proc, multiprocessing.get_context(method),
                                             initializer=_init_worker, initargs=(self.tokenizer, self.eos))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._set_env:
            del os.environ["TOKENIZERS_PARALLELISM"]

    def submit(self, texts: list[str], spans: list[list[Span]] | None,
               trained: list[Trained] | None = None) -> Future[_Encoded]:
        if self._pool is None:
            done: Future[_Encoded] = Future()
            done.set_result(_encode(self.tokenizer, self.eos, texts, spans, trained))
            return done
        return self._pool.submit(_encode_in_worker, texts, spans, trained)

    def result(self, future: Future[_Encoded]) -> _Encoded:
        """The batch's tokens; a worker that died (killed, out of memory) is a clean one-line error."""
        try:
            return future.result()
        except BrokenProcessPool:
            raise UserError(f"a tokenizer worker process died (killed or out of memory?) with data.num_proc="
                            f"{self.num_proc}; rerun with a lower data.num_proc") from None


def _encoded_batches(docs: Iterable[Document], tokenizers: _Tokenizers, injector: NoiseInjector | None,
                     loss_mask: bool = False, labelled: bool = False) -> Iterator[tuple[list[Document], _Encoded]]:
    """Every batch of non-empty documents with its tokens (and, with `loss_mask`, its trained tokens; with
    `injector` or `labelled`, every token's kind), in corpus order.

    Noise is injected here, in one process, batch after batch; the controller is fed each batch's
    token counts NOISE_LAG batches late, whether the batch came back at once (num_proc=1) or
    from a worker, so the noisy text is the same for every num_proc. At most `tokenizers.ahead`
    batches (and NOISE_LAG + 1 with noise) are in flight.
    """
    it = (d for d in docs if d.text.strip())
    submitted: deque[tuple[list[Document], Future[_Encoded], tuple[int, int]]] = deque()
    unseen: deque[tuple[int, int, int, int]] = deque()  # token/char counts the controller has not seen yet
    retrieved = 0
    for k in itertools.count():
        seen = max(0, k - NOISE_LAG) if injector is not None else 0  # batches fed back before injecting batch k
        while submitted and (len(submitted) >= tokenizers.ahead or retrieved < seen):
            batch, future, chars = submitted.popleft()
            enc = tokenizers.result(future)
            retrieved += 1
            if injector is not None:
                unseen.append((len(enc.ids), int(np.count_nonzero(is_noise(enc.kinds))), *chars))
            yield batch, enc
        batch = list(itertools.islice(it, BATCH_DOCS))
        if not batch:
            break
        if injector is None:
            trained = [d.trained for d in batch] if loss_mask else None
            labels = [list(d.labels or ()) for d in batch] if labelled else None
            submitted.append((batch, tokenizers.submit([d.text for d in batch], labels, trained), (0, 0)))
            continue
        while retrieved - len(unseen) < seen:
            injector.observe(*unseen.popleft())
        noisy = [injector.inject(d.text, d.group, d.protect, d.labels if labelled else None) for d in batch]
        texts, spans = [t for t, _ in noisy], [sp for _, sp in noisy]
        chars = (sum(map(len, texts)), sum(map(noise_chars, spans)))
        submitted.append((batch, tokenizers.submit(texts, spans), chars))
    while submitted:
        batch, future, _ = submitted.popleft()
        yield batch, tokenizers.result(future)


class _Packer:
    """Concatenate documents and write full blocks; only the unfinished blocks stay in memory."""

    def __init__(self, root: Path, block_len: int, cap: int | None, noise: bool, loss_mask: bool = False,
                 labelled: bool = False) -> None:
        self.block_len, self.cap, self.noise, self.loss_mask = block_len, cap, noise, loss_mask
        self.kinds = noise or labelled  # noise_kind.npy: injected noise, or the corpus's labels
        self.files = {"tokens": BlockFile(root / "tokens.npy", np.int32, block_len),
                      "doc_ids": BlockFile(root / "doc_ids.npy", np.int32, block_len)}
        if noise:
            self.files["noise_mask"] = BlockFile(root / "noise_mask.npy", np.bool_, block_len)
        if self.kinds:
            self.files["noise_kind"] = BlockFile(root / "noise_kind.npy", np.uint8, block_len)
        if loss_mask:
            self.files["loss_mask"] = BlockFile(root / "loss_mask.npy", np.bool_, block_len)
        # per token, not yet written: tokens, doc_ids, origin (index into origins), noise_kind, loss_mask
        self.parts: dict[str, list[np.ndarray]] = {"tokens": [], "doc_ids": [], "origin": [], "noise_kind": [],
                                                   "loss_mask": []}
        self.n_pending = self.accepted = self.n_docs = self.stored_docs = self.trained_tokens = 0
        self.source_ids: list[str] = []
        self.origins: dict[str, int] = {}  # origin -> its code (uint8)
        self.origin_tokens = np.zeros(256, np.int64)
        self.kind_tokens = np.zeros(len(KIND_NAMES), np.int64)
        self.labelled_docs: set[int] = set()  # ids of the documents with labelled tokens
        self.hash = hashlib.sha256()

    def add(self, docs: list[Document], enc: _Encoded) -> bool:
        """Append a batch of documents (EOS included); True once the cap is reached (the batch is cut there)."""
        ids, lens, kinds, trained = enc
        if self.cap is not None and self.accepted + len(ids) >= self.cap:
            keep = self.cap - self.accepted
            ends = np.cumsum(lens)
            n = int(np.searchsorted(ends, keep)) + 1  # the documents that the first `keep` tokens touch
            docs, ids, lens = docs[:n], ids[:keep], np.append(lens[:n - 1], keep - ends[n - 1] + lens[n - 1])
            kinds = None if kinds is None else kinds[:keep]
            trained = None if trained is None else trained[:keep]
        codes = np.array([self.origins.setdefault(d.origin, len(self.origins)) for d in docs], np.uint8)
        self.source_ids += [d.source_id for d in docs if d.source_id is not None]
        self.parts["tokens"].append(ids)
        self.parts["doc_ids"].append(np.repeat(np.arange(self.n_docs, self.n_docs + len(docs), dtype=np.int32), lens))
        self.parts["origin"].append(np.repeat(codes, lens))
        if kinds is not None:
            self.parts["noise_kind"].append(kinds)
        if trained is not None:
            self.parts["loss_mask"].append(trained)
        self.n_docs += len(docs)
        self.n_pending += len(ids)
        self.accepted += len(ids)
        if self.n_pending >= FLUSH_BLOCKS * self.block_len:
            self._flush()
        return self.cap is not None and self.accepted >= self.cap

    def _flush(self) -> None:
        pending = {k: np.concatenate(v) for k, v in self.parts.items() if v}
        n = self.n_pending // self.block_len * self.block_len
        if n:
            rows = {k: pending[k][:n] for k in ("tokens", "doc_ids")}
            if self.kinds:
                kinds = pending["noise_kind"][:n]
                rows["noise_kind"] = kinds
                if self.noise:
                    rows["noise_mask"] = is_noise(kinds)
                self.kind_tokens += np.bincount(kinds, minlength=len(self.kind_tokens))
                self.labelled_docs.update(np.unique(rows["doc_ids"][np.isin(kinds, LABEL_IDS)]).tolist())
            if self.loss_mask:
                rows["loss_mask"] = pending["loss_mask"][:n]
                self.trained_tokens += int(np.count_nonzero(rows["loss_mask"]))
            for name, f in self.files.items():
                f.append(rows[name].reshape(-1, self.block_len))
                self.hash.update(rows[name].tobytes())
            self.origin_tokens += np.bincount(pending["origin"][:n], minlength=256)
            self.stored_docs = int(rows["doc_ids"][-1]) + 1
        self.parts = {k: [pending[k][n:]] if k in pending else [] for k in self.parts}
        self.n_pending -= n

    def finish(self) -> None:
        if self.n_pending:
            self._flush()
        self.close(finished=True)

    def close(self, finished: bool = False) -> None:
        for f in self.files.values():
            if not f.f.closed:
                f.close(finished)


def write_store(path: str | Path, docs: Iterable[Document], tokenizer: Any, block_len: int, *,
                cap: int | None = None, injector: NoiseInjector | None = None,
                meta: Mapping[str, Any] | None = None, label: str = "store", num_proc: int = 1,
                tokenizer_fp: str | None = None, data_format: str = "text", atomic: bool = True,
                labelled: bool = False) -> dict[str, Any]:
    """Tokenize, inject noise (if `injector`), pack and write one store atomically; returns its meta.json.

    `docs` may be a generator of any length: it is consumed in batches of BATCH_DOCS, tokenized
    by `num_proc` processes (module docstring). `tokenizer_fp` saves recomputing the tokenizer's
    fingerprint when the caller has it. `data_format` other than "text" (`data.format`) renders
    chat documents and writes loss_mask.npy from the documents' trained spans. `meta` is read once
    the documents are (a corpus may count what it skipped there). A `cap` that stops the stream says
    so (meta.json's `cap_kept_docs`, a line on stderr): the documents after it are not read, so that a
    cap on a corpus larger than memory costs what it keeps. `atomic=False` writes into `path` itself (an empty
    directory): the caller's `atomic_dir` makes several stores appear together. `labelled` records the
    documents' labels (`Document.labels`) in noise_kind.npy and meta.json `wrong_step`.
    """
    from .training.models import tokenizer_fingerprint

    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError(f"tokenizer {tokenizer.name_or_path} has no EOS token: packing needs a document separator")
    if (injector is not None or labelled) and not tokenizer.is_fast:
        raise UserError("noise injection maps characters to tokens and needs a fast tokenizer; "
                        "set data.noise_rate=0 or use a tokenizer with a tokenizer.json")
    loss_mask = data_format != "text"
    if loss_mask and not tokenizer.is_fast:
        raise UserError(f"data.format={data_format} maps the prompt/response characters to tokens and needs a fast "
                        "tokenizer (one with a tokenizer.json)")
    if loss_mask and injector is not None:
        raise ValueError("noise injection would move the trained spans of a loss-masked store")
    if loss_mask:
        docs = (rendered(tokenizer, d) for d in docs)
    path = Path(path)
    with (atomic_dir(path) if atomic else contextlib.nullcontext(path) as tmp,
          _Tokenizers(tokenizer, eos, num_proc) as tokenizers,
          tqdm(total=cap, unit="tok", desc=f"prepare {label}", disable=None) as bar):
        packer = _Packer(tmp, block_len, cap, noise=injector is not None, loss_mask=loss_mask, labelled=labelled)
        full = False
        try:
            for batch, enc in _encoded_batches(docs, tokenizers, injector, loss_mask, labelled):
                before = packer.accepted
                full = packer.add(batch, enc)
                bar.update(packer.accepted - before)
                if full:
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
            "tokenizer": tokenizer.name_or_path,
            "tokenizer_fingerprint": tokenizer_fp or tokenizer_fingerprint(tokenizer),
            "eos_id": int(eos), "block_len": block_len, "n_blocks": n_blocks, "n_tokens": n_tokens,
            "n_docs": packer.stored_docs, "dropped_tail_tokens": packer.accepted - n_tokens,
            "max_tokens": cap, "capped": cap is not None and packer.accepted >= cap,
            **({"cap_kept_docs": packer.n_docs} if full else {}),
            "tokens_by_origin": {o: int(packer.origin_tokens[i]) for o, i in packer.origins.items()},
            "noise": _noise_meta(injector, packer, n_tokens),
            **({"wrong_step": _label_meta(packer)} if labelled else {}),
            **({"sft": {"format": data_format, "loss_mask_tokens": packer.trained_tokens,
                        "loss_mask_share": packer.trained_tokens / n_tokens}} if loss_mask else {}),
            "fingerprint": packer.hash.hexdigest()[:16],
            "created_by": __version__,
            **(meta or {}),
        }
        if packer.source_ids:
            info["documents"] = packer.source_ids[: packer.stored_docs]
        write_json(tmp / "meta.json", info)
    if full:  # never silent: the documents after the cap were not even read
        print(f"slm prepare: {label} stopped at its cap of {cap} tokens (data.max_tokens): it keeps the first "
              f"{packer.n_docs} documents, the last one cut; every document after them is left out (a larger "
              "data.max_tokens, or null, keeps them)", file=sys.stderr)
    return info



def _label_meta(packer: _Packer) -> dict[str, Any]:
    """The labelled tokens per label kind and the labelled documents (ids in doc_ids.npy), as stored."""
    return {"kind_names": list(KIND_NAMES), "label_kinds": list(LABEL_KINDS),
            "tokens": {k: int(packer.kind_tokens[KIND_IDS[k]]) for k in LABEL_KINDS},
            "doc_ids": sorted(packer.labelled_docs)}


def _noise_meta(injector: NoiseInjector | None, packer: _Packer, n_tokens: int) -> dict[str, Any] | None:
    if injector is None:
        return None
    # realized_rate counts the noise kinds only: the labels (LABEL_KINDS) are the corpus's own text, not noise.
    return {"rate": injector.rate, "kinds": injector.weights,
            "kind_names": list(KIND_NAMES), "noise_kinds": list(KINDS),
            "realized_rate": float(packer.kind_tokens[NOISE_IDS].sum() / n_tokens),
            "realized_by_kind": {k: float(packer.kind_tokens[i] / n_tokens) for i, k in enumerate(KIND_NAMES)}}


# --------------------------------------------------------------------------- the stage


def prepare(cfg: Config, out: str | Path | OutDir, splits: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Write `out/data/<split>/` for each split (default: all the corpus has); returns a summary per split."""
    from .training.models import load_tokenizer, tokenizer_fingerprint

    data, out = cfg.data, OutDir.of(out)
    plans = CORPORA[data.corpus](data)
    names = list(splits) if splits else [s for s in (*SPLITS, *sorted(plans)) if s in plans]
    for split in names:
        if split not in plans:
            raise UserError(f"no split {split!r} in data.corpus={data.corpus}{did_you_mean(split, plans)} "
                            f"(available: {', '.join(plans)})")
    warn_caps_without_split(data, list(plans))
    tokenizer = load_tokenizer(cfg.model)
    if data.format == "chat" and not tokenizer.chat_template:
        raise UserError(f"data.format=chat renders conversations with the tokenizer's chat template, but the "
                        f"tokenizer of {cfg.model.tokenizer or cfg.model.name} has none: set model.tokenizer to one "
                        "that has, or use data.format=prompt_response")
    tok_fp = tokenizer_fingerprint(tokenizer)
    # The vocabulary fingerprint does not see the chat template, which decides a chat store's text.
    template = {"chat_template": fingerprint(tokenizer.chat_template)} if data.format == "chat" else {}
    summary: dict[str, dict[str, Any]] = {}
    # Every store is built under a temporary name and all of them appear together, once the last is complete:
    # a split that fails (a bad row of the validation file) leaves no other split behind.
    with contextlib.ExitStack() as staged:
        for split in dict.fromkeys(names):
            start = time.perf_counter()
            meta = _reusable_meta(out.store_dir(split), store_config_fingerprint(cfg, split), tok_fp, template)
            if meta is not None:  # same config and tokenizer: nothing to redo
                summary[split] = _summary(meta, 0.0, reused=True)
                continue
            noisy = split == "train" and data.noise_rate > 0
            injector = NoiseInjector(data.noise_rate, data.noise_kinds, data.seed) if noisy else None
            own = {"split": split, "seed": data.seed, "tokenizer": cfg.model.tokenizer or cfg.model.name,
                   "config_fingerprint": store_config_fingerprint(cfg, split), **template}
            meta = write_store(staged.enter_context(atomic_dir(out.store_dir(split))), plans[split].documents,
                               tokenizer, data.block_len, cap=data.cap(split), injector=injector,
                               label=f"split {split}", num_proc=data.num_proc, tokenizer_fp=tok_fp,
                               data_format=data.format, meta=ChainMap(own, plans[split].meta), atomic=False,
                               labelled=plans[split].labelled)
            summary[split] = _summary(meta, time.perf_counter() - start, reused=False)
    return summary


def warn_caps_without_split(data: DataConfig, splits: Sequence[str]) -> None:
    """One line on stderr when data.max_tokens names splits the corpus lacks and leaves some of its splits uncapped (a
    preset's CHAMP val_clean cap missing a custom corpus's val); a warning, not an error: presets name their corpus's
    splits, and work on other corpora. With every split capped (a `default` entry) a cap on a missing split is quiet:
    the smoke preset caps `reference`, which a custom corpus may not have."""
    lacking = [s for s in data.max_tokens if s != DEFAULT_CAP and s not in splits] \
        if isinstance(data.max_tokens, dict) else []
    uncapped = [s for s in splits if data.cap(s) is None]
    if not lacking or not uncapped:
        return
    left = f"; {', '.join(uncapped)} {'is' if len(uncapped) == 1 else 'are'} not capped"
    print(f"slm prepare: warning: data.max_tokens caps {', '.join(lacking)}, which data.corpus={data.corpus} does "
          f"not have (its splits: {', '.join(splits)}){left}; name the corpus's splits, or cap every split not "
          f"named with the key '{DEFAULT_CAP}'", file=sys.stderr)


def _reusable_meta(path: Path, config_fp: str, tokenizer_fp: str, template: dict[str, str]) -> dict[str, Any] | None:
    """The meta of an intact store at `path` built from the same config, tokenizer and chat `template`, else None."""
    if not (path / "meta.json").is_file():
        return None
    try:
        meta = load_store(path).meta
    except UserError:
        return None
    ok = meta.get("config_fingerprint") == config_fp and meta.get("tokenizer_fingerprint") == tokenizer_fp
    ok = ok and meta.get("chat_template") == template.get("chat_template")
    return meta if ok else None


def _summary(meta: dict[str, Any], seconds: float, reused: bool) -> dict[str, Any]:
    out = {k: meta[k] for k in ("n_blocks", "n_tokens", "n_docs", "cap_kept_docs", "skipped_rows") if k in meta}
    if meta["noise"]:
        out["noise_rate"] = round(meta["noise"]["realized_rate"], 4)
    if meta.get("sft"):
        out["trained_share"] = round(meta["sft"]["loss_mask_share"], 4)
    if meta.get("wrong_step"):
        out["wrong_step_tokens"] = meta["wrong_step"]["tokens"]
    return {**out, "seconds": round(seconds, 2), "reused": reused}
