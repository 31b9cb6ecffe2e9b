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

__all__ = ["doc_sums", "paired_delta", "ratio_of_shares"]


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
