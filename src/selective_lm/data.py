"""`slm prepare`: build the corpora, tokenize and pack them into token stores.

Packing: every document is tokenized without special tokens and followed by one EOS; the
documents are concatenated and cut into blocks of `data.block_len`. The final incomplete
block is dropped (`dropped_tail_tokens` in meta.json); no other token is lost or repeated.
`data.max_tokens` caps a split: the stream stops once the cap is reached (the last document
is cut there).

A store is written streaming — blocks are appended to .npy files whose header is rewritten
in place at the end — so memory stays bounded whatever the corpus size, and atomically
(`common.atomic_dir`), so a killed prepare never leaves a half store behind.

Corpora:
- `champ` (embedded, PyPI champ-dataset): problems are split into train/validation by
  problem id, stratified by category and seeded by `data.seed`. `val_clean` holds the human
  documents of the held-out problems (problem, concepts, hints, step-by-step solution,
  answer); `val_noisy` their model-written solutions; `train` the model-written solutions of
  the training problems with injected noise (noise.py); `reference` the human documents of
  the training problems plus, as `data.reference_mix` of its text, noise-free model-written
  solutions from conversations reserved for it and never used in `train`. A model-written
  document is one conversation: the problem statement, the model's solution and its
  one-sentence summary; the statement is prefixed so that the solution reads in context,
  and noise injection leaves it intact. Documents are shuffled (seeded) before capping, so a
  cap takes a random sample.
- `custom`: `data.sources` maps split -> a local .jsonl/.json/.txt/.parquet/.csv file or a
  hub dataset name, optionally `name@split` (datasets split syntax; `split[a:b]` streams,
  other slices load the split whole). Text comes from `data.text_field`; a .txt file holds
  one document per blank-line-separated paragraph. Documents keep the source order (the
  split syntax already chooses the sample); `train` gets noise when `data.noise_rate > 0`.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import random
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import __version__
from .common import UserError, atomic_dir, fingerprint, read_json, write_json
from .config import SPLITS, Config, DataConfig
from .noise import KINDS, NoiseInjector, token_kinds

STORE_FORMAT = 1
BATCH_DOCS = 64  # documents per tokenizer call: fast tokenizers batch in Rust, memory stays small
FLUSH_BLOCKS = 256  # blocks gathered before each write
CHAMP_FILE = "dataset_files/v0.json"
RESERVED_SHARE = 0.25  # of each training problem's conversations, kept out of train for the reference
_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}
_SLICE = re.compile(r"^(?P<base>[\w.-]+)\[(?P<a>\d*):(?P<b>\d*)\]$")


@dataclass(frozen=True)
class Document:
    """One document to pack. `group` (a CHAMP problem) keeps foreign steps from its own
    problem; `protect` leading characters are never corrupted; `origin` is counted in meta."""

    text: str
    source_id: str | None = None
    group: str | None = None
    protect: int = 0
    origin: str = "custom"


@dataclass(frozen=True)
class TokenStore:
    """A split's store, memory-mapped: tokens and doc_ids int32 [n_blocks, block_len],
    noise_mask bool of the same shape (None when no noise was injected)."""

    path: Path
    tokens: np.ndarray
    doc_ids: np.ndarray
    noise_mask: np.ndarray | None
    meta: dict[str, Any]

    @property
    def n_blocks(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def block_len(self) -> int:
        return int(self.tokens.shape[1])


class BlockOrder:
    """The data order shared by every run of a comparison: epoch permutations seeded by `seed`.

    Position p of the training stream is block `perm_e[p % n_blocks]` with e = p // n_blocks;
    it depends on the store size and the seed only, so runs that differ in their loss mask
    read the same blocks in the same order, and scoring can know which blocks a grid reads.
    """

    def __init__(self, n_blocks: int, seed: int) -> None:
        self.n_blocks, self.seed = n_blocks, seed
        self._cache: dict[int, np.ndarray] = {}

    def blocks(self, start: int, count: int) -> np.ndarray:
        """Block indices at stream positions [start, start + count)."""
        pos = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(pos // self.n_blocks):
            perm = self._cache.get(int(epoch))
            if perm is None:
                perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.n_blocks)
                self._cache = {int(epoch): perm}
            sel = pos // self.n_blocks == epoch
            out[sel] = perm[pos[sel] % self.n_blocks]
        return out


# --------------------------------------------------------------------------- reading


def _open_array(file: Path, dtype: type, shape: tuple[int, int]) -> np.ndarray:
    if not file.is_file():
        raise UserError(f"token store file {file} is missing; rerun `slm prepare`")
    try:
        arr = np.load(file, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{file} is truncated or corrupt ({e}); rerun `slm prepare`") from None
    if arr.dtype != np.dtype(dtype) or arr.shape != shape:
        raise UserError(f"{file} holds {arr.dtype} {arr.shape} but meta.json says {np.dtype(dtype)} {shape}; "
                        "the store is corrupt, rerun `slm prepare`")
    return arr


def load_store(path: str | Path) -> TokenStore:
    """Open a token store read-only; UserError (one line) if it is missing, truncated or corrupt."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"no token store at {path}; run `slm prepare` first")
    if not (path / "meta.json").is_file():
        raise UserError(f"token store {path} has no meta.json (incomplete or not a store); rerun `slm prepare`")
    meta = read_json(path / "meta.json")
    try:
        shape = (int(meta["n_blocks"]), int(meta["block_len"]))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path / 'meta.json'} lacks n_blocks/block_len; rerun `slm prepare`") from None
    tokens = _open_array(path / "tokens.npy", np.int32, shape)
    doc_ids = _open_array(path / "doc_ids.npy", np.int32, shape)
    noise = _open_array(path / "noise_mask.npy", np.bool_, shape) if meta.get("noise") else None
    return TokenStore(path, tokens, doc_ids, noise, meta)


