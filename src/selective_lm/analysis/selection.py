"""Selection diagnostics: which tokens did a run train on? Pure: tensors in, numbers out.

The trainer adds `counts(...)` of every micro-batch into running totals (one vector, so that
data-parallel ranks sum it in one all-reduce) and `diagnostics(totals)` turns the totals into
the fractions `results.json` reports under `selection`. Weights are the selection (1/0, or the
soft weights), so a soft run's share is its share of the training weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["FIELDS", "MAX_KINDS", "WRONG_STEP", "by_kind", "counts", "diagnostics", "doc_counts", "kind_counts",
           "outrank_probability", "per_document"]

MAX_KINDS = 16  # token-kind ids counted (noise_kind.npy holds ids below this)
# Sums over every trained target token of a run (weighted by the selection where it says "selected").
FIELDS = (
    "noise_selected", "noise_valid",  # injected-noise targets: selected weight, count
    "clean_selected", "clean_valid",  # every other target
    "ref_selected", "ref_selected_n",  # reference loss of the selected targets: weighted sum, weight
    "ref_unselected", "ref_unselected_n",  # reference loss of the targets with zero weight: sum, count
    *(f"kind{k}_selected" for k in range(MAX_KINDS)),  # per token kind id: selected weight
    *(f"kind{k}_valid" for k in range(MAX_KINDS)),  # per token kind id: count
)


def counts(weights: Tensor, valid: Tensor, noise: Tensor | None, ref: Tensor | None,
           kinds: Tensor | None = None) -> Tensor:
    """One micro-batch's contribution to `FIELDS`, float64 `[len(FIELDS)]`.

    weights `[B, T]` float (0 = not selected), valid `[B, T]` bool (positions with a target),
    noise `[B, T]` bool or None (no noise mask: every target is clean), ref `[B, T]` reference
    losses or None (the ref fields are then 0; NaN outside `valid` is ignored), kinds `[B, T]`
    integer token-kind ids or None (the per-kind fields are then 0).
    """
    w = weights.double()
    noise = noise.to(valid.device) if noise is not None else torch.zeros_like(valid)
    unselected = (valid & (weights == 0)).double()
    zero = torch.zeros((), dtype=torch.float64, device=w.device)
    values = {
        "noise_selected": (w * (valid & noise)).sum(), "noise_valid": (valid & noise).sum(),
        "clean_selected": (w * (valid & ~noise)).sum(), "clean_valid": (valid & ~noise).sum(),
        "ref_selected": zero, "ref_selected_n": zero, "ref_unselected": zero, "ref_unselected_n": zero,
    }
    if ref is not None:
        r = torch.nan_to_num(ref.to(w.device).double())
        values.update(ref_selected=(w * r).sum(), ref_selected_n=w.sum(),
                      ref_unselected=(unselected * r).sum(), ref_unselected_n=unselected.sum())
    kind_sel = torch.zeros(MAX_KINDS, dtype=torch.float64, device=w.device)
    kind_valid = torch.zeros(MAX_KINDS, dtype=torch.float64, device=w.device)
    if kinds is not None:  # every position, invalid ones adding 0: no boolean indexing, so no host sync
        k = kinds.to(w.device).long().flatten()
        v = valid.double().flatten()
        kind_sel.index_add_(0, k, w.flatten() * v)
        kind_valid.index_add_(0, k, v)
    named = torch.stack([values[k].double() for k in FIELDS[:8]])
    return torch.cat([named, kind_sel, kind_valid])


def by_kind(totals: Mapping[str, float], names: Sequence[str]) -> dict[str, float | None]:
    """Share of each token kind's targets that were trained (weighted if soft); None for a kind never seen."""
    return {name: _share(totals[f"kind{k}_selected"], totals[f"kind{k}_valid"]) for k, name in enumerate(names)}


def kind_counts(totals: Mapping[str, float], names: Sequence[str]) -> dict[str, list[float]]:
    """kind -> [selected weight, target count] of the kinds with targets: a step's counts in log.jsonl, from which
    `slm analyze` bootstraps each kind's ratio over the steps."""
    return {name: [totals[f"kind{k}_selected"], totals[f"kind{k}_valid"]] for k, name in enumerate(names)
            if totals[f"kind{k}_valid"]}


