"""The learning curve of a run: validation loss of the current weights on fixed subsets of the eval splits.

The subsets (`eval.curve_tokens` of each split, blocks spread over every document) are the same
for every run and step, so the curves of a grid compare point by point. Every rank computes a
point (a sharded model's forward needs them all); the trainer's main process writes it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .config import Config
from .engine import Engine, frozen_batch_size, to_device
from .layout import OutDir, TokenStore


class LearningCurve:
    """The curve's subsets of one out dir, and the points of a wrapped model (`loss.SelectiveLM`)."""

    def __init__(self, cfg: Config, out: OutDir) -> None:
        self.cfg = cfg
        self.stores: dict[str, TokenStore] = {
            s: out.store(s).spread(cfg.eval.curve_tokens) for s in cfg.eval.splits if out.store_dir(s).is_dir()}
        self.batch = 1

    def __bool__(self) -> bool:
        return bool(self.stores)

    def size(self, engine: Engine, module: torch.nn.Module, key: dict[str, Any]) -> None:
        """`eval.batch_size` for the curve's passes on this device (auto: probed on CUDA)."""
        store = next(iter(self.stores.values()))
        rows = max(s.n_blocks for s in self.stores.values())
        self.batch = frozen_batch_size(self.cfg.eval.batch_size, 8, lambda n: self._losses(engine, module, store,
                                                                                          slice(0, n)),
                                       {**key, "kind": "eval"}, engine.device, rows)

    @torch.no_grad()
    def _losses(self, engine: Engine, module: torch.nn.Module, store: TokenStore, rows: slice) -> torch.Tensor:
        ids = to_device(store.tokens[rows], engine.device, np.int64)
        valid = to_device(store.targets(rows, self.cfg.data.doc_boundaries), engine.device)
        with engine.autocast():  # through the engine: FSDP gathers the head in its forward
            return module(ids, valid, losses_only=True, chunk_size=self.cfg.scoring.chunk_size)["losses"]

    @torch.no_grad()
    def point(self, engine: Engine, module: torch.nn.Module, model: torch.nn.Module, step: int,
              tokens_seen: int) -> dict[str, Any]:
        """Token-weighted mean loss on each split's subset, in eval mode (then train mode again)."""
        model.eval()
        val = {}
        for split, store in self.stores.items():
            sums = [self._losses(engine, module, store, slice(i, i + self.batch)).nansum()
                    for i in range(0, store.n_blocks, self.batch)]
            count = float(store.targets(slice(None), self.cfg.data.doc_boundaries).sum())
            val[split] = float(torch.stack(sums).double().sum()) / max(count, 1.0)
        model.train()
        return {"step": step, "tokens_seen": tokens_seen, "val_loss": val}
