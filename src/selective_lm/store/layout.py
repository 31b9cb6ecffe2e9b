"""The one owner of the on-disk layout under `--out`: token stores, score stores, runs.

```
<out>/data/<split>/      token store: tokens.npy, doc_ids.npy, [noise_mask.npy, noise_kind.npy], [loss_mask.npy],
                         meta.json
<out>/scores/<split>/    score store: ref_loss.npy in scoring.dtype (+ meta.json: its fingerprints and dtype)
<out>/reference/         the reference model (a RunDir) + reference.json
<out>/base/              evaluation outputs of the untrained base model (a RunDir without weights)
<out>/runs/<name>/       one training run (a RunDir)
<out>/analysis.json, results.json, report.md, plots/, selection.html, selected.jsonl, bench.json
<out>/bench/             scratch space of `slm bench` side cases (generated corpora, throwaway stores)
```

Every stage asks `OutDir` / `RunDir` for a path; no other module joins paths under `--out`.
The token store is memory-mapped (`np.load(mmap_mode="r")`), so corpora larger than RAM work.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..errors import UserError
from ..files import fingerprint, read_json, run_lock
from .blocks import SCORE_STORAGE, HalfScores

STORE_FORMAT = 3  # 2: noise_kind.npy, noise_mask on inserted/altered text only (noise.py); 3: noise rate
# control lagged by data.NOISE_LAG batches, so that every data.num_proc writes the same bytes
BASELINE_DIRS = ("reference", "base")  # evaluated models that are not runs under runs/


# --------------------------------------------------------------------------- token store


@dataclass(frozen=True)
class TokenStore:
    """A split's store, memory-mapped: tokens and doc_ids int32 [n_blocks, block_len],
    noise_mask bool of the same shape (True on the noise kinds; None when no noise was injected),
    noise_kind uint8 of the same shape (every token's kind id, names in `kind_names`; None when
    no noise was injected and no label recorded), loss_mask bool of the same shape (False on
    prompt tokens, which are never trained; None for plain text: all trained)."""

    path: Path
    tokens: np.ndarray
    doc_ids: np.ndarray
    noise_mask: np.ndarray | None
    meta: dict[str, Any]
    noise_kind: np.ndarray | None = None
    rows: np.ndarray | None = None  # a subset's block indices in the full store (None: the whole store)
    loss_mask: np.ndarray | None = None

    @property
    def n_blocks(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def block_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def kind_names(self) -> list[str]:
        """Names of the ids in noise_kind.npy (meta.json `noise` or `wrong_step`); [] without one."""
        return list((self.meta.get("noise") or self.meta.get("wrong_step") or {}).get("kind_names") or [])

    @property
    def wrong_step_docs(self) -> list[int]:
        """Ids of the documents with wrong-step labels (CHAMP's annotated solutions); [] without labels."""
        return list((self.meta.get("wrong_step") or {}).get("doc_ids") or [])

    @property
    def fingerprint(self) -> str:
        """Identifies the store's content and settings: score stores and token losses record it."""
        return fingerprint(self.meta)

    def targets(self, rows: np.ndarray | slice, doc_boundaries: bool, loss_mask: bool = True) -> np.ndarray:
        """bool `[len(rows), T]`: the positions of blocks `rows` that have a target to train or evaluate.

        t > 0 (position 0 has no context in its block); with `doc_boundaries`, t and t - 1 in the
        same document; with `loss_mask`, not a prompt token (the store's loss_mask). The one
        definition that training, selection, evaluation and export share. Scoring passes
        `loss_mask=False`: one score store then serves every mask.
        """
        n = len(range(self.n_blocks)[rows]) if isinstance(rows, slice) else len(rows)
        valid = np.ones((n, self.block_len), dtype=np.bool_)
        valid[:, 0] = False
        if doc_boundaries:
            doc = np.asarray(self.doc_ids[rows])
            valid[:, 1:] &= doc[:, 1:] == doc[:, :-1]
        if loss_mask and self.loss_mask is not None:
            valid &= np.asarray(self.loss_mask[rows])
        return valid

    def spread_blocks(self, max_tokens: int | None) -> np.ndarray:
        """Sorted indices of the blocks holding about `max_tokens` tokens, spread over the documents.

        The first blocks of a split would hold its first documents only (a third of them under a
        typical evaluation cap). Instead: the block at the middle of each document (evenly spaced
        over the documents when the cap allows fewer blocks than there are documents), then evenly
        spaced blocks among the rest. None = every block.
        """
        n = self.n_blocks if max_tokens is None else min(self.n_blocks, -(-max_tokens // self.block_len))
        if n >= self.n_blocks:
            return np.arange(self.n_blocks)
        flat = np.asarray(self.doc_ids).reshape(-1)
        _, first = np.unique(flat, return_index=True)
        _, last_rev = np.unique(flat[::-1], return_index=True)
        middles = np.unique(((first + flat.size - 1 - last_rev) // 2) // self.block_len)
        if len(middles) >= n:
            return np.sort(middles[np.linspace(0, len(middles) - 1, n).round().astype(int)])
        rest = np.setdiff1d(np.arange(self.n_blocks), middles)
        fill = rest[np.linspace(0, len(rest) - 1, n - len(middles)).round().astype(int)]
        return np.sort(np.concatenate([middles, fill]))

    def spread(self, max_tokens: int | None) -> TokenStore:
        """The subset of `spread_blocks(max_tokens)`: what evaluation and the learning curves read."""
        return self.subset(self.spread_blocks(max_tokens))

    def subset(self, rows: np.ndarray) -> TokenStore:
        """The store restricted to `rows` (in memory: meant for evaluation subsets)."""
        arrays = {f.name: np.asarray(getattr(self, f.name)[rows]) for f in fields(self)
                  if f.name != "rows" and isinstance(getattr(self, f.name), np.ndarray)}
        return replace(self, **arrays, rows=np.asarray(rows))


def store_config_fingerprint(cfg: Config, split: str) -> str:
    """What produced a split: the data settings that matter to it and the tokenizer named."""
    data = cfg.data.hashed(mode="json")
    data["max_tokens"] = cfg.data.cap(split)
    return fingerprint(STORE_FORMAT, split, data, cfg.model.tokenizer or cfg.model.name, cfg.model.revision)


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
    noisy = bool(meta.get("noise"))
    noise = _open_array(path / "noise_mask.npy", np.bool_, shape) if noisy else None
    kind = _open_array(path / "noise_kind.npy", np.uint8, shape) if noisy or meta.get("wrong_step") else None
    loss_mask = _open_array(path / "loss_mask.npy", np.bool_, shape) if meta.get("sft") else None
    return TokenStore(path, tokens, doc_ids, noise, meta, noise_kind=kind, loss_mask=loss_mask)


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunDir:
    """One trained (or evaluated) model's directory: `runs/<name>/`, `reference/` or `base/`."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def summary_path(self) -> Path:
        """train.json: written last, so its presence means the run finished."""
        return self.path / "train.json"

    @property
    def finished(self) -> bool:
        return self.summary_path.is_file()

    @property
    def summary(self) -> dict[str, Any]:
        if not self.finished:
            raise UserError(f"run {self.name!r} has not finished training in {self.path.parent}: "
                            "run `slm train` first")
        return read_json(self.summary_path)

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def merged_dir(self) -> Path:
        return self.path / "merged"

    @property
    def weights_dir(self) -> Path:
        """The trained weights: the peft adapter (LoRA) if there is one, else the full HF model."""
        return self.adapter_dir if self.adapter_dir.is_dir() else self.model_dir

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def log_path(self) -> Path:
        return self.path / "log.jsonl"

    def log(self) -> list[dict[str, Any]]:
        """One record per optimizer step (log.jsonl)."""
        return _read_jsonl(self.log_path)

    @property
    def curve_path(self) -> Path:
        return self.path / "curve.jsonl"

    def curve(self) -> list[dict[str, Any]]:
        """The learning curve: validation loss on a fixed small subset every `eval.every` steps (curve.jsonl)."""
        return _read_jsonl(self.curve_path)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}"

    def snapshot(self, step: int) -> Path:
        """Trainable weights at `step`, for the paper's trajectory analysis."""
        return self.checkpoints / "trajectory" / f"step-{step:06d}.safetensors"

    def snapshots(self) -> list[tuple[int, Path]]:
        return [(_step_of(p), p) for p in sorted((self.checkpoints / "trajectory").glob("step-*.safetensors"))]

    def token_losses(self, split: str) -> Path:
        return self.path / "token_losses" / f"{split}.npy"

    def trajectory_losses(self, step: int) -> Path:
        return self.path / "token_losses" / "trajectory" / f"step-{step:06d}.npy"

    def trajectory_loss_files(self) -> list[tuple[int, Path]]:
        return [(_step_of(p), p) for p in sorted((self.path / "token_losses" / "trajectory").glob("step-*.npy"))]

    @property
    def eval_path(self) -> Path:
        return self.path / "eval.json"

    @property
    def tasks_path(self) -> Path:
        """tasks.json: lm-evaluation-harness results of the model, each task with the fingerprint it was run for."""
        return self.path / "tasks.json"

    @property
    def selection_sample(self) -> Path:
        return self.path / "selection_sample.npz"

    @property
    def doc_selection(self) -> Path:
        """Per training document, over the whole run: trained weight and target tokens (the report's document table)."""
        return self.path / "doc_selection.npz"

    @property
    def sample_losses(self) -> Path:
        """The base model's losses on the first selection unit of each seed (`base/` only): the step-0 scores of
        the blocks selection.html shows; their rows are in the `.json` beside it."""
        return self.path / "token_losses" / "selection_sample.npy"

    @property
    def reference_json(self) -> Path:
        """The reference's description (only in `reference/`)."""
        return self.path / "reference.json"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a .jsonl file (none if it is missing); a last line cut short by a kill is dropped."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def _step_of(path: Path) -> int:
    return int(path.name.split(".")[0].split("-")[1])


# --------------------------------------------------------------------------- the out dir


@dataclass(frozen=True)
class OutDir:
    """Paths and readers of one experiment directory (`--out`)."""

    root: Path

    @classmethod
    def of(cls, out: str | Path | OutDir) -> OutDir:
        return out if isinstance(out, OutDir) else cls(Path(out))

    def __str__(self) -> str:
        return str(self.root)

    @property
    def config_path(self) -> Path:
        """config.yaml: the resolved config of the first command that stored anything here (`outconfig`)."""
        return self.root / "config.yaml"

    def stale_dir(self, path: Path) -> Path:
        """Where a run dir of another config is moved aside to: `stale/<its path under the out dir>-<n>`, the
        first n not taken (never under runs/, so no stage reads it)."""
        rel = path.relative_to(self.root)
        n = 1
        while (self.root / "stale" / rel.parent / f"{rel.name}-{n}").exists():
            n += 1
        return self.root / "stale" / rel.parent / f"{rel.name}-{n}"

    # ---- token and score stores

    def store_dir(self, split: str) -> Path:
        return self.root / "data" / split

    def store(self, split: str) -> TokenStore:
        return load_store(self.store_dir(split))

    def checked_store(self, split: str, cfg: Config) -> TokenStore:
        """The store of `split`, refused (UserError) when it holds another tokenizer's tokens or blocks of another
        length than `cfg` names: evaluating it with `cfg`'s model would publish a meaningless number."""
        store = self.store(split)
        tokenizer = cfg.model.tokenizer or cfg.model.name
        if (store.meta.get("tokenizer"), store.meta.get("block_len")) != (tokenizer, cfg.data.block_len):
            raise UserError(f"the token store in {store.path} holds blocks of {store.meta.get('block_len')} tokens of "
                            f"tokenizer {store.meta.get('tokenizer')!r}, this config {cfg.data.block_len} of "
                            f"{tokenizer!r}: pass the settings it was made with (--preset/--config); another "
                            "config needs another --out")
        return store

    def scores_dir(self, split: str) -> Path:
        return self.root / "scores" / split

    def reference_digest(self) -> str | None:
        """The digest of the current reference's weights (None before `slm reference`)."""
        path = self.reference.reference_json
        return read_json(path)["digest"] if path.is_file() else None

    def has_scores(self, split: str) -> bool:
        return (self.scores_dir(split) / "meta.json").is_file()

    def score_dtype(self, split: str) -> str:
        """The dtype the score store of `split` holds (stores made before scoring.dtype existed: float32)."""
        return read_json(self.scores_dir(split) / "meta.json").get("dtype", "float32")

    def check_score_dtype(self, split: str, dtype: str) -> None:
        """UserError when the score store of `split` exists in another dtype than `dtype` (scoring.dtype)."""
        if self.has_scores(split) and (stored := self.score_dtype(split)) != dtype:
            raise UserError(f"the scores in {self.scores_dir(split)} are stored as {stored} but scoring.dtype is "
                            f"{dtype}: rerun `slm score` with scoring.dtype={dtype}, or set scoring.dtype={stored}")

    def scores(self, split: str, store: TokenStore, tokenizer_fingerprint: str,
               dtype: str | None = None) -> np.ndarray | HalfScores:
        """The score store of `split` as float32 values, after checking every fingerprint (and the stored
        dtype against `dtype`, the config's scoring.dtype, when given): the read-only memmap itself when
        stored as float32, else a `HalfScores` that converts the rows it is indexed with."""
        score_dir = self.scores_dir(split)
        if not (score_dir / "ref_loss.npy").is_file() or not (score_dir / "meta.json").is_file():
            raise UserError(f"this run reads reference losses but {score_dir} has none: run `slm score --out "
                            f"{self.root}` (or use train.score=loss, or a self-reference: reference.mode=ema)")
        meta = read_json(score_dir / "meta.json")
        if meta.get("token_store") != store.fingerprint:
            raise UserError(f"the scores in {score_dir} belong to another token store: rerun `slm score`")
        if meta.get("tokenizer_fingerprint") != tokenizer_fingerprint:
            raise UserError(f"the scores in {score_dir} were made with another tokenizer: rerun `slm score`")
        current = self.reference_digest()
        if current is not None and meta.get("reference") != current:
            raise UserError(f"the scores in {score_dir} come from another reference model: rerun `slm score`")
        if dtype is not None:
            self.check_score_dtype(split, dtype)
        scores = self.score_values(split)
        if scores.shape != store.tokens.shape:
            raise UserError(f"{score_dir}/ref_loss.npy has shape {scores.shape}, the tokens {store.tokens.shape}: "
                            "rerun `slm score`")
        return scores

    def score_values(self, split: str) -> np.ndarray | HalfScores:
        """The score store of `split` as float32 values (see `scores`), without the fingerprint checks."""
        path, dtype = self.scores_dir(split) / "ref_loss.npy", self.score_dtype(split)
        try:
            raw = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is unreadable ({e}): rerun `slm score`") from None
        if raw.dtype != SCORE_STORAGE.get(dtype) or raw.ndim != 2:
            raise UserError(f"{path} holds {raw.dtype} {raw.shape}, not the {dtype} blocks its meta.json says: "
                            "rerun `slm score`")
        return raw if dtype == "float32" else HalfScores(raw, dtype)

    def scored_blocks(self, split: str, max_tokens: int) -> np.ndarray:
        """Up to `max_tokens` tokens' worth of the blocks the score store of `split` covers, evenly spaced:
        where the step-0 separation of excess loss by token kind is measured."""
        ref = self.score_values(split)
        rows = np.flatnonzero(np.isfinite(ref[:, 1:]).any(axis=1))
        n = min(len(rows), -(-max_tokens // ref.shape[1]))
        return rows[np.linspace(0, len(rows) - 1, n).round().astype(int)] if n else rows

    # ---- runs

    @property
    def reference(self) -> RunDir:
        return RunDir(self.root / "reference")

    def run(self, name: str) -> RunDir:
        """`runs/<name>/`, or `reference/` / `base/` for the two evaluated models that are not runs."""
        return RunDir(self.root / name) if name in BASELINE_DIRS else RunDir(self.root / "runs" / name)

    def run_dirs(self) -> list[RunDir]:
        """Every directory under runs/ (finished or not), sorted by name."""
        return sorted((RunDir(p) for p in (self.root / "runs").glob("*") if p.is_dir()), key=lambda r: r.name)

    # ---- outputs

    @property
    def analysis(self) -> Path:
        return self.root / "analysis.json"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    def plot(self, name: str) -> Path:
        return self.root / "plots" / f"{name}.png"

    @property
    def selection_html(self) -> Path:
        return self.root / "selection.html"

    @property
    def selected_jsonl(self) -> Path:
        return self.root / "selected.jsonl"

    @property
    def selected_hf(self) -> Path:
        """`slm export-selected` with export.format=hf: a `datasets.load_from_disk` directory."""
        return self.root / "selected_hf"

    @property
    def bench(self) -> Path:
        return self.root / "bench.json"

    @property
    def bench_dir(self) -> Path:
        """Scratch space of `slm bench` side cases (generated corpora, throwaway stores): `bench/`."""
        return self.root / "bench"

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """One writer per out dir (see `files.run_lock`)."""
        return run_lock(self.root / ".slm.lock")

    def iter_runs(self) -> Iterator[RunDir]:
        """Finished runs under runs/, sorted by name."""
        return (r for r in self.run_dirs() if r.finished)
