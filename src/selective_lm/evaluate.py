"""`slm eval`: token-weighted validation loss and perplexity of a run, the reference or the base model.

Perplexity is exp(Σ nats / Σ tokens) over every predicted token of a split (lm-eval's
weighted perplexity), with the project's one next-token shift (`loss.token_losses`). The
per-token losses are kept under `token_losses/<split>.npy` (the token store's shape, or its
first blocks under `eval.max_tokens`; NaN where nothing was predicted) for the bucket
analyses; trajectory snapshots are evaluated on the bucket split into
`token_losses/trajectory/step-NNNNNN.npy`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from .common import UserError, fingerprint, read_json, write_json
from .config import Config
from .data import TokenStore, load_store
from .models import apply_lora, load_model, load_tokenizer, load_trained
from .scoring import load_reference_model, store_fingerprint, token_loss_pass


def summarize(losses: np.ndarray) -> dict[str, float]:
    """Token-weighted mean loss and perplexity of a `[n_blocks, T]` loss array (NaN = no target)."""
    finite = np.isfinite(losses)
    n = int(finite.sum())
    if n == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "tokens": 0}
    mean = float(np.sum(losses[finite], dtype=np.float64) / n)
    return {"loss": mean, "ppl": math.exp(mean), "tokens": n}


def model_dir(out: Path, name: str) -> Path:
    """Where an evaluated model's outputs go: `runs/<name>`, `reference/` or `base/`."""
    return out / name if name in ("reference", "base") else out / "runs" / name


def _load(cfg: Config, out: Path, name: str, vocab: int) -> tuple[Any, str]:
    """The model to evaluate and a digest of its weights (to invalidate stale token losses)."""
    if name == "reference":
        model = load_reference_model(cfg, out)  # says `run slm reference` when there is none
        return model, read_json(out / "reference" / "reference.json")["digest"]
    if name == "base":
        return load_model(cfg.model, vocab_size=vocab), fingerprint(cfg.model.name, cfg.model.revision)
    run = out / "runs" / name
    summary = run / "train.json"
    if not summary.is_file():
        raise UserError(f"run {name!r} has not finished training in {out}/runs: run `slm train` first")
    path = run / "adapter" if (run / "adapter").is_dir() else run / "model"
    return load_trained(cfg.model, path, vocab), read_json(summary)["config_hash"]


def _head(store: TokenStore, max_tokens: int | None) -> TokenStore:
    """The first blocks of `store` that hold `max_tokens` tokens (rounded up to whole blocks); all if None."""
    if max_tokens is None:
        return store
    n = min(store.n_blocks, -(-max_tokens // store.block_len))
    noise = store.noise_mask[:n] if store.noise_mask is not None else None
    return replace(store, tokens=store.tokens[:n], doc_ids=store.doc_ids[:n], noise_mask=noise)


def _cached_pass(cfg: Config, model: Any, store: TokenStore, path: Path, expected: dict[str, Any],
                 desc: str, prepare: Callable[[], None] = lambda: None) -> None:
    """Token losses of `store` into `path` unless `path.json` shows they were made from `expected`.

    `prepare` runs first when the pass is needed (e.g. to load a snapshot's weights).
    """
    expected = {**expected, "store": store_fingerprint(store), "blocks": store.n_blocks,
                "doc_boundaries": cfg.data.doc_boundaries}
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file() and read_json(meta_path) == expected:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write token losses to {path.parent}: {e.strerror or e}") from None
    prepare()
    token_loss_pass(model, store, path, expected, desc, batch_size=cfg.eval.batch_size,
                    chunk_size=cfg.scoring.chunk_size, doc_boundaries=cfg.data.doc_boundaries)
    write_json(meta_path, expected)


def evaluate(cfg: Config, out: Path, name: str | None = None) -> dict[str, Any]:
    """Evaluate one model (`train.name`-derived run, `reference` or `base`) on `eval.splits`.

    `eval.max_tokens` limits each split to its first blocks. Token losses are reused while the
    model (run config hash / reference digest), the blocks and `data.doc_boundaries` are unchanged.
    """
    from .train import run_name

    name = name or run_name(cfg.train)
    tokenizer = load_tokenizer(cfg.model)
    stores = {split: _head(load_store(out / "data" / split), cfg.eval.max_tokens) for split in cfg.eval.splits}
    target = model_dir(out, name)
    model, digest = _load(cfg, out, name, len(tokenizer))
    model.eval().requires_grad_(False)
    results: dict[str, Any] = {}
    for split, store in stores.items():
        path = target / "token_losses" / f"{split}.npy"
        _cached_pass(cfg, model, store, path, {"model": digest}, f"eval {name} {split}")
        results[split] = summarize(np.load(path, mmap_mode="r"))
    write_json(target / "eval.json", results)
    return results


def evaluate_trajectory(cfg: Config, out: Path, name: str) -> list[int]:
    """Per-token losses on the bucket split at every trajectory snapshot of a LoRA run; returns the steps.

    The first `analysis.trajectory_tokens` tokens of the split (all if None), in whole blocks. The
    LoRA wrapper is kept unmerged and each snapshot's trainable weights are copied in; the step-0
    snapshot (B = 0) therefore gives the base model's losses.
    """
    run = out / "runs" / name
    snaps = sorted((run / "checkpoints" / "trajectory").glob("step-*.safetensors"))
    if len(snaps) < 2 or not cfg.model.lora:
        return []
    if not (run / "train.json").is_file():
        raise UserError(f"run {name!r} has not finished training in {out}/runs: run `slm train` first")
    config_hash = read_json(run / "train.json")["config_hash"]
    store = _head(load_store(out / "data" / cfg.analysis.bucket_split), cfg.analysis.trajectory_tokens)
    tokenizer = load_tokenizer(cfg.model)
    model = apply_lora(load_model(cfg.model, vocab_size=len(tokenizer)), cfg.model)
    model.eval().requires_grad_(False)
    params = dict(model.named_parameters())

    def load_snapshot(snap: Path) -> None:
        with torch.no_grad():
            for key, value in load_file(snap).items():
                params[key].copy_(value)

    steps = []
    for snap in snaps:
        step = int(snap.stem.split("-")[1])
        path = run / "token_losses" / "trajectory" / f"step-{step:06d}.npy"
        _cached_pass(cfg, model, store, path, {"model": config_hash, "snapshot": snap.name},
                     f"trajectory {name} step {step}", lambda snap=snap: load_snapshot(snap))
        steps.append(step)
    return steps
