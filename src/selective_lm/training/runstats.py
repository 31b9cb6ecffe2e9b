"""What a training run counts: per micro-batch sums (one float64 vector, so that data-parallel ranks add them
in one all-reduce and the step needs one host sync), the step's log record, and the run's totals.

The vector is `STAT_KEYS` (the step's sums, then the selection diagnostics of `analysis.selection`) followed,
when the train split has wrong-step labels, by per-document counts of the labelled documents
(`analysis.selection.doc_counts`), which `slm analyze` bootstraps over documents.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..analysis import selection as diag
from ..method.loss import SelectiveLoss

__all__ = ["STAT_KEYS", "STEP_KEYS", "advance", "micro_stats", "ratio", "selection_summary", "unpack"]

# Per-step sums (over micro-batches and ranks) that the log is made of; the selection diagnostics follow.
STEP_KEYS = ("loss_sum", "n_selected", "n_valid", "n_fed", "score_selected", "score_unselected", "n_unselected")
STAT_KEYS = (*STEP_KEYS, *diag.FIELDS)


def ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def size(n_slots: int, n_slot_kinds: int) -> int:
    """Length of the vector: STAT_KEYS and the per-document counts."""
    return len(STAT_KEYS) + 2 * n_slots * n_slot_kinds


def micro_stats(out: SelectiveLoss, n_fed: int, valid: torch.Tensor, noise: torch.Tensor | None,
                kinds: torch.Tensor | None, ref: torch.Tensor | None, docs: torch.Tensor | None,
                slots: torch.Tensor, slot_kinds: Sequence[int], ce_only: bool = False) -> torch.Tensor:
    """One micro-batch's contribution to the vector (module docstring).

    n_valid counts every target, also those the oracle may not train (its trained share is trained / valid);
    `ce_only` (distillation) logs the mean CE as the loss, the figure comparable with the other runs' (its
    objective adds the KL).
    """
    loss_sum = out.loss_selected.nan_to_num() * out.n_selected if ce_only else out.loss_sum.detach()
    values = {
        "loss_sum": loss_sum, "n_selected": out.n_selected, "n_valid": valid.sum(),
        "n_fed": torch.tensor(float(n_fed), device=out.weights.device),
        "score_selected": torch.nan_to_num(out.score_selected) * out.n_selected,
        "score_unselected": torch.nan_to_num(out.score_unselected) * out.n_unselected,
        "n_unselected": out.n_unselected,
    }
    step = torch.stack([values[k].double() for k in STEP_KEYS])
    per_doc = diag.doc_counts(out.weights, valid, kinds, docs, slots, slot_kinds) \
        if docs is not None and kinds is not None else step[:0]
    return torch.cat([step, diag.counts(out.weights, valid, noise, ref, kinds), per_doc])


def unpack(values: list[float]) -> dict[str, Any]:
    """The summed vector as STAT_KEYS -> value, and `doc_counts` (the per-document counts, maybe empty)."""
    return {**dict(zip(STAT_KEYS, values, strict=False)), "doc_counts": values[len(STAT_KEYS):]}


def advance(state: dict[str, Any], sums: dict[str, Any], kind_names: Sequence[str]) -> dict[str, Any]:
    """Fold one step's sums into the run state; return the step's log record (with each kind's counts, from
    which `slm analyze` bootstraps the per-kind ratios over steps)."""
    state["step"] += 1
    state["tokens_seen"] += int(sums["n_fed"])
    state["tokens_trained"] += int(round(sums["n_selected"]))
    state["tokens_valid"] = state.get("tokens_valid", 0) + int(sums["n_valid"])  # absent in older checkpoints
    for k in diag.FIELDS:
        state["diag"][k] = state["diag"].get(k, 0.0) + sums[k]
    if sums["doc_counts"]:
        before = state.get("doc_counts") or np.zeros(len(sums["doc_counts"]))
        state["doc_counts"] = np.add(before, sums["doc_counts"]).tolist()
    n_sel = sums["n_selected"]
    return {
        "step": state["step"], "tokens_seen": state["tokens_seen"], "tokens_trained": state["tokens_trained"],
        "loss": ratio(sums["loss_sum"], n_sel), "selected_frac": n_sel / max(sums["n_valid"], 1.0),
        "score_selected": ratio(sums["score_selected"], n_sel),
        "score_unselected": ratio(sums["score_unselected"], sums["n_unselected"]),
        "lr": sums["lr"], "grad_norm": sums["grad_norm"], "step_s": sums["step_s"],
        "selected_by_kind": {k: v for k, v in diag.by_kind(sums, kind_names).items() if v is not None},
        "kind_counts": diag.kind_counts(sums, kind_names),
    }


def selection_summary(state: dict[str, Any], kind_names: Sequence[str], slots: Sequence[int]) -> dict[str, Any]:
    """train.json `selection`: noise/clean shares, each kind's trained share and target count, and the
    labelled documents' counts (`wrong_step_docs`) when there are any."""
    totals = state["diag"]
    out = {**diag.diagnostics(totals), "by_kind": diag.by_kind(totals, kind_names),
           "kind_tokens": {k: v[1] for k, v in diag.kind_counts(totals, kind_names).items()}}
    if slots and state.get("doc_counts"):
        out["wrong_step_docs"] = diag.per_document(state["doc_counts"], slots, diag.WRONG_STEP)
    return out
