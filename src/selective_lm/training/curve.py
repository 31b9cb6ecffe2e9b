"""The learning curve of a run: validation loss of the current weights on fixed subsets of the eval splits.

The subsets (`eval.curve_tokens` of each split, blocks spread over the documents) are the same
for every run and step, so the curves of a grid compare point by point. Each point also keeps the
summed loss of every document of the subset (`doc_nats`, with `doc_tokens`), so the analysis can
bootstrap over documents how many tokens a run needs to reach a loss. Every rank computes a point
(a sharded model's forward needs them all); the trainer's main process writes it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..config import Config
from ..store.layout import OutDir, TokenStore
from .engine import Engine, frozen_batch_size, to_device


class LearningCurve:
    """The curve's subsets of one out dir, and the points of a wrapped model (`loss.SelectiveLM`)."""

    def __init__(self, cfg: Config, out: OutDir) -> None:
        self.cfg = cfg
        self.stores: dict[str, TokenStore] = {
            s: out.store(s).spread(cfg.eval.curve_tokens) for s in cfg.eval.splits if out.store_dir(s).is_dir()}
        self.batch = 1
        self.docs: dict[str, tuple[np.ndarray, list[int]]] = {}  # split -> (doc index per token, tokens per doc)
        for split, store in self.stores.items():
            targets = store.targets(slice(None), cfg.data.doc_boundaries)
            _, index = np.unique(np.asarray(store.doc_ids), return_inverse=True)
            index = index.reshape(targets.shape)
            self.docs[split] = (index, np.bincount(index[targets], minlength=int(index.max()) + 1).tolist())

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
        """Token-weighted mean loss on each split's subset and each document's summed loss, in eval mode (then
        train mode again); one host transfer per split."""
        model.eval()
        val, doc_nats, doc_tokens = {}, {}, {}
        for split, store in self.stores.items():
            index, counts = self.docs[split]
            index = torch.from_numpy(index).to(engine.device)
            sums = torch.zeros(len(counts), dtype=torch.float64, device=engine.device)
            for i in range(0, store.n_blocks, self.batch):
                losses = self._losses(engine, module, store, slice(i, i + self.batch))
                sums.index_add_(0, index[i:i + self.batch].reshape(-1), losses.double().nan_to_num(0.0).reshape(-1))
            doc_nats[split], doc_tokens[split] = sums.tolist(), counts
            val[split] = sum(doc_nats[split]) / max(sum(counts), 1)
        model.train()
        return {"step": step, "tokens_seen": tokens_seen, "val_loss": val, "doc_nats": doc_nats,
                "doc_tokens": doc_tokens}
