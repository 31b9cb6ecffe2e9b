"""The step-0 scores of train blocks, read back for the report: the reference's loss per token (the score store)
and the excess loss, the base model's loss (every student's at step 0: LoRA starts at zero) minus the reference's.

The base model's losses on train blocks are in two files of `base/token_losses/` (evaluate.py), each with its
rows in the `.json` beside it: `train.npy` (the separation's scored blocks) and `selection_sample.npy` (each
seed's first selection unit). Anything missing, stale or unreadable gives fewer blocks, never an error: the report
shows a dash where there is no score.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from ..files import read_json
from ..store.layout import OutDir, TokenStore


@dataclass
class Step0:
    """train block -> per token `[T]`: the reference's loss (of the blocks asked for) and the excess loss (of every
    block the base model was evaluated on); NaN where a token has no target."""

    reference: dict[int, np.ndarray] = field(default_factory=dict)
    excess: dict[int, np.ndarray] = field(default_factory=dict)


def _base_losses(out: OutDir, store: TokenStore) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rows, losses `[len(rows), T]`) of each base-model file made on this train store."""
    found = []
    base = out.run("base")
    for path in (base.token_losses("train"), base.sample_losses):
        meta_path = path.with_suffix(".json")
        if not (path.is_file() and meta_path.is_file()):
            continue
        meta, losses = read_json(meta_path), np.load(path)
        rows = meta.get("rows") if isinstance(meta, dict) else None
        if rows is None or meta.get("store") != store.fingerprint or losses.shape != (len(rows), store.block_len):
            continue  # made before the rows were recorded, or on another store
        found.append((np.asarray(rows, np.int64), losses.astype(np.float64)))
    return found


def read_step0(out: OutDir, store: TokenStore, rows: np.ndarray) -> Step0:
    """The reference's losses of `rows` (the blocks a page shows) and the excess loss wherever the base model was
    measured; empty without a score store of this train store's shape."""
    result = Step0()
    if not out.has_scores("train"):
        return result
    try:
        ref = out.score_values("train")
        if ref.shape != store.tokens.shape:
            return result
        for r in np.unique(np.asarray(rows, np.int64)).tolist():
            result.reference[r] = np.asarray(ref[r], np.float64)
        for found, losses in _base_losses(out, store):
            for r, b, f in zip(found.tolist(), losses, np.asarray(ref[found], np.float64), strict=True):
                result.excess[r] = b - f
    except (UserError, OSError, ValueError):  # an unreadable file: the scores are left out, the report goes on
        return Step0()
    return result
