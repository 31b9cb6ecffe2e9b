"""The distillation control's loss (train.method=distill) against a hand computation on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selective_lm.method.distill import DistillParams, distill_loss, distill_token_losses
from selective_lm.method.loss import Batch, SelectiveLM, SelectiveLoss, forward_hidden, valid_mask
from selective_lm.method.spec import Selection
from test_loss import VOCAB, batch, tiny_llama


def _reference() -> torch.nn.Module:
    ref = tiny_llama(tied=False)
    torch.manual_seed(5)
    with torch.no_grad():  # another model than the student (same shapes, other weights)
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return ref.requires_grad_(False)


def _by_hand(student, ref, ids, valid, weight: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over valid targets of CE + weight · T² · Σ_v q_v (log q_v − log p_v), q/p = softmax(logits / T) of the
    reference / student at the previous position, from the models' full logits; and the mean CE."""
    logits = student(input_ids=ids).logits[:, :-1]
    with torch.no_grad():
        ref_logits = ref(input_ids=ids).logits[:, :-1]
    keep = valid[:, 1:]
    targets = ids[:, 1:][keep]
    s, r = logits[keep], ref_logits[keep]
    ce = -torch.log(torch.softmax(s, -1)[torch.arange(len(targets)), targets])
    q, p = torch.softmax(r / temperature, -1), torch.softmax(s / temperature, -1)
    kl = (q * (q.log() - p.log())).sum(-1) * temperature**2
    return (ce + weight * kl).sum(), ce.mean()


def _distill(student, ids, valid, reference: tuple[torch.Tensor, torch.nn.Module], params: DistillParams,
             chunk: int = 1024) -> SelectiveLoss:
    """The `distill` objective on one micro-batch, as the trainer's module calls it."""
    return distill_loss(Batch(student, ids, valid, selection=Selection(method="distill"), chunk_size=chunk,
                              reference=reference), params)


@pytest.mark.parametrize(("weight", "temperature", "chunk"), [(1.0, 1.0, 1024), (0.5, 2.0, 7), (0.0, 1.0, 7)])
@pytest.mark.parametrize("lora", [False, True])
def test_distill_loss_equals_ce_plus_weighted_kl_by_hand(weight, temperature, chunk, lora) -> None:
    """Loss and gradients, one chunk and several (checkpointed), full fine-tuning and LoRA (frozen head)."""
    ids, attention, valid = batch()
    ref = _reference()
    student = tiny_llama(tied=True, lora=lora)
    expected, mean_ce = _by_hand(student, ref, ids, valid, weight, temperature)
    params = [p for p in student.parameters() if p.requires_grad]
    want = torch.autograd.grad(expected, params)
    with torch.no_grad():
        ref_hidden, ref_head = forward_hidden(ref, ids)
    out = _distill(student, ids, valid, (ref_hidden, ref_head), DistillParams(weight=weight, temperature=temperature),
                   chunk)
    torch.testing.assert_close(out.loss_sum, expected)
    torch.testing.assert_close(out.loss_selected, mean_ce)
    assert out.n_selected == out.n_valid == valid[:, 1:].sum() and out.n_unselected == 0
    assert torch.equal(out.weights > 0, valid)
    for g, w in zip(torch.autograd.grad(out.loss_sum, params), want, strict=True):
        torch.testing.assert_close(g, w)


def test_selective_lm_computes_the_objective_in_its_forward() -> None:
    """The module the engines wrap: the distill method's objective replaces the selective loss (its ratio and
    strategy are not applied: every valid token trains)."""
    ids, _, valid = batch()
    ref = _reference()
    student = tiny_llama(tied=False)
    with torch.no_grad():
        reference = forward_hidden(ref, ids)
    out = SelectiveLM(student)(ids, valid, selection=Selection(method="distill", ratio=0.5), reference=reference,
                               params=DistillParams(weight=0.3, temperature=1.5))
    torch.testing.assert_close(out["loss_sum"], _by_hand(student, ref, ids, valid, 0.3, 1.5)[0])


def test_token_losses_closed_forms() -> None:
    """Equal distributions: KL 0; uniform student: CE = log V, KL = T² (log V − H(q_T))."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, VOCAB, generator=g, dtype=torch.float64)
    targets = torch.randint(VOCAB, (5,), generator=g)
    ce, kl = distill_token_losses(logits, logits.clone(), targets, 3.0)
    torch.testing.assert_close(kl, torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(ce, F.cross_entropy(logits, targets, reduction="none"))
    ce, kl = distill_token_losses(torch.zeros(5, VOCAB, dtype=torch.float64), logits, targets, 2.0)
    q = torch.softmax(logits / 2.0, -1)
    entropy = -(q * q.log()).sum(-1)
    torch.testing.assert_close(ce, torch.full((5,), math.log(VOCAB), dtype=torch.float64))
    torch.testing.assert_close(kl, 4.0 * (math.log(VOCAB) - entropy))
    with pytest.raises(ValueError, match="one vocabulary"):
        distill_token_losses(logits, logits[:, :-1], targets)


def test_valid_mask_is_respected() -> None:
    """Padding and position 0 are never trained: only valid rows enter the sum."""
    ids, attention, _ = batch()
    valid = valid_mask(ids, attention)
    ref = _reference()
    student = tiny_llama(tied=False)
    with torch.no_grad():
        reference = forward_hidden(ref, ids)
    params = DistillParams()
    full = _distill(student, ids, valid, reference, params)
    half = valid.clone()
    half[0] = False
    part = _distill(student, ids, half, reference, params)
    first = valid.clone()
    first[1:] = False
    torch.testing.assert_close(full.loss_sum, part.loss_sum + _distill(student, ids, first, reference, params).loss_sum)