def outrank_probability(clean: np.ndarray, other: np.ndarray) -> float | None:
    """P(a random clean token's score > a random other token's score), ties counted half (the AUC).

    1.0: the score ranks every clean token above the other kind (selection would drop that kind
    first); 0.5: the score cannot tell them apart. From ranks (Mann-Whitney U), O(n log n).
    """
    clean, other = np.asarray(clean, np.float64), np.asarray(other, np.float64)
    clean, other = clean[np.isfinite(clean)], other[np.isfinite(other)]
    if not clean.size or not other.size:
        return None
    both = np.concatenate([clean, other])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(both.size)
    ranks[order] = np.arange(1, both.size + 1)
    _, inverse, tie_counts = np.unique(both, return_inverse=True, return_counts=True)  # average the ranks of ties
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / tie_counts)[inverse]
    u = ranks[: clean.size].sum() - clean.size * (clean.size + 1) / 2
    return float(u / (clean.size * other.size))


def _share(num: float, den: float) -> float | None:
    return num / den if den else None


def diagnostics(totals: Mapping[str, float]) -> dict[str, float | None]:
    """Share of injected-noise and of clean targets selected (weighted if soft), and the mean reference
    loss of the selected and unselected targets over the whole run (None where undefined)."""
    return {
        "noise_selected_frac": _share(totals["noise_selected"], totals["noise_valid"]),
        "clean_selected_frac": _share(totals["clean_selected"], totals["clean_valid"]),
        "ref_loss_selected": _share(totals["ref_selected"], totals["ref_selected_n"]),
        "ref_loss_unselected": _share(totals["ref_unselected"], totals["ref_unselected_n"]),
    }


WRONG_STEP = ("after_wrong_step", "before_wrong_step")  # the label kinds compared per document


def doc_counts(weights: Tensor, valid: Tensor, kinds: Tensor, docs: Tensor, slots: Tensor,
               kind_ids: Sequence[int]) -> Tensor:
    """Per document of `slots` and kind of `kind_ids`: selected weight and target count, float64 `[S * K * 2]`
    laid out [slot, kind, (selected, valid)] (`per_document` reads it back).

    weights, valid, kinds, docs `[B, T]` (docs: the store's doc ids); slots `[S]` sorted doc ids (the labelled
    documents, `TokenStore.wrong_step_docs`). Other documents add nothing; no host sync.
    """
    out = torch.zeros(len(slots), len(kind_ids), 2, dtype=torch.float64, device=weights.device)
    if not len(slots):
        return out.flatten()
    d = docs.to(weights.device).long().flatten()
    slot = torch.searchsorted(slots, d).clamp_max(len(slots) - 1)
    v = (valid.flatten() & (slots[slot] == d)).double()
    w, k = weights.double().flatten() * v, kinds.to(weights.device).long().flatten()
    for j, kind in enumerate(kind_ids):
        mine = (k == kind).double()
        out[:, j, 0].index_add_(0, slot, w * mine)
        out[:, j, 1].index_add_(0, slot, v * mine)
    return out.flatten()


def per_document(totals: Sequence[float], doc_ids: Sequence[int], names: Sequence[str]) -> dict[str, list[float]]:
    """`doc_counts` totals of a run as lists over the documents with any target of the kinds:
    {"doc_ids": [...], "<kind>_selected": [...], "<kind>_valid": [...]} for each kind of `names`."""
    arr = np.asarray(totals, np.float64).reshape(len(doc_ids), len(names), 2)
    seen = arr[:, :, 1].sum(1) > 0
    out: dict[str, list[float]] = {"doc_ids": [int(d) for d, s in zip(doc_ids, seen, strict=True) if s]}
    for j, name in enumerate(names):
        out[f"{name}_selected"] = arr[seen, j, 0].tolist()
        out[f"{name}_valid"] = arr[seen, j, 1].tolist()
    return out
