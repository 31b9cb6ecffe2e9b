"""Per training document: which documents a run trained least and most. Pure: arrays in, numbers out.

A run's per-document totals (trained weight, target tokens) rank its documents by the share it trained: the
documents its selection keeps dropping are where a user looks for the garbage in their data.
"""

from __future__ import annotations

import numpy as np

__all__ = ["extremes", "group_means", "trained_shares"]


def trained_shares(selected: np.ndarray, valid: np.ndarray, min_tokens: float) -> tuple[np.ndarray, np.ndarray]:
    """(positions, shares) of the documents with at least `min_tokens` targets (at least one): trained weight /
    targets. A document read for a handful of tokens has a share of a handful of draws, too few to rank by."""
    selected, valid = np.asarray(selected, np.float64), np.asarray(valid, np.float64)
    keep = np.flatnonzero(valid >= max(min_tokens, 1e-12))
    return keep, selected[keep] / valid[keep]


def extremes(keys: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the `n` smallest keys (ascending) and of the `n` largest (descending), never the same one twice:
    with fewer than 2n keys the smallest take the first half (rounded up), the largest the rest. Ties keep the
    order of the positions (the smallest: first positions first; the largest: last positions first)."""
    order = np.argsort(np.asarray(keys), kind="stable")
    low = order[: min(n, (len(order) + 1) // 2)]
    high = order[len(low):][::-1][:n]
    return low, high


def group_means(groups: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, count) of the finite `values` of each group id in `wanted` (`groups` and `values` of one shape; NaN
    mean where a group has none): a document's mean excess over the tokens where it was measured."""
    groups, values, wanted = np.ravel(groups), np.ravel(values).astype(np.float64), np.asarray(wanted)
    ok = np.isfinite(values) & np.isin(groups, wanted)
    index = np.searchsorted(np.sort(wanted), groups[ok])
    order = np.argsort(wanted)
    sums = np.bincount(index, values[ok], minlength=len(wanted))
    counts = np.bincount(index, minlength=len(wanted))
    mean = np.full(len(wanted), np.nan)
    mean[order] = np.divide(sums, counts, out=np.full(len(wanted), np.nan), where=counts > 0)
    count = np.zeros(len(wanted), np.int64)
    count[order] = counts
    return mean, count