# --------------------------------------------------------------------------- writing


class _BlockFile:
    """A .npy file [rows, block_len] that grows row by row.

    numpy pads .npy headers so that the first dimension can be rewritten in place: we write
    the header for 0 rows, append raw rows, and rewrite the header with the count at the end.
    """

    def __init__(self, path: Path, dtype: type, block_len: int) -> None:
        self.dtype, self.block_len, self.rows = np.dtype(dtype), block_len, 0
        self.f = open(path, "wb")  # closed by close(), also on failure
        self._header()
        self.header_len = self.f.tell()

    def _header(self) -> None:
        np.lib.format.write_array_header_1_0(self.f, {
            "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
            "shape": (self.rows, self.block_len)})

    def append(self, rows: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(rows, self.dtype).tobytes())
        self.rows += len(rows)

    def close(self, finished: bool) -> None:
        if finished:
            self.f.seek(0)
            self._header()
            assert self.f.tell() == self.header_len, "npy header changed size"
        self.f.close()


class _Packer:
    """Concatenate documents and write full blocks; only the unfinished blocks stay in memory."""

    def __init__(self, root: Path, block_len: int, cap: int | None, noise: bool) -> None:
        self.block_len, self.cap = block_len, cap
        self.files = {"tokens": _BlockFile(root / "tokens.npy", np.int32, block_len),
                      "doc_ids": _BlockFile(root / "doc_ids.npy", np.int32, block_len)}
        if noise:
            self.files["noise_mask"] = _BlockFile(root / "noise_mask.npy", np.bool_, block_len)
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.n_pending = self.accepted = self.n_docs = self.stored_docs = 0
        self.source_ids: list[str] = []
        self.origins: list[str] = []
        self.origin_codes = bytearray()  # per document: index into self.origins
        self.origin_tokens = np.zeros(256, np.int64)
        self.kind_tokens = np.zeros(len(KINDS) + 1, np.int64)
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
            rows = {"tokens": tokens[:n], "doc_ids": docs[:n], "noise_mask": kinds[:n] > 0}
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
            injector.observe(len(ids), int(np.count_nonzero(kinds)), len(texts[i]),
                             sum(e - s for s, e, _ in spans[i]))
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
            "realized_rate": float(packer.kind_tokens[1:].sum() / n_tokens),
            "realized_by_kind": {k: float(packer.kind_tokens[i + 1] / n_tokens) for i, k in enumerate(KINDS)}}


