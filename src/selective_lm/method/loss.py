"""Per-token cross-entropy with the one next-token shift of the project, and the selective loss.

The shift (DESIGN.md, score store): the loss at position `t` is the loss of `input_ids[:, t]`
given the tokens before it, computed from `hidden[:, t - 1]`; position 0 has none and is NaN.
Scoring, training, evaluation and analysis all go through `token_losses`.

Memory: logits are computed a chunk of rows at a time, so at most one chunk x V of them exist
at once, never the full `B x T x V`. A chunk has `chunk_size` rows and never more than
`MAX_CHUNK_LOGITS` logits (64 MB in float32): 110 rows for a 150k vocabulary whatever
`chunk_size` says, so the bound holds for any vocabulary without tuning.

With grad the head takes one of two paths (`head.py`): its row gradients from the forward when it
is a frozen linear layer (LoRA), checkpointed chunks otherwise.

No value is read on the host (a device sync: on a GPU the host waits for the queue to drain), so
shapes never depend on the data: "every row" is every position t >= 1, a zero row where it has no
target (padding, prompt), and the selected rows are gathered to a count known on the host,
`selection.max_selected` (ratio x tokens: the selected count when every position has a target,
filler rows of weight 0 otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .head import MAX_CHUNK_LOGITS, frozen_linear, rows_ce, rows_entropy
from .registry import OBJECTIVES, SCORE_KINDS, Objective, register_objective
from .selection import max_selected, scores, select
from .spec import Selection

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_LOGITS",
    "Batch",
    "SelectiveLM",
    "SelectiveLoss",
    "check_valid",
    "finite_or_nan",
    "cross_entropy_loss",
    "forward_hidden",
    "selected_loss_sum",
    "selected_sum",
    "selection_result",
    "selective_lm_loss",
    "selective_loss_of_losses",
    "shifted_rows",
    "token_entropies",
    "token_losses",
    "valid_mask",
]

DEFAULT_CHUNK_SIZE = 1024
# Config fields of models whose logits are not plain `head(hidden)` (Gemma 2/3, Cohere, Granite).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def valid_mask(
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    doc_ids: Tensor | None = None,
) -> Tensor:
    """bool `[B, T]`: True where position t has a target to predict.

    That is t > 0, neither t nor t - 1 is padding (attention_mask 0), labels[t] != -100, and,
    if doc_ids is given, t and t - 1 belong to the same document (no predicting a document's
    first token from the previous one). labels is only a mask: the targets are input_ids.
    """
    for name, x in (("attention_mask", attention_mask), ("labels", labels), ("doc_ids", doc_ids)):
        if x is not None and x.shape != input_ids.shape:
            raise ValueError(
                f"{name} {tuple(x.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
            )
    valid = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    valid[:, 0] = False
    if attention_mask is not None:
        real = attention_mask.bool()
        valid[:, 1:] &= real[:, 1:] & real[:, :-1]
    if labels is not None:
        valid &= labels != -100
    if doc_ids is not None:
        valid[:, 1:] &= doc_ids[:, 1:] == doc_ids[:, :-1]
    return valid


def shifted_rows(hidden: Tensor, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(rows `[B x (T-1), H]`, targets `[B x (T-1)]`): hidden[b, t - 1] and input_ids[b, t] for every t >= 1,
    row-major. Rows where `mask [B, T]` is False are zeros, so that whatever a padded position holds (NaN from
    a fully masked attention row) reaches neither a loss nor a gradient."""
    rows = torch.where(mask[:, 1:, None], hidden[:, :-1], torch.zeros((), dtype=hidden.dtype, device=hidden.device))
    return rows.flatten(0, 1), input_ids[:, 1:].flatten()


