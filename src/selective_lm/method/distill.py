"""The distillation control (`train.method=distill`): is selective training's gain selection, or transfer of
what the reference knows? Every token is trained with its CE plus `train.kd_weight` x KL(reference || student)
on the next-token distribution (`train.kd_temperature`). The reference's logits are computed online, in the
step, from the reference model's hidden states (the simplest choice: no cache of top-k probabilities beside
the scores, at the cost of one reference forward per micro-batch, as `scoring.mode=online`). With a frozen
linear student head (LoRA) the row gradients come out of the forward, as CLM's (`head.FrozenLinearCE`): each
chunk's logits are made once, never recomputed in backward.

Pure tensor functions; `SelectiveLM` calls a `Distill` in its forward (a `loss.Objective`), so the engines
see an ordinary forward/backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .head import fp32_logits, frozen_linear
from .loss import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_LOGITS,
    SelectiveLoss,
    _check_selection,
    _result,
    _shifted_rows,
    forward_hidden,
)

__all__ = ["Distill", "distill_lm_loss", "distill_token_losses"]


class Distill(NamedTuple):
    """The reference's side of one micro-batch: its final hidden states `[B, T, H]` (no grad) and output embedding,
    computed online by the trainer, with the KL weight and temperature. A `loss.Objective`: `SelectiveLM` calls it."""

    hidden: Tensor
    head: nn.Module
    weight: float
    temperature: float

    def __call__(self, model: nn.Module, input_ids: Tensor, valid: Tensor, chunk_size: int) -> SelectiveLoss:
        return distill_lm_loss(model, input_ids, valid, self, chunk_size=chunk_size)


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
    """Σ (CE + weight x KL) of a chunk's `trained` rows (with grad), and its CE per row (no grad)."""
    with torch.no_grad():
        ref = fp32_logits(ref_head, ref_rows)
    ce, kl = distill_token_losses(fp32_logits(head, rows), ref, targets, temperature)
    return torch.where(trained, ce + weight * kl, 0).sum(), ce.detach()


class _FrozenLinearDistill(torch.autograd.Function):
    """(CE + weight x KL) `[N]` of rows `[N, H]` through a frozen linear student head, 0 where not `trained`, with
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
            keep = trained[i:i + chunk]
            grad.mul_(keep.unsqueeze(1))
            totals.append(torch.where(keep, ce + weight * kl, 0))
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


def distill_lm_loss(model: nn.Module, input_ids: Tensor, valid: Tensor, distill: Distill, *,
                    attention_mask: Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> SelectiveLoss:
    """The distillation control's loss of one micro-batch: every valid token trained with its CE plus
    `distill.weight` x KL(reference || student) on the next-token distribution (`distill_token_losses`).

    As a `SelectiveLoss` that selects every valid token: loss_sum is the summed objective (with grad),
    loss_selected the mean CE (the figure comparable with CLM's loss). Rows go through both heads a chunk
    at a time (`MAX_CHUNK_LOGITS`), so the two `N x V` logit tensors never exist at once: with a frozen linear
    head the row gradients are made in the forward, otherwise each chunk is checkpointed when there are several.
    """
    _check_selection(valid, input_ids.shape, "none", 1.0, "topk", False, None)
    hidden, head = forward_hidden(model, input_ids, attention_mask)
    if distill.hidden.shape[:2] != input_ids.shape:
        raise ValueError(f"reference hidden states {tuple(distill.hidden.shape)} do not fit input_ids "
                         f"{tuple(input_ids.shape)}")
    rows, targets = _shifted_rows(hidden, input_ids, valid)  # every position t >= 1: no host sync
    ref_rows = _shifted_rows(distill.hidden.detach(), input_ids, valid)[0]
    trained = valid[:, 1:].flatten()
    vocab = max(getattr(head, "out_features", 0) or 0, getattr(distill.head, "out_features", 0) or 0)
    chunk = min(chunk_size, max(1, MAX_CHUNK_LOGITS // vocab)) if vocab else chunk_size
    n = rows.shape[0]
    if n and frozen_linear(head):
        totals, ce = _FrozenLinearDistill.apply(head, rows, distill.head, ref_rows, targets, trained, distill.weight,
                                                distill.temperature, chunk)
        total = totals.sum()
    else:
        sums, ces = [], []
        for i in range(0, max(n, 1), chunk):  # max(n, 1): an empty batch still yields a graph
            args = (head, rows[i:i + chunk], distill.head, ref_rows[i:i + chunk], targets[i:i + chunk],
                    trained[i:i + chunk], distill.weight, distill.temperature)
            part, part_ce = (checkpoint(_distill_chunk, *args, use_reentrant=False) if n > chunk
                             else _distill_chunk(*args))
            sums.append(part)
            ces.append(part_ce)
        total, ce = torch.stack(sums).sum(), torch.cat(ces)
    ce = ce.view(input_ids.shape[0], -1)
    nan = torch.full((), torch.nan, dtype=ce.dtype, device=ce.device)
    own = torch.cat([nan.expand(input_ids.shape[0], 1), torch.where(valid[:, 1:], ce, nan)], dim=1)
    return _result(total, own, torch.zeros_like(own), valid, valid)