# --------------------------------------------------------------------------- CHAMP


def load_champ() -> dict[str, Any]:
    """The CHAMP JSON (problems, concepts, hints) from the champ-dataset package."""
    try:
        file = resources.files("champ_dataset") / CHAMP_FILE
        return json.loads(file.read_text())
    except ModuleNotFoundError:
        raise UserError("data.corpus=champ needs the champ-dataset package: pip install champ-dataset") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the CHAMP corpus ({e}); reinstall champ-dataset") from None


@dataclass(frozen=True)
class ChampPartition:
    """Which problems and conversations each CHAMP split may draw from (all lists sorted)."""

    train_problems: list[str]
    val_problems: list[str]
    train_conversations: list[tuple[str, str]]  # (problem id, conversation key)
    reference_conversations: list[tuple[str, str]]


def champ_partition(data: DataConfig, corpus: dict[str, Any] | None = None) -> ChampPartition:
    """Hold out `val_fraction` of the problems per category; reserve RESERVED_SHARE of each
    training problem's conversations for the reference. Seeded by `data.seed`."""
    problems = (corpus or load_champ())["problems"]
    rng = random.Random(f"{data.seed}:champ-split")
    by_category: dict[str, list[str]] = {}
    for pid, p in sorted(problems.items()):
        by_category.setdefault(p["category"], []).append(pid)
    val: list[str] = []
    for _, ids in sorted(by_category.items()):
        rng.shuffle(ids)
        val += ids[: max(1, min(len(ids) - 1, round(len(ids) * data.val_fraction)))]
    train = sorted(set(problems) - set(val))
    train_convs, reserved = [], []
    for pid in train:
        keys = sorted(problems[pid]["conversations"])
        rng.shuffle(keys)
        k = round(len(keys) * RESERVED_SHARE)
        reserved += [(pid, key) for key in keys[:k]]
        train_convs += [(pid, key) for key in keys[k:]]
    return ChampPartition(train, sorted(val), sorted(train_convs), sorted(reserved))


def _human_text(p: dict[str, Any], corpus: dict[str, Any]) -> str:
    """Problem, concepts, hints, numbered solution steps and answer, as a textbook would lay them out."""
    concepts = [corpus["concepts"][i] for i in p["ch_list"] if i in corpus["concepts"]]
    hints = [corpus["hints"][i]["_text"] for i in p["ch_list"] if i in corpus["hints"]]
    parts = [f"Problem: {p['_text']}"]
    if concepts:
        parts.append("Concepts:\n" + "\n".join(
            f"- {c['name'][0].upper()}{c['name'][1:]}: {c['_text']}" if c.get("name") else f"- {c['_text']}"
            for c in concepts))
    if hints:
        parts.append("Hints:\n" + "\n".join(f"- {h}" for h in hints))
    steps = "\n".join(f"{i}. {s['_text']}" for i, s in enumerate(p["solution"]["steps"], 1))
    parts += [f"Solution:\n{steps}", f"Answer: {p['_answer']}"]
    return "\n\n".join(parts)


def _model_text(p: dict[str, Any], conversation: dict[str, Any]) -> tuple[str, int] | None:
    """Problem + the model's solution + its one-line summary, and the length of the problem header.

    The solution is the model message answered by the final "Now, summarize ..." request;
    earlier turns (concept explanations, few-shot examples) are left out. None when the
    model produced no solution (CHAMP's LENGTH errors).
    """
    msgs = conversation["messages"]
    ask = next((i for i, m in enumerate(msgs)
                if m["role"] == "User" and (m["text"] or "").startswith("Now, summarize")), None)
    if not ask or not msgs[ask - 1]["role"].startswith("Model") or not (msgs[ask - 1]["text"] or "").strip():
        return None
    summary = msgs[ask + 1]["text"] if ask + 1 < len(msgs) else None
    head = f"Problem: {p['_text']}\n\nSolution:\n"
    text = head + msgs[ask - 1]["text"].strip() + (f"\n\nSummary: {summary.strip()}" if summary else "")
    return text, len(head)