def _gathered_rows(hidden: Tensor, input_ids: Tensor, weights: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(rows `[size, H]`, targets `[size]`, weights `[size]`) of `size` positions t >= 1: those with a nonzero
    weight first, row-major, then others as filler (weight 0, zero rows). `size` is known on the host, so
    this gather reads nothing there; it must be at least the count of nonzero weights (checked on the device)."""
    width = input_ids.shape[1] - 1
    w = weights[:, 1:].flatten()
    chosen = w != 0
    ahead, count = chosen.cumsum(0), chosen.sum()  # chosen positions up to and including each one; all
    place = torch.where(chosen, ahead - 1, count + torch.arange(len(w), device=w.device) - ahead)
    check_on_device(count <= size, f"more than size={size} nonzero weights")
    order = torch.empty_like(place).scatter_(0, place, torch.arange(len(w), device=w.device))[:size]
    b, t = order // width, order % width
    w = w[order]
    rows = torch.where((w != 0)[:, None], hidden[b, t], torch.zeros((), dtype=hidden.dtype, device=hidden.device))
    return rows, input_ids[b, t + 1], w


def _check_shapes(hidden: Tensor, input_ids: Tensor, mask: Tensor | None, name: str) -> None:
    if input_ids.dim() != 2 or hidden.shape[:2] != input_ids.shape or hidden.dim() != 3:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be [B, T, H] for input_ids {tuple(input_ids.shape)}"
        )
    if mask is not None and mask.shape != input_ids.shape:
        raise ValueError(
            f"{name} {tuple(mask.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
        )


def token_losses(
    hidden: Tensor,
    head: nn.Module,
    input_ids: Tensor,
    valid: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Per-token cross-entropy `[B, T]` from final hidden states `[B, T, H]` and the LM head.

    out[b, t] = -log p(input_ids[b, t] | input_ids[b, :t]), from head(hidden[b, t - 1]); NaN at
    t = 0 and where `valid [B, T]` (bool) is False. Every position t >= 1 goes through the head (a
    zero row where not valid), so that no count is read on the host (a device sync). Float32
    (float64 for a float64 model) whatever the model dtype. `head` is any module mapping
    `[N, H] -> [N, V]` (tied or not, LoRA-wrapped or not). Differentiable when grad is enabled;
    call it under torch.no_grad() for scoring and selection.
    """
    _check_shapes(hidden, input_ids, valid, "valid")
    mask = valid if valid is not None else torch.ones_like(input_ids, dtype=torch.bool)
    losses = rows_ce(head, *shifted_rows(hidden, input_ids, mask), chunk_size).view(input_ids.shape[0], -1)
    nan = torch.full((), torch.nan, dtype=losses.dtype, device=losses.device)
    return torch.cat([nan.expand(input_ids.shape[0], 1), torch.where(mask[:, 1:], losses, nan)], dim=1)


def selected_loss_sum(
    hidden: Tensor,
    head: nn.Module,
    input_ids: Tensor,
    weights: Tensor,
    *,
    size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Sum over positions of weights[b, t] x loss[b, t], 0-d, with grad; `weights [B, T]` bool or float.

    `size` rows go through the head: the positions with a nonzero weight, then others with weight 0
    (default and at most: every position t >= 1). A `size` known on the host without reading the
    weights (`selection.max_selected`) makes the head's cost scale with the selected tokens, with no
    host sync. Position 0 has no target and is ignored.
    """
    _check_shapes(hidden, input_ids, weights, "weights")
    n = input_ids.shape[0] * (input_ids.shape[1] - 1)
    if size is None or size >= n:
        rows, targets = shifted_rows(hidden, input_ids, weights != 0)
        w = weights[:, 1:].flatten()
    else:
        rows, targets, w = _gathered_rows(hidden, input_ids, weights, size)
    losses = rows_ce(head, rows, targets, chunk_size)
    return torch.where(w != 0, losses * w.to(losses.dtype), 0).sum()


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (its LoRA layers stay in place), else `model`."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def forward_hidden(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None
) -> tuple[Tensor, nn.Module]:
    """Run an HF causal LM (plain or peft-wrapped) up to its final hidden states, without logits.

    Returns (hidden `[B, T, H]` after the final norm, the output embedding module). The backbone
    is `PreTrainedModel.base_model` (e.g. LlamaModel inside LlamaForCausalLM). Models that
    transform their logits (final-logit soft-capping as in Gemma 2, logit scaling as in
    Cohere/Granite) are not special-cased: they raise ValueError rather than get wrong losses,
    as do peft prompt-learning adapters (their virtual tokens live in the wrapper's forward).
    """
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        raise ValueError("peft prompt-learning adapters are not supported; use LoRA-style adapters")
    lm = _causal_lm(model)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(getattr(lm, "config", None), name, None)
        if value is not None and value != 1:
            raise ValueError(f"model config sets {name}={value}: transformed logits are not supported")
    backbone = getattr(lm, "base_model", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if backbone is None or backbone is lm or head is None:
        raise ValueError(f"{type(lm).__name__} is not a causal LM with a backbone and output embeddings")
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state, head


@dataclass(frozen=True)
class SelectiveLoss:
    """One micro-batch's selective loss. All fields are 0-d tensors; only loss_sum has grad.

    Tensors, not floats, so the trainer can sum them over micro-batches and all-reduce once
    without a device sync per micro-batch. The trainer divides the summed loss_sum by the
    summed n_selected of the whole optimizer step (all micro-batches and ranks): the true
    mean over trained tokens. `mean()` is that for a single micro-batch.

    loss_sum: sum of weight x token loss over the selected tokens (weight 1 in hard mode).
    n_selected: selected count, or the sum of the soft weights (which equals the count the
        hard mask would select, see `selection.select`).
    n_valid: tokens that had a target.
    n_unselected: valid tokens with zero weight (n_valid - n_selected in hard mode; in soft mode
        usually 0, since every valid token gets some weight).
    score_selected / score_unselected: mean score of the selected tokens (weighted in soft
        mode) / of the valid tokens with zero weight (NaN when there are none).
    loss_selected: mean own loss of the selected tokens (weighted in soft mode), no grad.
    weights: `[B, T]` float, the selection (1/0 in hard mode, soft weights otherwise), no grad;
        for diagnostics such as how much injected noise was selected.
    """

    loss_sum: Tensor
    n_selected: Tensor
    n_valid: Tensor
    n_unselected: Tensor
    score_selected: Tensor
    score_unselected: Tensor
    loss_selected: Tensor
    weights: Tensor

    def mean(self) -> Tensor:
        """loss_sum / n_selected; 0 when nothing was selected (n_selected is 0 or >= 1)."""
        return self.loss_sum / self.n_selected.clamp_min(1)


def _weighted_mean(x: Tensor, w: Tensor) -> Tensor:
    """sum(w x) / sum(w) over w != 0 (x may be NaN where w == 0); NaN if all weights are 0."""
    return torch.where(w != 0, x * w, 0).sum() / w.sum()


def check_on_device(ok: Tensor, message: str) -> None:
    """ValueError(message) unless `ok` (0-d bool), without a host sync: on an accelerator it is a device-side
    assert (the next synchronising call fails, as PyTorch's own index checks do); on the CPU it raises at once."""
    try:
        torch._assert_async(ok, message)
    except RuntimeError:
        raise ValueError(message) from None


def check_valid(valid: Tensor, shape: torch.Size) -> None:
    """ValueError unless `valid` is a bool `[B, T]` mask shaped like input_ids and False at position 0."""
    if valid.dtype != torch.bool or valid.shape != shape:
        raise ValueError(f"valid must be a bool tensor shaped like input_ids {tuple(shape)}")
    check_on_device(~valid[:, 0].any(), "valid is True at position 0, which has no target: build it with valid_mask()")


def selected_sum(own_grad: Tensor, chosen: Tensor) -> Tensor:
    """Sum of the selected losses of `own_grad [B, T]` (with grad), weighted in soft mode."""
    return torch.where(chosen != 0, own_grad * chosen.to(own_grad.dtype), 0).sum()


def finite_or_nan(loss_sum: Tensor, s: Tensor, valid: Tensor) -> Tensor:
    """`loss_sum`, made NaN when a score is not finite at a valid position: on the device, no host sync."""
    finite = (torch.isfinite(s) | ~valid).all()
    return loss_sum + torch.where(finite, 0.0, torch.nan).to(loss_sum.dtype)


def _select_units(s: Tensor, valid: Tensor, units: int, generator: torch.Generator | Sequence[torch.Generator] | None,
                  selection: Selection, group: dist.ProcessGroup | None, check_finite: bool) -> Tensor:
    """`selection.select` on each of `units` equal row groups with its own generator: what `units` calls would."""
    if s.shape[0] % units:
        raise ValueError(f"{s.shape[0]} rows do not split into {units} selection units")
    gens = list(generator) if isinstance(generator, Sequence) else [generator] * units
    if len(gens) != units:
        raise ValueError(f"{len(gens)} generators for {units} selection units")
    rule = selection.rule_used
    parts = [select(s_u, rule.ratio, rule.strategy, selection.scope, v_u, g, temperature=selection.temperature,
                    soft=selection.soft, threshold=rule.threshold, group=group, check_finite=check_finite)
             for s_u, v_u, g in zip(s.chunk(units), valid.chunk(units), gens, strict=True)]
    return parts[0] if units == 1 else torch.cat(parts)


@dataclass
class Batch:
    """One micro-batch as an objective sees it, inside the wrapped module's forward.

    input_ids `[B, T]`, valid `[B, T]` bool (`valid_mask`: the positions that may train), ref_loss `[B, T]` (the
    score store's rows or an online reference's; NaN allowed where not valid), the run's `Selection`, the
    selection's random draws (`generator`, one per selection unit when `units` > 1: `units` equal row groups
    each selected on their own, exactly as `units` separate forwards would), the process group of scope
    `global`, the head's chunk size, and the reference model's final hidden states `[B, T, H]` and output
    embedding when the objective needs `reference_logits`. `params`: the objective's validated config keys.
    """

    model: nn.Module
    input_ids: Tensor
    valid: Tensor
    ref_loss: Tensor | None = None
    selection: Selection = field(default_factory=Selection)
    generator: torch.Generator | Sequence[torch.Generator] | None = None
    units: int = 1
    group: dist.ProcessGroup | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    attention_mask: Tensor | None = None
    reference: tuple[Tensor, nn.Module] | None = None
    params: Any = None

    def forward(self) -> tuple[Tensor, nn.Module]:
        """The student's final hidden states `[B, T, H]` (with grad) and output embedding (`forward_hidden`)."""
        return forward_hidden(self.model, self.input_ids, self.attention_mask)

    def score(self, own: Tensor, hidden: Tensor, head: nn.Module, check_finite: bool = False) -> Tensor:
        """The selection's scores `[B, T]` from the student's own token losses `[B, T]` (no grad) and what its
        score kind needs besides: the reference's losses, the student's entropy (from `hidden` and `head`), the
        reference's (from `reference`)."""
        kind = self.selection.rule_used.score
        needs, entropy, ref_entropy = SCORE_KINDS[kind].needs, None, None
        if "student_logits" in needs:
            entropy = token_entropies(hidden, head, self.input_ids, self.valid, chunk_size=self.chunk_size)
        if "reference_logits" in needs:
            if self.reference is None:
                raise ValueError(f"score kind {kind!r} needs the reference's hidden states and head (Batch.reference)")
            ref_entropy = token_entropies(*self.reference, self.input_ids, self.valid, chunk_size=self.chunk_size)
        return scores(kind, own, self.ref_loss, entropy=entropy, ref_entropy=ref_entropy, check_finite=check_finite)

    def select(self, s: Tensor, check_finite: bool = False) -> Tensor:
        """The selection's mask (or soft weights) `[B, T]` from scores `[B, T]`, per selection unit."""
        return _select_units(s, self.valid, self.units, self.generator, self.selection, self.group, check_finite)

    def max_selected(self) -> int:
        """The most positions `select` can choose here, known on the host (`selection.max_selected`)."""
        rule = self.selection.rule_used
        return max_selected(self.input_ids.shape[0], self.input_ids.shape[1] - 1, rule.ratio, self.selection.scope,
                            units=self.units, soft=self.selection.soft, threshold=rule.threshold, group=self.group)


def token_entropies(hidden: Tensor, head: nn.Module, input_ids: Tensor, valid: Tensor | None = None, *,
                    chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """The student's next-token entropy `[B, T]` at each target position (the distribution it predicted
    `input_ids[:, t]` from, `hidden[:, t - 1]`), no grad; NaN where `token_losses` is."""
    _check_shapes(hidden, input_ids, valid, "valid")
    mask = valid if valid is not None else torch.ones_like(input_ids, dtype=torch.bool)
    rows, _ = shifted_rows(hidden.detach(), input_ids, mask)
    ent = rows_entropy(head, rows, chunk_size).view(input_ids.shape[0], -1)
    nan = torch.full((), torch.nan, dtype=ent.dtype, device=ent.device)
    return torch.cat([nan.expand(input_ids.shape[0], 1), torch.where(mask[:, 1:], ent, nan)], dim=1)


def selection_result(loss_sum: Tensor, own: Tensor, s: Tensor, chosen: Tensor, valid: Tensor) -> SelectiveLoss:
    """The `SelectiveLoss` of a micro-batch from its loss sum (with grad), own losses, scores and selection
    `[B, T]` (mask or weights): the counts and means every objective reports."""
    w = chosen.to(own.dtype)
    unselected = (valid & (w == 0)).to(own.dtype)
    return SelectiveLoss(
        loss_sum=loss_sum,
        n_selected=w.sum(),
        n_valid=valid.sum().to(own.dtype),
        n_unselected=unselected.sum(),
        score_selected=_weighted_mean(s, w),
        score_unselected=_weighted_mean(s, unselected),
        loss_selected=_weighted_mean(own, w),
        weights=w,
    )


def selective_loss_of_losses(
    losses: Tensor,
    valid: Tensor,
    ref_loss: Tensor | None = None,
    selection: Selection | None = None,
    *,
    entropy: Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    units: int = 1,
    group: dist.ProcessGroup | None = None,
    check_finite: bool = False,
) -> SelectiveLoss:
    """The selective loss from per-token losses `[B, T]` with grad (NaN where not valid, as `token_losses`
    returns them): score, select, sum the selected ones. `selective_lm_loss` without the forward pass,
    for losses computed elsewhere (full logits, another trainer's forward); a score kind that needs the
    student's logits reads `entropy [B, T]`. A score that is not finite at a valid position makes loss_sum NaN,
    or with `check_finite` raises ValueError (a host sync per call)."""
    selection = selection or Selection()
    check_valid(valid, losses.shape)
    own = losses.detach()
    s = scores(selection.rule_used.score, own, ref_loss, entropy=entropy, check_finite=check_finite)
    chosen = _select_units(s, valid, units, generator, selection, group, check_finite)
    return selection_result(finite_or_nan(selected_sum(losses, chosen), s, valid), own, s, chosen, valid)


def cross_entropy_loss(batch: Batch, params: Any = None) -> SelectiveLoss:
    """The `ce` objective (Rho-1's): forward, score, select, cross-entropy with grad on the selected tokens.

    The backbone runs once with grad. With a frozen linear head (LoRA) at ratio >= 0.5 the head runs once over
    every valid row with grad and the selected losses are summed; otherwise a no-grad pass on `hidden.detach()`
    scores, and only the selected rows go through the head with grad (see the module docstring for the cost).
    At ratio 1 (hard) every valid token is selected whatever the scores: exactly CLM.
    """
    sel, ids, valid = batch.selection, batch.input_ids, batch.valid
    check_valid(valid, ids.shape)
    hidden, head = batch.forward()
    ratio = sel.rule_used.ratio
    # A frozen linear head costs 2 matmuls per row with grad, 1 without: one grad pass over every valid
    # row (2) is cheaper than a no-grad pass plus a grad pass over the selected rows (1 + 2 x ratio)
    # from ratio 0.5 up; below it, only the selected rows get gradients.
    if (ratio == 1 and not sel.soft) or (frozen_linear(head) and (sel.soft or ratio >= 0.5)):
        own_grad = token_losses(hidden, head, ids, valid, chunk_size=batch.chunk_size)
        own = own_grad.detach()
        s = batch.score(own, hidden, head)
        chosen = batch.select(s)
        loss_sum = selected_sum(own_grad, chosen)
    else:
        with torch.no_grad():
            own = token_losses(hidden.detach(), head, ids, valid, chunk_size=batch.chunk_size)
        s = batch.score(own, hidden, head)
        chosen = batch.select(s)
        loss_sum = selected_loss_sum(hidden, head, ids, chosen, size=batch.max_selected(), chunk_size=batch.chunk_size)
    return selection_result(finite_or_nan(loss_sum, s, valid), own, s, chosen, valid)


register_objective("ce", Objective(cross_entropy_loss, doc="cross-entropy on the selected tokens (Rho-1)"),
                   method=False)


def selective_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    valid: Tensor,
    ref_loss: Tensor | None = None,
    selection: Selection | None = None,
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    units: int = 1,
    attention_mask: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> SelectiveLoss:
    """SLM loss of one micro-batch under the `ce` objective: forward, score, select, loss with grad on the
    selected tokens (`cross_entropy_loss`; `Batch` says what each argument is).

    No value is read on the host (a device sync, which on a GPU stalls the host until the queue
    drains): shapes are static (the selected rows are gathered to `selection.max_selected` rows), a
    valid mask True at position 0 is a device-side assert, and a score that is not finite at a valid
    position (a NaN reference loss, a non-finite own loss) makes loss_sum NaN rather than raising, for
    the trainer's one read per optimizer step to report (`tests/test_loss.py::test_no_host_sync`).
    """
    batch = Batch(model, input_ids, valid, ref_loss, selection or Selection(), generator, units, group, chunk_size,
                  attention_mask)
    return cross_entropy_loss(batch)


class SelectiveLM(nn.Module):
    """A causal LM whose forward returns the micro-batch's loss under the run's objective (or the token losses):
    the unit DDP and FSDP wrap.

    The step's algorithm (forward → score → select → loss) runs inside this one module forward, because the
    selective loss runs the backbone and the LM head separately (`forward_hidden`), and selection needs the
    per-token losses before the loss exists. So the engines see an ordinary forward/backward: DDP's gradient
    hooks fire, and FSDP gathers the root's parameters (embeddings, final norm, LM head) for the duration of
    the forward, so the head is never read while sharded. The output is a dict (a pytree node) so that FSDP's
    pre-backward hooks attach to its tensors.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, valid: Tensor, ref_loss: Tensor | None = None, *,
                selection: Selection | None = None, losses_only: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE,
                **batch: Any) -> dict[str, Tensor]:
        """`{"losses": [B, T]}` with `losses_only` (no grad), else the fields of the `SelectiveLoss` of the
        selection's objective on the micro-batch (`Batch` holds the other keyword arguments)."""
        if losses_only:
            with torch.no_grad():
                hidden, head = forward_hidden(self.model, input_ids)
                return {"losses": token_losses(hidden, head, input_ids, valid, chunk_size=chunk_size)}
        b = Batch(self.model, input_ids, valid, ref_loss, selection or Selection(), chunk_size=chunk_size, **batch)
        out = OBJECTIVES[b.selection.objective].loss(b, b.params)
        return {f.name: getattr(out, f.name) for f in fields(out)}  # not asdict: it deep-copies
