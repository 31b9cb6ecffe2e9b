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

__all__ = ["FIELDS", "MAX_KINDS", "by_kind", "counts", "diagnostics", "outrank_probability"]

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
