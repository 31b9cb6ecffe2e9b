"""Uncertainty of a perplexity comparison: a paired bootstrap over validation documents. Pure numpy.

Two models evaluated on the same tokens differ by Δ = exp(mean loss_run − mean loss_base) − 1
(the relative perplexity change). Tokens of one document are not independent, so the document is
the unit that is resampled: each bootstrap replicate draws documents with replacement and
recomputes Δ from the drawn documents' summed losses and token counts, for both models at once
(paired). The interval is the percentile interval of the replicates.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["doc_sums", "first_reach", "paired_delta", "ratio_of_shares", "tokens_to_reach"]


def doc_sums(losses: npt.ArrayLike, doc_ids: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(document ids, summed loss, token count) per document over the finite entries of `losses`.

    losses, doc_ids: the same shape (e.g. `[n_blocks, block_len]` of one evaluation); NaN = no target.
    """
    loss, docs = np.asarray(losses, dtype=np.float64), np.asarray(doc_ids)
    if loss.shape != docs.shape:
        raise ValueError(f"losses {loss.shape} and doc_ids {docs.shape} differ in shape")
    keep = np.isfinite(loss)
    ids, inverse = np.unique(docs[keep], return_inverse=True)
    return ids, np.bincount(inverse, weights=loss[keep], minlength=len(ids)), np.bincount(inverse, minlength=len(ids))


def paired_delta(run_nats: npt.ArrayLike, base_nats: npt.ArrayLike, counts: npt.ArrayLike, *,
                 n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Relative perplexity change of a run vs a baseline in %, with a paired bootstrap interval.

    run_nats, base_nats, counts: `[D]` per document (summed losses of each model, tokens) on the same
    tokens. Returns {"pct", "lo", "hi"}: the point estimate on all documents and the `level`
    percentile interval over `n_boot` replicates (seeded, so reruns give the same interval).
    """
    run, base, n = (np.asarray(x, dtype=np.float64) for x in (run_nats, base_nats, counts))
    if not run.shape == base.shape == n.shape or run.ndim != 1 or run.size == 0:
        raise ValueError(f"need three equal 1-D arrays with at least one document, got {run.shape}, "
                         f"{base.shape}, {n.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    pct = 100.0 * math.expm1((run.sum() - base.sum()) / n.sum())
    weights = np.random.default_rng(seed).multinomial(run.size, np.full(run.size, 1.0 / run.size), size=n_boot)
    reps = 100.0 * np.expm1((weights @ run - weights @ base) / np.maximum(weights @ n, 1))
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return {"pct": float(pct), "lo": float(lo), "hi": float(hi)}


def ratio_of_shares(num_a: npt.ArrayLike, den_a: npt.ArrayLike, num_b: npt.ArrayLike, den_b: npt.ArrayLike, *,
                    n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, float] | None:
    """(Σ num_a / Σ den_a) / (Σ num_b / Σ den_b) with a paired bootstrap interval over units.

    Each argument `[U]` per unit (a document, an optimizer step): e.g. the trained and the total tokens of
    one kind (a) and of another (b) in that unit. A replicate draws units with replacement for a and b at
    once (paired); replicates where a share is undefined are left out. Returns {"ratio", "lo", "hi",
    "units"} (units: those with a or b tokens), or None when either share is undefined on all units.
    """
    na, da, nb, db = (np.asarray(x, dtype=np.float64) for x in (num_a, den_a, num_b, den_b))
    if not na.shape == da.shape == nb.shape == db.shape or na.ndim != 1:
        raise ValueError(f"need four equal 1-D arrays, got {na.shape}, {da.shape}, {nb.shape}, {db.shape}")
    keep = (da > 0) | (db > 0)
    na, da, nb, db = na[keep], da[keep], nb[keep], db[keep]
    if not da.sum() or not db.sum() or not nb.sum():
        return None
    point = (na.sum() / da.sum()) / (nb.sum() / db.sum())
    weights = np.random.default_rng(seed).multinomial(na.size, np.full(na.size, 1.0 / na.size), size=n_boot)
    with np.errstate(divide="ignore", invalid="ignore"):
        reps = (weights @ na / (weights @ da)) / (weights @ nb / (weights @ db))
    reps = reps[np.isfinite(reps)]
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2]) if reps.size else (np.nan, np.nan)
    return {"ratio": float(point), "lo": float(lo), "hi": float(hi), "units": int(na.size)}


def first_reach(tokens: npt.ArrayLike, losses: npt.ArrayLike, target: npt.ArrayLike) -> np.ndarray:
    """Tokens at which each curve first reaches its target loss, linear between points; NaN = never.

    tokens `[P]` (the curve's points), losses `[P, R]` (R curves on those points), target `[R]`.
    """
    x, y = np.asarray(tokens, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    goal = np.asarray(target, dtype=np.float64)
    below = y <= goal
    first = below.argmax(axis=0)
    prev = np.maximum(first - 1, 0)
    cols = np.arange(y.shape[1])
    y0, y1 = y[prev, cols], y[first, cols]
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where((first == 0) | (y0 == y1), 1.0, (y0 - goal) / (y0 - y1))
    reached = x[prev] + (x[first] - x[prev]) * frac
    return np.where(below.any(axis=0), reached, np.nan)


def tokens_to_reach(tokens: npt.ArrayLike, run_nats: npt.ArrayLike, target_nats: npt.ArrayLike,
                    counts: npt.ArrayLike, *, n_boot: int = 2000, level: float = 0.95,
                    seed: int = 0) -> dict[str, float | None]:
    """Training tokens a learning curve needs to reach a target loss, with a bootstrap interval over documents.

    tokens `[P]`: the curve's points; run_nats `[P, D]`: each document's summed loss at each point;
    target_nats `[D]`: each document's summed loss of the target (a baseline's final point); counts `[D]`:
    tokens per document, the same for both. A replicate draws documents with replacement for the curve and
    the target at once (paired). Returns {"tokens", "lo", "hi", "never"}: the point estimate on all
    documents, the `level` percentile interval of the replicates and the share of replicates that never
    reach the target; None stands for "never" (a bound past the curve's end).
    """
    x, run, goal, n = (np.asarray(a, dtype=np.float64) for a in (tokens, run_nats, target_nats, counts))
    if run.ndim != 2 or run.shape != (x.size, n.size) or goal.shape != n.shape or n.size == 0:
        raise ValueError(f"need tokens [P], run_nats [P, D], target_nats [D], counts [D]; got {x.shape}, "
                         f"{run.shape}, {goal.shape}, {n.shape}")
    weights = np.vstack([np.ones(n.size), np.random.default_rng(seed).multinomial(
        n.size, np.full(n.size, 1.0 / n.size), size=n_boot)])
    tokens_per = np.maximum(weights @ n, 1)
    reach = first_reach(x, (run @ weights.T) / tokens_per, (weights @ goal) / tokens_per)
    point, reps = reach[0], np.sort(np.where(np.isnan(reach[1:]), np.inf, reach[1:]))
    lo, hi = (reps[int(q * (n_boot - 1))] for q in ((1 - level) / 2, (1 + level) / 2))

    def finite(v: float) -> float | None:
        return float(v) if np.isfinite(v) else None

    return {"tokens": finite(point), "lo": finite(lo), "hi": finite(hi), "never": float(np.isinf(reps).mean())}