def _champ_docs(corpus: dict[str, Any], items: list[tuple[str, str | None]]) -> Iterator[Document]:
    """Documents for (problem id, conversation key) pairs; key None = the human document."""
    for pid, key in items:
        p = corpus["problems"][pid]
        if key is None:
            yield Document(_human_text(p, corpus), pid, pid, 0, "human")
        elif made := _model_text(p, p["conversations"][key]):
            yield Document(made[0], f"{pid}|{key}", pid, made[1], "model")


def _mix(human: Iterator[Document], model: Iterator[Document], share: float) -> Iterator[Document]:
    """Interleave two streams so that model-written text makes `share` of the characters (≈ tokens);
    stops when the stream due next runs dry, so the share holds even when a cap is not reached."""
    h = m = 0
    while True:
        take_model = share >= 1 or (share > 0 and m < share * (h + m))
        doc = next(model if take_model else human, None)
        if doc is None:
            return
        h, m = (h, m + len(doc.text)) if take_model else (h + len(doc.text), m)
        yield doc


def _shuffled(items: list, seed: int, split: str) -> list:
    items = list(items)
    random.Random(f"{seed}:{split}:order").shuffle(items)
    return items


def _champ_plans(data: DataConfig) -> dict[str, tuple[Iterable[Document], dict[str, Any]]]:
    corpus = load_champ()
    part = champ_partition(data, corpus)
    problems = corpus["problems"]
    val_convs = [(pid, key) for pid in part.val_problems for key in sorted(problems[pid]["conversations"])]
    src = {"corpus": "champ", "package": f"champ-dataset {metadata.version('champ-dataset')}", "file": CHAMP_FILE}

    def docs(split: str, items: list[tuple[str, str | None]]) -> Iterator[Document]:
        return _champ_docs(corpus, _shuffled(items, data.seed, split))

    return {
        "reference": (
            _mix(docs("reference-human", [(p, None) for p in part.train_problems]),
                 docs("reference-model", part.reference_conversations), data.reference_mix),
            {"sources": {**src, "text": "human solutions + reserved model-written solutions",
                         "reference_mix": data.reference_mix}, "problems": part.train_problems}),
        "train": (docs("train", part.train_conversations),
                  {"sources": {**src, "text": "model-written solutions"}, "problems": part.train_problems}),
        "val_clean": (docs("val_clean", [(p, None) for p in part.val_problems]),
                      {"sources": {**src, "text": "human solutions"}, "problems": part.val_problems}),
        "val_noisy": (docs("val_noisy", val_convs),
                      {"sources": {**src, "text": "model-written solutions"}, "problems": part.val_problems}),
    }


# --------------------------------------------------------------------------- custom corpora


def _open_source(source: str) -> tuple[Any, bool]:
    """A datasets IterableDataset (or Dataset) for a source string; and whether it is a .txt file."""
    import datasets

    name, split = source, None
    if "@" in source and not Path(source).expanduser().exists():
        name, split = source.rsplit("@", 1)
    path = Path(name).expanduser()
    kwargs: dict[str, Any] = {}
    builder = name
    if path.suffix.lower() in _LOCAL_BUILDERS:
        if not path.is_file():
            raise UserError(f"corpus file {path} not found (data.sources: {source!r})")
        if path.stat().st_size == 0:
            raise UserError(f"corpus file {path} is empty (data.sources: {source!r})")
        builder = _LOCAL_BUILDERS[path.suffix.lower()]
        kwargs["data_files"] = str(path)
        if builder == "text":
            kwargs["sample_by"] = "paragraph"
    elif name.startswith((".", "/", "~")) and not path.exists():
        raise UserError(f"corpus path {path} not found (data.sources: {source!r}); "
                        f"use a {'/'.join(_LOCAL_BUILDERS)} file or a hub dataset name")
    split = split or "train"
    sliced = _SLICE.match(split)
    try:
        if sliced or "[" not in split:
            ds = datasets.load_dataset(builder, split=sliced["base"] if sliced else split, streaming=True, **kwargs)
            if sliced:
                start = int(sliced["a"] or 0)
                ds = ds.skip(start)
                if sliced["b"]:
                    ds = ds.take(max(0, int(sliced["b"]) - start))
        else:  # percent slices etc.: datasets resolves them on a loaded split only
            ds = datasets.load_dataset(builder, split=split, **kwargs)
    except Exception as e:  # hub/network/format errors all mean: this source cannot be read
        raise UserError(f"cannot load dataset {source!r}: {_first_line(e)}") from None
    return ds, builder == "text"


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _custom_docs(source: str, field: str) -> Iterator[Document]:
    """Documents from a custom source, streamed; the text field is checked on the first row."""
    ds, is_text = _open_source(source)
    field = "text" if is_text else field
    rows = iter(ds)
    for i in itertools.count():
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # parse errors of the user's file surface while streaming
            raise UserError(f"cannot read {source!r}: {_first_line(e)}") from None
        if i == 0 and field not in row:
            raise UserError(f"{source!r} has no text field {field!r} (data.text_field); "
                            f"its columns: {', '.join(map(str, row)) or 'none'}")
        text = row[field]
        if isinstance(text, str):
            yield Document(text.strip() if is_text else text, origin="custom")


