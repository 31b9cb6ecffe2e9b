"""The distillation objective and its control (`train.method=distill`): is selective training's gain selection,
or transfer of what the reference knows? Every token is trained with its CE plus
`objectives.distill.weight` x KL(reference || student) on the next-token distribution (at
`objectives.distill.temperature`). The reference's logits are computed online, in the step, from the reference
model's hidden states (the simplest choice: no cache of top-k probabilities beside the scores, at the cost of
one reference forward per micro-batch, as `scoring.mode=online`). A method that selects trains the tokens its
selection keeps instead of every token (weighted by them with `train.soft`): `topk_distill`, distillation's CE and
KL on the tokens top-k keeps, and its reverse control `bottomk_distill`, the lowest scores (at ratio r bottom-k is
exactly the complement of top-k at 1 - r wherever r x n is not a half-integer, `selection.py`; at the study's 0.5,
with an even count of valid tokens per unit, of top-k at 0.5). With a frozen linear student head (LoRA) the row
gradients come out of the forward, as CLM's (`head.FrozenLinearCE`): each chunk's logits are made once, never
recomputed in backward.

Registered here, in one file: the objective `distill` (it needs the reference's logits, so the trainer runs
the reference online and hands its hidden states over in `Batch.reference`), its config keys, the method of the
same name (a control compared with top-k: selection or transfer?), and the selecting methods under it.
`SelectiveLM` calls it in its forward, so the engines see an ordinary forward/backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .head import chunk_rows, fp32_logits, frozen_linear
from .loss import Batch, SelectiveLoss, check_valid, selection_result, shifted_rows, token_losses
from .registry import Method, Objective, register_method, register_objective

__all__ = ["DistillParams", "distill_loss", "distill_token_losses"]

NAME = "distill"


class DistillParams(BaseModel):
    """`objectives.distill.*`: the KL's weight and temperature."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(1.0, ge=0.0, allow_inf_nan=False, description="weight of KL(reference || student) beside "
                          "the CE of every trained token (0 = CLM with the reference's cost)")
    temperature: float = Field(1.0, gt=0.0, allow_inf_nan=False, description="both distributions at logits / T, "
                               "the KL times T² (Hinton et al.'s scaling)")


def distill_token_losses(logits: Tensor, ref_logits: Tensor, targets: Tensor,
                         temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(CE `[N]`, KL `[N]`) of student logits `[N, V]` against targets `[N]` and reference logits `[N, V]`.

    KL(p_ref || p_student) with both distributions at logits / temperature, times temperature² (so that
    its gradient keeps its scale as the temperature changes, Hinton et al. 2015); the CE is at temperature 1.
    Float32 at least whatever the logits' dtype; only the student's side has grad.
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"student logits {tuple(logits.shape)} and reference logits {tuple(ref_logits.shape)} "
                         "differ: distillation needs one vocabulary")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits, ref = logits.to(dtype), ref_logits.detach().to(dtype)
    ce = F.cross_entropy(logits, targets, reduction="none")
    log_p = F.log_softmax(logits / temperature, dim=-1)
    log_q = F.log_softmax(ref / temperature, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1) * temperature**2
    return ce, kl


def _distill_chunk(head: nn.Module, rows: Tensor, ref_head: nn.Module, ref_rows: Tensor, targets: Tensor,
                   trained: Tensor, weight: float, temperature: float) -> tuple[Tensor, Tensor]:
    """Σ trained x (CE + weight x KL) of a chunk's rows (with grad; `trained`: 0/1 or soft weights), and its CE
    per row (no grad)."""
    with torch.no_grad():
        ref = fp32_logits(ref_head, ref_rows)
    ce, kl = distill_token_losses(fp32_logits(head, rows), ref, targets, temperature)
    return torch.where(trained != 0, (ce + weight * kl) * trained.to(ce.dtype), 0).sum(), ce.detach()


