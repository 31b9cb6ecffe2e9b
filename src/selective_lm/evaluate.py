"""`slm eval`: token-weighted validation loss and perplexity of a run, the reference or the base model.

Perplexity is exp(Σ nats / Σ tokens) over every predicted token of a split (lm-eval's
weighted perplexity), with the project's one next-token shift (`loss.token_losses`); on a
supervised fine-tuning split, over its response tokens only (`TokenStore.targets`: what training
trains). The per-token losses are kept under `token_losses/<split>.npy` (the token store's shape, or under
`eval.max_tokens` the blocks `TokenStore.spread_blocks` picks over every document; NaN where
nothing was predicted) for the bucket analyses and the bootstrap intervals; trajectory
snapshots are evaluated on the bucket split into `token_losses/trajectory/step-NNNNNN.npy`,
and the base model also on the scored train blocks (`base/token_losses/train.npy`: the
students' step-0 losses, for the separation of excess loss by token kind) and on each seed's first
selection unit (`base/token_losses/selection_sample.npy`: the step-0 scores that selection.html shows), each
with its rows in the `.json` beside it. With `eval.tasks`, the
same in-memory model then runs downstream tasks through lm-evaluation-harness (`harness`: `tasks.json`). A model
is loaded only for a pass or task not already stored: `slm run` confirms an evaluated study without loading any.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from .config import Config
from .errors import UserError
from .files import fingerprint, read_json, write_json
from .harness import TaskEval
from .store.blocks import BlockOrder
from .store.frozen import token_loss_pass
from .store.layout import OutDir, RunDir, TokenStore
from .training.models import (
    apply_lora,
    load_model,
    load_reference_model,
    load_tokenizer,
    load_trained,
    reference_description,
)


def summarize(losses: np.ndarray) -> dict[str, float]:
    """Token-weighted mean loss and perplexity of a `[n_blocks, T]` loss array (NaN = no target)."""
    finite = np.isfinite(losses)
    n = int(finite.sum())
    if n == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "tokens": 0}
    mean = float(np.sum(losses[finite], dtype=np.float64) / n)
    return {"loss": mean, "ppl": math.exp(mean), "tokens": n}


def model_digest(cfg: Config, run: RunDir) -> str:
    """What identifies the weights evaluated as `run` (token losses and task results record it, so that a
    retrained run or another base model invalidates them): the reference's digest, the base model's name,
    a run's config hash."""
    if run.name == "reference":
        if cfg.reference.is_self:
            raise UserError(f"reference.mode={cfg.reference.mode} has no reference model to evaluate: the "
                            "students' own weights are their reference")
        return reference_description(run)["digest"]
    if run.name == "base":
        return fingerprint(cfg.model.name, cfg.model.revision)
    return run.summary["config_hash"]  # says `run slm train` when the run has not finished


def _load(cfg: Config, out: OutDir, run: RunDir) -> Any:
    """The model to evaluate, in eval mode."""
    if run.name == "reference":
        model = load_reference_model(cfg, out)
    else:
        vocab = len(load_tokenizer(cfg.model))
        model = load_model(cfg.model, vocab_size=vocab) if run.name == "base" else \
            load_trained(cfg.model, run.weights_dir, vocab)
    return model.eval().requires_grad_(False)


def _cached_pass(cfg: Config, model: Callable[[], Any], store: TokenStore, path: Path, expected: dict[str, Any],
                 desc: str, prepare: Callable[[], None] = lambda: None) -> None:
    """Token losses of `store` into `path` unless `path.json` shows they were made from `expected`.

    `model` gives the model (loaded on first need); `prepare` runs first when the pass is needed (e.g. to load a
    snapshot's weights).
    """
    blocks = store.n_blocks if store.rows is None else fingerprint(store.rows.tolist())
    expected = {**expected, "store": store.fingerprint, "blocks": blocks,
                "doc_boundaries": cfg.data.doc_boundaries}
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file() and read_json(meta_path) == expected:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write token losses to {path.parent}: {e.strerror or e}") from None
    prepare()
    token_loss_pass(model(), store, path, expected, desc, batch_size=cfg.eval.batch_size,
                    chunk_size=cfg.scoring.chunk_size, doc_boundaries=cfg.data.doc_boundaries, loss_mask=True,
                    precision=cfg.train.mixed_precision)
    write_json(meta_path, expected)


