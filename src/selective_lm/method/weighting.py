"""Weighting baselines: objectives that train every valid token with a per-token weight instead of selecting
(`registry.Method(strategy=None)`), each registered with the method of its name.

- `dft`, Dynamic Fine-Tuning: Wu et al., "On the Generalization of SFT: A Reinforcement Learning Perspective with
  Reward Rectification" (arXiv 2508.05629). Each token's cross-entropy times the token's own probability, detached:
  -sg(p) log p, with p = exp(-CE). Normalised as TRL's `loss_type="dft"` (`trl/trainer/sft_trainer.py`,
  `dft_loss`): the sum over the trained tokens divided by their count, not by the sum of the weights. No reference,
  no config keys.
- `weighted`, the token weighting of Helm, Daheim and Gurevych, "Token Weighting for Long-Range Language
  Modeling" (Findings of NAACL 2025, arXiv 2503.09202; UKPLab/naacl2025-token-weighting, `ShortLongLoss`). Their
  score is a long-context minus a short-context model's loss; here the reference plays the short model, so the
  score is the excess loss (own - reference). Its transforms, in the reference code's order: |excess|, clipped at
  `truncation` (γ), the top `sparsification` (κ) share set to 1 and the rest to 0, normalised to mean 1 over the
  unit (L1), blended with plain CE as `interpolation` + (1 - `interpolation`) x weight (λ). The defaults are the
  repository's shipped config (`configs/llama3_32k_dense.json`, "dense 0.75": |excess|, L1, λ = 0.75, no κ, no γ).
  The unit is the selection unit (train.batch_size rows, each of their rows with train.scope=sequence); the paper
  trains one 32k-token sequence per device, its row. Not `train.soft`: soft selection weighs by
  k x softmax(score / T) (exponential in the excess, signed), these weights are linear in |excess|, blended, and
  mean 1 over every token.

Both count every valid token as trained (`SelectiveLoss.n_selected` is the valid count: `dft`'s weights are 1,
`weighted`'s sum to the unit's valid tokens), so the trainer's mean over trained tokens is the references' mean over
tokens. `dft` logs the plain mean CE (`Objective.logs_ce`: its objective, p x CE, is no cross-entropy); `weighted`
logs its objective, the weighted mean CE, as soft selection does.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from .loss import Batch, SelectiveLoss, check_valid, finite_or_nan, selection_result, token_losses
from .registry import Method, Objective, register_objective
from .selection import scores, select

__all__ = ["WeightedParams", "dft_loss", "excess_weights", "weighted_loss"]


def dft_loss(batch: Batch, params: Any = None) -> SelectiveLoss:
    """The `dft` objective on one micro-batch: Σ over valid tokens of sg(p) x CE, p = exp(-CE), with grad;
    n_selected the valid count (TRL's denominator). Scores: each token's weight p."""
    ids, valid = batch.input_ids, batch.valid
    check_valid(valid, ids.shape)
    hidden, head = batch.forward()
    own_grad = token_losses(hidden, head, ids, valid, chunk_size=batch.chunk_size)
    own = own_grad.detach()
    p = torch.exp(-own)  # NaN where not valid
    loss_sum = torch.where(valid, own_grad * p, 0).sum()
    return selection_result(loss_sum, own, p, valid, valid)


class WeightedParams(BaseModel):
    """`objectives.weighted.*`: the transforms of Helm et al.'s token weights (module docstring)."""

    model_config = ConfigDict(extra="forbid")

    interpolation: float = Field(0.75, ge=0.0, le=1.0, allow_inf_nan=False, description="λ: each weight becomes "
                                 "λ + (1 - λ) x weight, a blend with plain CE (1 = CLM)")
    sparsification: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False, description="κ: only the top "
                                         "κ share of each unit's tokens by |excess| keep a weight, all equal (None: "
                                         "every token, by its |excess|)")
    truncation: float | None = Field(None, gt=0.0, allow_inf_nan=False, description="γ: |excess| clipped at γ nats "
                                     "before the weights are made (None: no clip)")