class _FrozenLinearDistill(torch.autograd.Function):
    """trained x (CE + weight x KL) `[N]` of rows `[N, H]` through a frozen linear student head (`trained`: 0/1 or
    soft weights), with
    the row gradients computed in the forward: d/dz = softmax(z) - onehot + weight x T x (softmax(z / T) -
    softmax(r / T)), times the head's weight. Also returns the CE `[N]` (not differentiable)."""

    @staticmethod
    def forward(ctx, head: nn.Linear, rows: Tensor, ref_head: nn.Module, ref_rows: Tensor,  # type: ignore[override]
                targets: Tensor, trained: Tensor, weight: float, temperature: float,
                chunk: int) -> tuple[Tensor, Tensor]:
        totals, ces, grads = [], [], []
        for i in range(0, len(rows), chunk):
            z = fp32_logits(head, rows[i:i + chunk])
            y = targets[i:i + chunk]
            picked = torch.arange(len(y), device=y.device)
            log_p1 = z.log_softmax(-1)
            ce = -log_p1[picked, y]
            log_pt = log_p1 if temperature == 1 else (z / temperature).log_softmax(-1)
            log_q = (fp32_logits(ref_head, ref_rows[i:i + chunk]) / temperature).log_softmax(-1)
            q = log_q.exp()
            kl = (q * (log_q - log_pt)).sum(-1) * temperature**2
            grad = log_pt.exp().sub_(q).mul_(weight * temperature)
            grad += log_p1.exp_()
            grad[picked, y] -= 1
            keep = trained[i:i + chunk].to(grad.dtype)
            grad.mul_(keep.unsqueeze(1))
            totals.append(torch.where(keep != 0, (ce + weight * kl) * keep, 0))
            ces.append(ce)
            grads.append((grad.to(head.weight.dtype) @ head.weight).to(rows.dtype))
        ctx.save_for_backward(torch.cat(grads))
        ce = torch.cat(ces)
        ctx.mark_non_differentiable(ce)
        return torch.cat(totals), ce

    @staticmethod
    def backward(ctx, grad_totals: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (grads,) = ctx.saved_tensors
        return None, grads * grad_totals.unsqueeze(1).to(grads.dtype), None, None, None, None, None, None, None


def distill_loss(batch: Batch, params: DistillParams | None = None) -> SelectiveLoss:
    """The `distill` objective on one micro-batch: every trained token's CE plus `params.weight` x
    KL(reference || student) on the next-token distribution (`distill_token_losses`); the trained tokens are
    the valid ones, or those the selection keeps when the method selects (a no-grad pass scores them first),
    each weighted by its soft weight with `train.soft`.

    As a `SelectiveLoss`: loss_sum is the summed objective (with grad), loss_selected the mean CE (the figure
    comparable with CLM's loss). Rows go through both heads a chunk at a time (`MAX_CHUNK_LOGITS`), so the two
    `N x V` logit tensors never exist at once: with a frozen linear head the row gradients are made in the
    forward, otherwise each chunk is checkpointed when there are several.
    """
    params = params or DistillParams()
    ids, valid = batch.input_ids, batch.valid
    check_valid(valid, ids.shape)
    if batch.reference is None:
        raise ValueError("the distill objective needs the reference's hidden states and head (Batch.reference)")
    ref_hidden, ref_head = batch.reference
    hidden, head = batch.forward()
    if ref_hidden.shape[:2] != ids.shape:
        raise ValueError(f"reference hidden states {tuple(ref_hidden.shape)} do not fit input_ids {tuple(ids.shape)}")
    s = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    chosen = valid
    if batch.selection.method_entry.selects:
        with torch.no_grad():
            own = token_losses(hidden.detach(), head, ids, valid, chunk_size=batch.chunk_size)
        s = batch.score(own, hidden, head)
        chosen = batch.select(s)
    rows, targets = shifted_rows(hidden, ids, valid)  # every position t >= 1: no host sync
    ref_rows = shifted_rows(ref_hidden.detach(), ids, valid)[0]
    trained = chosen[:, 1:].flatten()
    chunk = chunk_rows(batch.chunk_size, head, ref_head)
    n = rows.shape[0]
    if n and frozen_linear(head):
        totals, ce = _FrozenLinearDistill.apply(head, rows, ref_head, ref_rows, targets, trained, params.weight,
                                                params.temperature, chunk)
        total = totals.sum()
    else:
        sums, ces = [], []
        for i in range(0, max(n, 1), chunk):  # max(n, 1): an empty batch still yields a graph
            args = (head, rows[i:i + chunk], ref_head, ref_rows[i:i + chunk], targets[i:i + chunk],
                    trained[i:i + chunk], params.weight, params.temperature)
            part, part_ce = (checkpoint(_distill_chunk, *args, use_reentrant=False) if n > chunk
                             else _distill_chunk(*args))
            sums.append(part)
            ces.append(part_ce)
        total, ce = torch.stack(sums).sum(), torch.cat(ces)
    ce = ce.view(ids.shape[0], -1)
    nan = torch.full((), torch.nan, dtype=ce.dtype, device=ce.device)
    own_ce = torch.cat([nan.expand(ids.shape[0], 1), torch.where(valid[:, 1:], ce, nan)], dim=1)
    return selection_result(total, own_ce, s.to(own_ce.dtype), chosen, valid)


def _params(value: Any) -> DistillParams:
    return value if isinstance(value, DistillParams) else DistillParams.model_validate(value or {})


register_objective(NAME, Objective(
    lambda batch, params: distill_loss(batch, _params(params)), frozenset({"reference_logits"}), DistillParams,
    logs_ce=True, doc="CE + weight x KL(reference || student) on the trained tokens",
    renamed={"train.kd_weight": "weight", "train.kd_temperature": "temperature"},
    suffixes=lambda p: [*([f"w{p.weight:g}"] if p.weight != 1 else []),
                        *([f"T{p.temperature:g}"] if p.temperature != 1 else [])]),
    method=Method(strategy=None, objective=NAME, role="control", compare=("topk", NAME), in_default_grid=True,
                  question="Selection or transfer? If top-k's gain were only transfer of what the reference knows, "
                  "distillation (every token, CLM + KL towards the reference) would match or beat top-k at equal "
                  "tokens seen",
                  conclusions={"loses to": "transfer alone does more than selection here",
                               "beats": "selection does more than transfer alone here"},
                  doc="every token: CLM + objectives.distill.weight x KL towards the reference's distribution"))

register_method("topk_distill", Method(
    strategy="topk", objective=NAME,
    doc="the tokens top-k keeps, trained with CE + objectives.distill.weight x KL towards the reference: "
    "selection and transfer together"))
register_method("bottomk_distill", Method(
    strategy="bottomk", objective=NAME, role="control", compare=("bottomk_distill", "topk_distill"),
    question="Does the score pick where transfer helps? Distilling on the lowest scores must lose to distilling on "
    "the highest at the same count (at ratio 0.5 they are each other's complement)",
    conclusions={"loses to": "excess loss picks the tokens where transfer helps",
                 "beats": "distilling the lowest scores does better: the score points away from where transfer "
                 "helps"},
    doc="the lowest scores, trained with CE + KL towards the reference (topk_distill's reverse control)"))