def evaluate(cfg: Config, out: str | Path | OutDir, name: str | None = None) -> dict[str, Any]:
    """Evaluate one model (`train.name`-derived run, `reference` or `base`) on `eval.splits`, and on the
    downstream tasks of `eval.tasks` when there are any (`harness`; their metrics under "tasks").

    `eval.max_tokens` limits each split to blocks spread over all its documents. Token losses are reused while the
    model (run config hash / reference digest), the blocks and `data.doc_boundaries` are unchanged; task results
    while their fingerprint is (`harness`). Tasks are checked before any evaluation starts.
    """
    out = OutDir.of(out)
    run = out.run(name or cfg.run_name())
    stores = {split: out.checked_store(split, cfg).spread(cfg.eval.max_tokens) for split in cfg.eval.splits}
    digest = model_digest(cfg, run)  # before any loading: an unfinished run says `run slm train`
    tasks = TaskEval(cfg, run, digest) if cfg.eval.tasks else None
    model = functools.cache(lambda: _load(cfg, out, run))
    results: dict[str, Any] = {}
    for split, store in stores.items():
        path = run.token_losses(split)
        _cached_pass(cfg, model, store, path, {"model": digest}, f"eval {run.name} {split}")
        results[split] = {**summarize(np.load(path, mmap_mode="r")), "docs": len(np.unique(store.doc_ids)),
                          "docs_in_split": int(store.meta["n_docs"])}
    if run.name == "base" and (out.scores_dir("train") / "ref_loss.npy").is_file():
        # The students' step-0 model is the base (LoRA B = 0): its losses on scored train blocks give the
        # step-0 excess loss, whose separation by token kind `slm analyze` reports.
        train = out.store("train")
        rows = out.scored_blocks("train", cfg.analysis.separation_tokens)
        _cached_pass(cfg, model, train.subset(rows), run.token_losses("train"),
                     {"model": digest, "rows": rows.tolist()}, "eval base train (step-0 excess)")
        # And on the first selection unit of each seed (every run of a seed reads it first: selection.html shows
        # it). Both record their rows in the `.json` beside the losses (the report reads them back).
        seeds = range(cfg.train.seed, cfg.train.seed + cfg.grid.seeds)
        first = np.unique([BlockOrder(train.n_blocks, s).blocks(0, cfg.train.batch_size) for s in seeds])
        _cached_pass(cfg, model, train.subset(first), run.sample_losses, {"model": digest, "rows": first.tolist()},
                     "eval base train (selection sample)")
    write_json(run.eval_path, results)
    if tasks is not None:
        return {**results, "tasks": tasks.run(model, lambda: load_tokenizer(cfg.model))}
    return results


def evaluate_trajectory(cfg: Config, out: str | Path | OutDir, name: str) -> list[int]:
    """Per-token losses on the bucket split at every trajectory snapshot of a LoRA run; returns the steps.

    The first `analysis.trajectory_tokens` tokens of the split (all if None), in whole blocks. The
    LoRA wrapper is kept unmerged and each snapshot's trainable weights are copied in; the step-0
    snapshot (B = 0) therefore gives the base model's losses.
    """
    out = OutDir.of(out)
    run = out.run(name)
    snaps = run.snapshots()
    if len(snaps) < 2 or not cfg.model.lora:
        return []
    config_hash = run.summary["config_hash"]
    store = out.store(cfg.analysis.bucket_split).spread(cfg.analysis.trajectory_tokens)

    @functools.cache
    def model() -> Any:  # loaded for the first snapshot whose losses are not stored
        lora = apply_lora(load_model(cfg.model, vocab_size=len(load_tokenizer(cfg.model))), cfg.model)
        return lora.eval().requires_grad_(False)

    def load_snapshot(snap: Path) -> None:
        params = dict(model().named_parameters())
        with torch.no_grad():
            for key, value in load_file(snap).items():
                params[key].copy_(value)

    for step, snap in snaps:
        _cached_pass(cfg, model, store, run.trajectory_losses(step), {"model": config_hash, "snapshot": snap.name},
                     f"trajectory {name} step {step}", lambda snap=snap: load_snapshot(snap))
    return [step for step, _ in snaps]
