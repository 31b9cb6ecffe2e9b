"""What a training run counts: per micro-batch sums (one float64 vector, so that data-parallel ranks add them
in one all-reduce and the step needs one host sync), the step's log record, and the run's totals.

The vector is `STAT_KEYS` (the step's sums, then the selection diagnostics of `analysis.selection`) followed,
when the train split has wrong-step labels, by per-document counts of the labelled documents
(`analysis.selection.doc_counts`), which `slm analyze` bootstraps over documents.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..analysis import selection as diag
from ..files import atomic_path
from ..method.loss import SelectiveLoss

__all__ = ["STAT_KEYS", "DocTotals", "STEP_KEYS", "advance", "micro_stats", "ratio", "save_sample", "selection_summary",
           "unpack"]

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


def save_sample(path: Path, rows: np.ndarray, ids: torch.Tensor, weights: torch.Tensor) -> None:
    """Step 0's first selection unit (`selection_sample.npz`): every run of a seed reads those blocks first, so
    selection.html shows each run's weights on the same tokens."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, rows=rows, tokens=ids.cpu().numpy(), weights=weights.float().cpu().numpy())


class DocTotals:
    """Per training document, over the whole run: the trained weight and the target tokens read.

    What the report ranks documents by (the share of each one the run trained). Summed on the device per
    finished step (`add` per micro-batch, `commit` once the step is good: an interrupted step adds nothing; no
    host sync), over ranks only when saved: into a
    checkpoint's `state` (sparse: the documents read so far), so that a resume keeps them, and at the end into
    the run's `doc_selection.npz`. With `n_docs=0` (the reference's split) it does nothing.
    """

    def __init__(self, n_docs: int, device: torch.device) -> None:
        self.enabled = n_docs > 0
        self.sums = torch.zeros(2, n_docs, dtype=torch.float64, device=device)
        self.steps = 0  # steps counted: fewer than the run's when it resumed from a checkpoint made without them
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, weights: torch.Tensor, valid: torch.Tensor, docs: torch.Tensor | None) -> None:
        """One micro-batch of the current step: its weights, targets and doc ids, each `[B, T]`."""
        if self.enabled and docs is not None:
            self.pending.append((weights.detach(), valid, docs))

    def commit(self) -> None:
        """The current step is done: its micro-batches join the totals."""
        if not self.enabled:
            return
        for weights, valid, docs in self.pending:
            d = docs.to(self.sums.device).long().flatten()
            v = valid.to(self.sums.device).flatten().double()
            self.sums[0].index_add_(0, d, weights.to(self.sums.device).double().flatten() * v)
            self.sums[1].index_add_(0, d, v)
        self.pending.clear()
        self.steps += 1

    def into(self, state: dict[str, Any], reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        """`state` with the totals summed over ranks by `reduce` (a collective: every rank calls it)."""
        if self.enabled:
            totals = reduce(self.sums.clone()).cpu().numpy()
            read = np.flatnonzero(totals[1])
            state["doc_totals"] = {"steps": self.steps, "doc_ids": read.tolist(), "selected": totals[0, read].tolist(),
                                   "valid": totals[1, read].tolist()}
        return state

    def load(self, state: dict[str, Any], main: bool) -> None:
        """Resume from a checkpoint's `state`: the main rank holds the sums so far, the others start at 0."""
        entry = state.get("doc_totals")
        if not self.enabled or not entry:  # a checkpoint made before the counts: they cover the steps from here on
            return
        self.steps = int(entry["steps"])
        if main and entry["doc_ids"]:
            ids = torch.tensor(entry["doc_ids"], dtype=torch.long, device=self.sums.device)
            values = torch.tensor([entry["selected"], entry["valid"]], dtype=torch.float64, device=self.sums.device)
            self.sums[:, ids] = values

    def save(self, path: Path, state: dict[str, Any]) -> None:
        """The totals of `state` (`into`) as `doc_selection.npz`: doc_ids, selected, valid, steps."""
        entry = state.get("doc_totals")
        if entry is None:
            return
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, doc_ids=np.asarray(entry["doc_ids"], np.int64), selected=np.asarray(entry["selected"]),
                     valid=np.asarray(entry["valid"]), steps=np.int64(entry["steps"]))
