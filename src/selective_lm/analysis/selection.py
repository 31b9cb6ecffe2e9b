"""Selection diagnostics: which tokens did a run train on? Pure: tensors in, numbers out.

The trainer adds `counts(...)` of every micro-batch into running totals (one vector, so that
data-parallel ranks sum it in one all-reduce) and `diagnostics(totals)` turns the totals into
the fractions `results.json` reports under `selection`. Weights are the selection (1/0, or the
soft weights), so a soft run's share is its share of the training weight.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["FIELDS", "counts", "diagnostics"]

# Sums over every trained target token of a run (weighted by the selection where it says "selected").
FIELDS = (
    "noise_selected", "noise_valid",  # injected-noise targets: selected weight, count
    "clean_selected", "clean_valid",  # every other target
    "ref_selected", "ref_selected_n",  # reference loss of the selected targets: weighted sum, weight
    "ref_unselected", "ref_unselected_n",  # reference loss of the targets with zero weight: sum, count
)


def counts(weights: Tensor, valid: Tensor, noise: Tensor | None, ref: Tensor | None) -> Tensor:
    """One micro-batch's contribution to `FIELDS`, float64 `[len(FIELDS)]`.

    weights `[B, T]` float (0 = not selected), valid `[B, T]` bool (positions with a target),
    noise `[B, T]` bool or None (no noise mask: every target is clean), ref `[B, T]` reference
    losses or None (the ref fields are then 0; NaN outside `valid` is ignored).
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
    return torch.stack([values[k].double() for k in FIELDS])


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