def _units(x: Tensor, rows: int) -> Tensor:
    """`[B, T]` as `[B / rows, rows x T]`: one row per unit of `rows` consecutive rows."""
    return x.reshape(x.shape[0] // rows, -1)


def excess_weights(excess: Tensor, valid: Tensor, params: WeightedParams, rows: int) -> Tensor:
    """Helm et al.'s weights `[B, T]` from excess losses `[B, T]` (NaN allowed where not valid), per unit of `rows`
    consecutive rows: |excess| clipped at γ, the top κ set to 1 and the rest 0, scaled to mean 1 over the unit's
    valid tokens (uniform when all are 0), blended as λ + (1 - λ) x w; 0 where not valid."""
    if excess.shape[0] % rows:
        raise ValueError(f"{excess.shape[0]} rows do not split into units of {rows}")
    w = torch.where(valid, excess.abs(), 0).nan_to_num(0.0)
    if params.truncation is not None:
        w = w.clamp(max=params.truncation)
    u, v = _units(w, rows), _units(valid, rows)
    if params.sparsification is not None:
        u = select(u, params.sparsification, "topk", "sequence", v, check_finite=False).to(u.dtype)
    n, total = v.sum(1, keepdim=True), u.sum(1, keepdim=True)
    u = torch.where(total > 0, u * n / total.clamp_min(torch.finfo(u.dtype).tiny), 1.0)
    u = params.interpolation + (1 - params.interpolation) * u
    return torch.where(v, u, 0).reshape(excess.shape)


def weighted_loss(batch: Batch, params: WeightedParams | None = None) -> SelectiveLoss:
    """The `weighted` objective on one micro-batch: Σ over valid tokens of w x CE with grad, w = `excess_weights`
    of the excess loss (own - reference, no grad) per selection unit; n_selected = Σ w = the valid count. A
    reference loss that is not finite at a valid position makes loss_sum NaN (the trainer stops at its read)."""
    params = params or WeightedParams()
    ids, valid = batch.input_ids, batch.valid
    check_valid(valid, ids.shape)
    if batch.ref_loss is None:
        raise ValueError("the weighted objective needs the reference's losses (Batch.ref_loss)")
    hidden, head = batch.forward()
    own_grad = token_losses(hidden, head, ids, valid, chunk_size=batch.chunk_size)
    own = own_grad.detach()
    s = scores("excess", own, batch.ref_loss, check_finite=False)
    rows = 1 if batch.selection.scope == "sequence" else ids.shape[0] // batch.units
    w = excess_weights(s, valid, params, rows)
    loss_sum = torch.where(w != 0, own_grad * w, 0).sum()
    return selection_result(finite_or_nan(loss_sum, s, valid), own, s, w, valid)


def _weighted_params(value: Any) -> WeightedParams:
    return value if isinstance(value, WeightedParams) else WeightedParams.model_validate(value or {})


register_objective("dft", Objective(
    dft_loss, logs_ce=True, doc="every token's CE times its own detached probability (DFT)"),
    method=Method(strategy=None, objective="dft",
                  doc="every token, CE x sg(p): Dynamic Fine-Tuning (Wu et al. 2025), TRL's loss_type=dft"))
register_objective("weighted", Objective(
    lambda batch, params: weighted_loss(batch, _weighted_params(params)), frozenset({"reference_loss"}),
    WeightedParams, doc="every token's CE weighted by its |excess loss| (Helm et al. 2025)",
    suffixes=lambda p: [*([f"l{p.interpolation:g}"] if p.interpolation != 0.75 else []),
                        *([f"k{p.sparsification:g}"] if p.sparsification is not None else []),
                        *([f"g{p.truncation:g}"] if p.truncation is not None else [])]),
    method=Method(strategy=None, objective="weighted",
                  doc="every token, CE x a weight of its |excess loss| blended with 1 (Helm et al., NAACL 2025)"))