def _custom_plans(data: DataConfig) -> dict[str, tuple[Iterable[Document], dict[str, Any]]]:
    if "train" not in data.sources:
        raise UserError("data.corpus=custom needs data.sources.train (a .jsonl/.json/.txt/.parquet/.csv "
                        "file or a hub dataset name)")
    for split in data.sources:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", split):
            raise UserError(f"data.sources split name {split!r} must be letters, digits, '_', '-' or '.'")
    return {split: (_custom_docs(src, data.text_field),
                    {"sources": {"corpus": "custom", "source": src, "text_field": data.text_field}})
            for split, src in data.sources.items()}


# --------------------------------------------------------------------------- the stage


def config_fingerprint(cfg: Config, split: str) -> str:
    """What produced a split: the data settings that matter to it and the tokenizer named."""
    data = cfg.data.model_dump(mode="json")
    data["max_tokens"] = cfg.data.cap(split)
    return fingerprint(STORE_FORMAT, split, data, cfg.model.tokenizer or cfg.model.name, cfg.model.revision)


def prepare(cfg: Config, out: str | Path, splits: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Write `out/data/<split>/` for each split (default: all the corpus has); returns a summary per split."""
    from .models import load_tokenizer, tokenizer_fingerprint

    data = cfg.data
    if data.corpus not in ("champ", "custom"):
        close = difflib.get_close_matches(data.corpus, ["champ", "custom"], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"unknown data.corpus {data.corpus!r}{hint}; use 'champ' or 'custom'")
    plans = _champ_plans(data) if data.corpus == "champ" else _custom_plans(data)
    names = list(splits) if splits else [s for s in (*SPLITS, *sorted(plans)) if s in plans]
    for split in names:
        if split not in plans:
            raise UserError(f"no split {split!r} in data.corpus={data.corpus}; available: {', '.join(plans)}")
    tokenizer = load_tokenizer(cfg.model)
    tok_fp = tokenizer_fingerprint(tokenizer)
    summary: dict[str, dict[str, Any]] = {}
    for split in dict.fromkeys(names):
        start = time.perf_counter()
        meta = _reusable_meta(Path(out) / "data" / split, config_fingerprint(cfg, split), tok_fp)
        if meta is not None:  # same config and tokenizer: nothing to redo
            summary[split] = _summary(meta, 0.0, reused=True)
            continue
        noisy = split == "train" and data.noise_rate > 0
        injector = NoiseInjector(data.noise_rate, data.noise_kinds, data.seed) if noisy else None
        docs, extra = plans[split]
        meta = write_store(Path(out) / "data" / split, docs, tokenizer, data.block_len, cap=data.cap(split),
                           injector=injector, label=f"split {split}",
                           meta={"split": split, "seed": data.seed, "tokenizer": cfg.model.tokenizer or cfg.model.name,
                                 "config_fingerprint": config_fingerprint(cfg, split), **extra})
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
