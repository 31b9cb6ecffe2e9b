"""The LM head's cross-entropy, a chunk of rows at a time (`loss.py` shifts and selects the rows).

With grad there are two paths:

- A frozen plain `nn.Linear` head (LoRA, the default; tied or not): d loss / d row is computed
  in the forward, chunk by chunk, as (softmax - one-hot) @ weight, and kept as `[N, H]`;
  backward only scales it by the incoming gradient. The head costs one forward and one
  input-gradient matmul per row, nothing is recomputed, and the peak is about one chunk of
  logits (computed in place). SLM at ratio >= 0.5 (and soft selection) computes every row's
  loss with grad in one pass, selects, and sums the selected ones: 2 head matmuls per row, as
  CLM. Below ratio 0.5 a no-grad pass scores every row and only the selected rows get the grad
  pass: 1 + 2 x ratio matmuls per row, fewer than 2.
- Any other head (trainable weights in full fine-tuning, a LoRA-wrapped lm_head): every chunk,
  when there is more than one, is checkpointed (its logits are recomputed in backward instead
  of kept); SLM computes all losses without grad first, then only the selected rows with grad,
  so the head's weight gradient covers the selected tokens only. Measured in
  `tests/test_loss.py::test_loss_path_peak_memory_is_a_few_chunks`: V = 150k, 1024 tokens,
  chunk 128 -> full logits 614 MB; peak of this path 240 MB for forward + backward, against
  1853 MB for the naive head + cross_entropy + backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["MAX_CHUNK_LOGITS", "FrozenLinearCE", "chunk_ce", "chunk_rows", "fp32_logits", "frozen_linear", "inplace_ce",
           "rows_ce", "rows_entropy"]

MAX_CHUNK_LOGITS = 1 << 24  # logits per chunk at most (64 MB in float32), whatever chunk_size says


def chunk_ce(head: nn.Module, rows: Tensor, targets: Tensor) -> Tensor:
    """CE `[n]` of rows `[n, H]`; logits upcast to at least float32 (bf16/fp16 models)."""
    return F.cross_entropy(fp32_logits(head, rows), targets, reduction="none")


def inplace_ce(logits: Tensor, targets: Tensor, weight: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """CE `[n]` of logits `[n, V]`, overwriting them (one chunk-sized buffer, no log-softmax copy).

    With `weight [V, H]` also d CE / d row `[n, H]` = (softmax - one-hot) @ weight.
    """
    rows = torch.arange(len(targets), device=targets.device)
    target_logit = logits[rows, targets]
    top = logits.amax(dim=1)
    probs = logits.sub_(top.unsqueeze(1)).exp_()
    total = probs.sum(dim=1)
    losses = total.log() + top - target_logit
    if weight is None:
        return losses, None
    probs.div_(total.unsqueeze(1))
    probs[rows, targets] -= 1
    return losses, probs.to(weight.dtype) @ weight


def fp32_logits(head: nn.Module, rows: Tensor) -> Tensor:
    logits = head(rows)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class FrozenLinearCE(torch.autograd.Function):
    """CE `[N]` of rows `[N, H]` through a frozen linear head; the row gradients come from the forward."""

    @staticmethod
    def forward(ctx, head: nn.Linear, rows: Tensor, targets: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        losses, grads = [], []
        for i in range(0, len(rows), chunk):
            r, y = rows[i : i + chunk], targets[i : i + chunk]
            loss, grad = inplace_ce(fp32_logits(head, r), y, head.weight)
            losses.append(loss)
            grads.append(grad.to(rows.dtype))
        ctx.save_for_backward(torch.cat(grads) if grads else torch.zeros_like(rows))
        return torch.cat(losses) if losses else rows.new_zeros(0, dtype=torch.promote_types(rows.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad_losses: Tensor) -> tuple[None, Tensor, None, None]:  # type: ignore[override]
        (grads,) = ctx.saved_tensors
        return None, grads * grad_losses.unsqueeze(1).to(grads.dtype), None, None


def frozen_linear(head: nn.Module) -> bool:
    """A plain nn.Linear without trainable parameters or hooks: its row gradients can come from the forward."""
    return (
        type(head) is nn.Linear
        and not any(p.requires_grad for p in head.parameters())
        and not (head._forward_hooks or head._forward_pre_hooks or "forward" in vars(head))
    )


def chunk_rows(chunk_size: int, *heads: nn.Module) -> int:
    """Rows per chunk: `chunk_size`, fewer when the widest head's logits would pass `MAX_CHUNK_LOGITS`."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    vocab = max((v for h in heads if isinstance(v := getattr(h, "out_features", None), int)), default=0)
    return min(chunk_size, max(1, MAX_CHUNK_LOGITS // vocab)) if vocab else chunk_size


def rows_entropy(head: nn.Module, rows: Tensor, chunk_size: int) -> Tensor:
    """Entropy (nats) `[N]` of the next-token distribution of hidden rows `[N, H]`, no grad, a chunk at a time."""
    chunk = chunk_rows(chunk_size, head)
    with torch.no_grad():
        parts = [torch.special.entr(fp32_logits(head, rows[i : i + chunk]).softmax(-1)).sum(-1)
                 for i in range(0, rows.shape[0], chunk)]
    return torch.cat(parts) if parts else rows.new_zeros(0, dtype=torch.promote_types(rows.dtype, torch.float32))


def rows_ce(head: nn.Module, rows: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
    """Cross-entropy `[N]` of hidden rows `[N, H]` against targets `[N]`, a chunk of rows at a time."""
    chunk = chunk_rows(chunk_size, head)
    n = rows.shape[0]
    if not (torch.is_grad_enabled() and (rows.requires_grad or any(p.requires_grad for p in head.parameters()))):
        parts = [inplace_ce(fp32_logits(head, rows[i : i + chunk]), targets[i : i + chunk])[0]
                 for i in range(0, n, chunk)]
        return torch.cat(parts) if parts else chunk_ce(head, rows, targets)
    if frozen_linear(head):
        return FrozenLinearCE.apply(head, rows, targets, chunk)
    # A single chunk is not checkpointed: recomputing it would cost time and lower no peak.
    recompute = n > chunk
    parts = []
    for i in range(0, max(n, 1), chunk):  # max(n, 1): an empty selection still yields a graph
        r, y = rows[i : i + chunk], targets[i : i + chunk]
        parts.append(checkpoint(chunk_ce, head, r, y, use_reentrant=False) if recompute else chunk_ce(head, r, y))
    return torch.cat(parts)
