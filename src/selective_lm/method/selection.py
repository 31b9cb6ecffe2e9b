"""Token selection for SLM: the built-in score kinds (what the step knows of a token -> a score) and
strategies (scores and a validity mask -> a mask or weights), registered in `registry.py`.

Pure tensor functions: no model calls, no files, no logging. Every tensor is `[B, T]`; position
`t` stands for the target token `t` (see `loss.py` for the next-token shift).

Adding a strategy is one `register_strategy` call (and its key function), here or in a plugin: the config's
choices (`train.method`, `grid.methods`) are read from the registry, as `train.score` is from `SCORE_KINDS`.

Rules shared by every strategy and scope:

- **Count.** `k = floor(ratio * n_valid + 0.5)` (round half up, not Python's half-to-even, so
  0.5 of 5 tokens is 3), then at least 1 when `n_valid >= 1`: a micro-batch with a few valid
  tokens still trains on something and the trainer never divides by zero. `ratio = 1.0`
  selects every valid token, so SLM at ratio 1 is exactly CLM. See `num_selected`.
  With a `threshold` instead (rules `positive` and `threshold`), `k` is the number of valid
  tokens whose score exceeds it, possibly 0: `topk` then selects exactly those tokens, and
  `random` or `stochastic` as many tokens by their own keys (a control matched in count).
- **Order.** Tokens are ranked by the strategy's keys, highest first; ties go to the earlier
  position (row-major), so `topk` is deterministic. Invalid positions are never selected.
- **Randomness.** One noise value is drawn per *valid* token, in row-major order, from
  `generator`. Inserting invalid (padding) columns therefore changes nothing, and a run is
  reproducible from the generator's seed.
- **Scopes.** `batch`: one ranking over all valid tokens of the micro-batch. `sequence`: one
  per row, `k` from that row's valid count. `global`: the micro-batches of all ranks of the
  process group are gathered (padded to a common width), one `batch` selection is made over
  their concatenation in rank order, and each rank keeps its rows: identical to one process
  on the concatenated batch. The noise is drawn on the gathered tensor, so `generator` must
  be seeded identically on all ranks (every rank then draws the same numbers and the
  generators stay in step). Without an initialised process group, `global` is `batch`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from .registry import (
    SCORE_KINDS,
    STRATEGIES,
    Noise,
    ScoreKind,
    Strategy,
    TokenView,
    lookup,
    register_score,
    register_strategy,
)

__all__ = ["SCOPES", "max_selected", "num_selected", "scores", "select", "trainable_mask"]

# --------------------------------------------------------------------------- score kinds

# Higher = train it.
register_score("excess", ScoreKind(lambda v: v.loss - v.ref_loss, frozenset({"reference_loss"}),
                                   "Rho-1: what the model still has to learn (own - reference loss)"))
register_score("retrospective", ScoreKind(
    lambda v: v.ref_loss - v.loss, frozenset({"reference_loss"}),
    "ssToken's retrospective excess loss (reference - own): what the model has learned since its reference (a "
    "history model: reference.mode ema or checkpoint, or the base model with reference.mode self)"))
register_score("loss", ScoreKind(lambda v: v.loss, doc="hardest tokens by the model's own loss"))
register_score("reference", ScoreKind(lambda v: -v.ref_loss, frozenset({"reference_loss"}),
                                      "tokens the reference finds easy"))
register_score("none", ScoreKind(lambda v: torch.zeros_like(v.loss),
                                 doc="no preference: pair with random/stochastic"))


def scores(kind: str, own_loss: Tensor, ref_loss: Tensor | None = None, *, entropy: Tensor | None = None,
           ref_entropy: Tensor | None = None, check_finite: bool = True) -> Tensor:
    """Selection scores `[B, T]` (higher = train it) from own losses `[B, T]` and what the kind needs besides:
    reference losses, the student's entropy, the reference's (`TokenView`).

    Valid positions are those where own_loss is not NaN (as `token_losses` returns it); ref_loss
    must be finite there. With `none` all scores are 0: strategies `random` and `stochastic`
    then select uniformly, `topk` would take the earliest positions (ties go by position).
    `check_finite=False` skips the NaN check of ref_loss, which reads a value on the host (a device
    sync): the loss path checks its scores on the device instead (`loss.selective_lm_loss`).
    """
    entry = lookup("score kind", kind, SCORE_KINDS)
    own = own_loss.detach()
    ref = None
    if "reference_loss" in entry.needs:
        if ref_loss is None:
            raise ValueError(f"score kind {kind!r} needs reference losses (ref_loss)")
        if ref_loss.shape != own.shape:
            raise ValueError(
                f"ref_loss {tuple(ref_loss.shape)} must have the shape of own_loss {tuple(own.shape)}"
            )
        ref = ref_loss.detach().to(device=own.device, dtype=own.dtype)
        if check_finite and (torch.isnan(ref) & ~torch.isnan(own)).any():
            raise ValueError("ref_loss is NaN at a valid position: the scores are partial (scoring.blocks=used scores "
                             "only the blocks a grid reads) or were made for other tokens")
    if "student_logits" in entry.needs and entropy is None:
        raise ValueError(f"score kind {kind!r} needs the student's entropy (entropy)")
    if "reference_logits" in entry.needs and ref_entropy is None:
        raise ValueError(f"score kind {kind!r} needs the reference's entropy (ref_entropy)")
    return entry.fn(TokenView(own, ref, None if entropy is None else entropy.detach(),
                              None if ref_entropy is None else ref_entropy.detach()))


def trainable_mask(valid: Tensor, noise: Tensor | None, oracle: bool) -> Tensor:
    """The positions a run may train on: `valid`, minus the injected noise for the oracle `[B, T]`."""
    if not oracle:
        return valid
    if noise is None:
        raise ValueError("the oracle needs a noise mask")
    return valid & ~noise


# --------------------------------------------------------------------------- strategies


def _positive_log(scores: Tensor) -> Tensor:
    """log of the positive part: -inf where the score is <= 0."""
    return torch.where(scores > 0, scores.clamp_min(torch.finfo(scores.dtype).tiny).log(), -torch.inf)


def _stochastic_positive_keys(scores: Tensor, noise: Noise, temperature: float) -> tuple[Tensor, ...]:
    # Sampling without replacement with probability ∝ max(score, 0) is Gumbel-top-k on
    # log(score). Tokens with score <= 0 have probability zero, so when fewer than k are
    # positive all positive ones are taken (first key) and the rest is filled uniformly at
    # random among the others (second key: the bare noise, i.e. a random permutation).
    g = noise()
    positive = scores > 0
    return positive.to(scores.dtype), torch.where(positive, _positive_log(scores) + g, g)


def _bottomk_keys(scores: Tensor, noise: Noise, temperature: float) -> tuple[Tensor, ...]:
    # Lowest scores first, ties to the *later* position: exactly topk's order reversed, so that bottom-k at
    # ratio 0.5 is the complement of top-k wherever a unit has an even number of valid tokens.
    position = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    return -scores, position


# Highest scores; soft: softmax(score / T).
register_strategy("topk", Strategy(lambda s, noise, temp: (s,), lambda s, temp: s / temp), method=False)
# Lowest scores (the sign check: if the score carries signal, training on these must lose to random);
# soft: softmax(-score / T).
register_strategy("bottomk", Strategy(_bottomk_keys, lambda s, temp: -s / temp), method=False)
# Uniform without replacement; soft: equal weights.
register_strategy("random", Strategy(lambda s, noise, temp: (noise(),), lambda s, temp: torch.zeros_like(s),
                                     uses_scores=False), method=False)
# k draws without replacement, probability ∝ softmax(score / T) (Gumbel-top-k).
register_strategy("stochastic", Strategy(lambda s, noise, temp: (s / temp + noise(),), lambda s, temp: s / temp),
                  method=False)
# The cs512 replication's variant: probability ∝ positive part of the score (excess loss),
# temperature unused; soft: weights ∝ max(score, 0), uniform when no score is positive.
register_strategy("stochastic_positive", Strategy(_stochastic_positive_keys, lambda s, temp: _positive_log(s)),
                  method=False)
SCOPES = ("batch", "sequence", "global")


def max_selected(rows: int, width: int, ratio: float, scope: str, *, units: int = 1, soft: bool = False,
                 threshold: float | None = None, group: dist.ProcessGroup | None = None) -> int:
    """The most positions `select` can choose (nonzero weights) in `rows` rows of `width` positions, whatever
    `valid` is: known on the host, so a gather of that many rows needs no host sync. `units`: equal row groups
    selected on their own (`loss.selective_lm_loss`). `num_selected` grows with the valid count, so its value for
    every position valid bounds it; soft weights, a threshold or the `global` scope of several processes (this
    rank's share of the gathered selection) can choose every position.
    """
    if soft or threshold is not None or (scope == "global" and dist.is_available() and dist.is_initialized()):
        return rows * width
    if scope == "sequence":
        return rows * _num_selected(width, ratio)
    return units * _num_selected(rows // units * width, ratio)


def _num_selected(n: int, ratio: float) -> int:
    """`num_selected` of a count on the host (the same float64 arithmetic)."""
    return min(max(math.floor(n * ratio + 0.5), int(n > 0)), n)


def num_selected(n_valid: Tensor, ratio: float) -> Tensor:
    """Tokens selected out of `n_valid` (int tensor, any shape): floor(ratio * n + 0.5), >= 1 if n >= 1.

    The trainer can use it to know a micro-batch's selected count before the forward pass.
    """
    n = n_valid.long()
    k = torch.floor(n.double() * ratio + 0.5).long()
    return torch.minimum(torch.maximum(k, (n > 0).long()), n)


def _check(
    scores: Tensor, ratio: float, strategy: str, scope: str, valid: Tensor, temperature: float,
    threshold: float | None, soft: bool, check_finite: bool
) -> None:
    if not 0.0 < ratio <= 1.0:  # also rejects NaN
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if not 0.0 < temperature < float("inf"):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    lookup("selection strategy", strategy, STRATEGIES)
    lookup("selection scope", scope, dict.fromkeys(SCOPES))
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got {valid.dtype}")
    if scores.dim() != 2 or scores.shape != valid.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and valid {tuple(valid.shape)} must both be [B, T]")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a float tensor, got {scores.dtype}")
    if check_finite and (strategy != "random" or threshold is not None) and not (torch.isfinite(scores) | ~valid).all():
        raise ValueError("scores must be finite at valid positions (NaN/inf found)")
    if threshold is not None and (soft or not math.isfinite(threshold)):
        raise ValueError(f"a threshold ({threshold}) must be finite and selects hard masks (soft=False)")


def _gumbel(valid: Tensor, dtype: torch.dtype, generator: torch.Generator | None) -> Tensor:
    """Gumbel(0, 1) noise `[B, T]`: the i-th valid token in row-major order gets the i-th draw, 0 elsewhere.

    B x T draws are made, not one per valid token, so that no count is read on the host; the valid
    tokens get the first ones. A CPU generator's (the trainer's) draws do not depend on how many are
    made, so the noise is that of one draw per valid token and padding changes nothing.
    """
    flat = valid.flatten()
    device = generator.device if generator is not None else valid.device
    u = torch.rand(flat.numel(), generator=generator, device=device, dtype=torch.float64)
    if u.device != valid.device:  # pinned, so that the copy does not wait for the device's queue to drain
        u = (u.pin_memory() if valid.device.type == "cuda" else u).to(valid.device, non_blocking=True)
    g = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
    slot = (flat.cumsum(0) - 1).clamp_min(0)  # the valid token's place among the valid ones
    return torch.where(flat, g[slot], 0.0).to(dtype).view(valid.shape)


def _rank(keys: tuple[Tensor, ...], valid: Tensor) -> Tensor:
    """Rank of each position in its row `[R, T]` (0 = best): valid first, then keys, then position.

    Lexicographic order by stable sorts from the least significant key up; the initial
    arange makes the earlier position win every remaining tie.
    """
    rows, width = valid.shape
    order = torch.arange(width, device=valid.device).expand(rows, width)
    for key in reversed((valid.to(keys[0].dtype), *keys)):
        key = torch.where(valid, key, torch.zeros((), dtype=key.dtype, device=key.device))
        idx = torch.sort(key.gather(1, order), dim=1, descending=True, stable=True).indices
        order = order.gather(1, idx)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(width, device=valid.device).expand(rows, width))
    return ranks


def _select_rows(
    scores: Tensor,
    valid: Tensor,
    ratio: float,
    strategy: Strategy,
    generator: torch.Generator | None,
    temperature: float,
    soft: bool,
    threshold: float | None = None,
) -> Tensor:
    """Select within each row of `[R, W]` independently; the noise covers all rows at once."""
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # no extra ties from fp16 noise
    if threshold is None:
        k = num_selected(valid.sum(dim=1), ratio)
    else:
        k = (valid & (scores > threshold)).sum(dim=1)
    if soft:
        logw = torch.where(valid, strategy.log_weights(scores, temperature), -torch.inf)
        # A row whose weights are all zero (stochastic_positive with no positive score) is uniform.
        dead = torch.isneginf(logw.amax(dim=1, keepdim=True))
        logw = torch.where(dead & valid, 0.0, logw)
        w = torch.softmax(logw, dim=1).nan_to_num(0.0)  # rows without valid tokens: all -inf -> 0
        return w * k.unsqueeze(1).to(w.dtype)
    keys = strategy.keys(scores, lambda: _gumbel(valid, scores.dtype, generator), temperature)
    return _rank(keys, valid) < k.unsqueeze(1)


def _gather_rows(x: Tensor, group: dist.ProcessGroup | None) -> tuple[Tensor, int]:
    """All ranks' `[B_r, T_r]` tensors as one `[sum B_r, max T_r]` (zero-padded), and this rank's offset."""
    world = dist.get_world_size(group)
    shape = torch.tensor(x.shape, dtype=torch.long, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    sizes = [tuple(int(v) for v in s) for s in shapes]
    max_b, max_t = max(b for b, _ in sizes), max(t for _, t in sizes)
    padded = x.new_zeros(max_b, max_t)
    padded[: x.shape[0], : x.shape[1]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    rank = dist.get_rank(group)
    offset = sum(b for b, _ in sizes[:rank])
    return torch.cat([p[:b] for p, (b, _) in zip(parts, sizes, strict=True)]), offset


def select(
    scores: Tensor,
    ratio: float,
    strategy: str,
    scope: str,
    valid: Tensor,
    generator: torch.Generator | None = None,
    *,
    temperature: float = 1.0,
    soft: bool = False,
    threshold: float | None = None,
    group: dist.ProcessGroup | None = None,
    check_finite: bool = True,
) -> Tensor:
    """Choose the tokens that train.

    scores `[B, T]` float (higher = more worth training; ignored where `valid` is False, may be
    NaN there), valid `[B, T]` bool. Returns a bool mask `[B, T]` with exactly `num_selected`
    True per scope unit, all inside `valid`.

    soft=True returns float weights `[B, T]` instead: `k * softmax(log_weights)` over the valid
    tokens of each scope unit (the strategy's `log_weights`: score / temperature for
    topk/stochastic, uniform for random, log of the positive part for stochastic_positive),
    zero outside `valid`. The weights of a unit sum to the `k` its hard mask would select, so
    the trainer's "sum of weight x loss, divided by the summed weights (n_selected)" is a
    weighted mean that is comparable with the hard mode's plain mean.

    `threshold` replaces the ratio's count by the number of valid tokens of each scope unit whose
    score exceeds it (module docstring); it needs finite scores and hard selection. `check_finite=False`
    skips the check that the scores are finite at valid positions, which reads a value on the host (a
    device sync): the loss path checks them on the device instead (`loss.selective_lm_loss`).
    """
    _check(scores, ratio, strategy, scope, valid, temperature, threshold, soft, check_finite)
    strat = STRATEGIES[strategy]
    if scope == "sequence":
        return _select_rows(scores, valid, ratio, strat, generator, temperature, soft, threshold)
    if scope == "global" and dist.is_available() and dist.is_initialized():
        all_scores, offset = _gather_rows(scores.nan_to_num(0.0), group)
        all_valid, _ = _gather_rows(valid.to(torch.uint8), group)
        chosen = select(
            all_scores,
            ratio,
            strategy,
            "batch",
            all_valid.bool(),
            generator,
            temperature=temperature,
            soft=soft,
            threshold=threshold,
            check_finite=False,  # checked above
        )
        return chosen[offset : offset + scores.shape[0], : scores.shape[1]].contiguous()
    # batch (and global without a process group): all rows as one row-major sequence.
    flat = _select_rows(
        scores.reshape(1, -1), valid.reshape(1, -1), ratio, strat, generator, temperature, soft, threshold
    )
    return flat.reshape(scores.shape)
