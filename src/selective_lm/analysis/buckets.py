"""Token-bucket transitions: which tokens went from high to low loss (and back) during training.

Every token is labelled H (high loss) or L (low loss) at a *start* and at an *end*, and the
four transitions `H->H`, `H->L`, `L->H`, `L->L` are counted. Two ways of choosing start and
end, both returning a `Buckets`:

- `quantile_buckets` (the cs512 replication's): start = the baseline model's loss, end = the
  run's loss, on the same validation tokens; one threshold for both, the baseline's
  `quantile` quantile.
- `trajectory_buckets` (Rho-1's Fig. 2): start and end = the ends of a least-squares line
  fitted to each token's loss over the run's checkpoints, so one noisy snapshot does not
  decide a token's bucket.

Shared rules: a token is **H iff its loss is strictly greater than the threshold** (a tie is L,
so at `quantile=0.7` at most 30 % of tokens start H); tokens that are masked out or whose
loss is NaN/inf anywhere (e.g. the first position of a block, which has nothing to predict
from) are left out of the threshold and of the counts. Quantiles use numpy's default
(linear interpolation). Inputs are numpy arrays (memmaps welcome) or CPU/GPU tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

__all__ = ["BUCKETS", "Buckets", "quantile_buckets", "trajectory_buckets"]

BUCKETS = ("H->H", "H->L", "L->H", "L->L")
# Tokens per matmul in `trajectory_buckets`: bounds the float64 copy at ~2M × n_checkpoints × 8 bytes.
_CHUNK = 1 << 21

ArrayLike = npt.ArrayLike | torch.Tensor


@dataclass(frozen=True)
class Buckets:
    """The result of a bucket analysis.

    fractions: exactly the keys of `BUCKETS`, summing to 1 (what results.json stores);
    counts: tokens per transition; threshold: the H/L threshold in nats;
    n_tokens: valid tokens counted (the sum of `counts`).
    """

    fractions: dict[str, float]
    counts: dict[str, int]
    threshold: float
    n_tokens: int


def _numpy(x: ArrayLike) -> np.ndarray:
    """A numpy view of `x` (no copy for arrays and memmaps); tensors are copied to CPU float64."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x)


def _valid_mask(valid: ArrayLike | None, shape: tuple[int, ...]) -> np.ndarray:
    if valid is None:
        return np.ones(shape, dtype=bool)
    mask = _numpy(valid).astype(bool, copy=False)
    if mask.shape != shape:
        raise ValueError(f"valid has shape {mask.shape}, expected {shape}")
    return mask


def _check_quantile(quantile: float) -> None:
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")


def _classify(start: np.ndarray, end: np.ndarray, threshold: float) -> Buckets:
    """Count transitions of 1-D `start`/`end` losses (valid tokens only) across `threshold`."""
    # code = 2·[start is H] + [end is H]: 0 = L->L, 1 = L->H, 2 = H->L, 3 = H->H.
    code = 2 * (start > threshold).astype(np.int64) + (end > threshold)
    n_ll, n_lh, n_hl, n_hh = (int(c) for c in np.bincount(code, minlength=4))
    counts = {"H->H": n_hh, "H->L": n_hl, "L->H": n_lh, "L->L": n_ll}
    n = int(start.size)
    return Buckets({k: c / n for k, c in counts.items()}, counts, float(threshold), n)


def quantile_buckets(
    base_loss: ArrayLike,
    run_loss: ArrayLike,
    valid: ArrayLike | None = None,
    quantile: float = 0.7,
) -> Buckets:
    """Transitions from the baseline's per-token loss to a run's, on the same tokens.

    base_loss, run_loss: per-token losses, any shape, the same for both (e.g. `[n_blocks,
    block_len]` from `slm eval`); valid: optional bool mask of that shape. Threshold = the
    `quantile` quantile of `base_loss` over the valid tokens (valid = mask True and both losses
    finite); H iff loss > threshold, for the baseline and the run alike.
    """
    _check_quantile(quantile)
    base, run = _numpy(base_loss), _numpy(run_loss)
    if base.shape != run.shape:
        raise ValueError(f"base_loss {base.shape} and run_loss {run.shape} differ in shape")
    keep = _valid_mask(valid, base.shape) & np.isfinite(base) & np.isfinite(run)
    if not keep.any():
        raise ValueError("no valid tokens (all masked out or NaN)")
    start = base[keep].astype(np.float64)
    return _classify(start, run[keep].astype(np.float64), float(np.quantile(start, quantile)))


def trajectory_buckets(
    losses: ArrayLike,
    steps: ArrayLike,
    valid: ArrayLike | None = None,
    threshold: float | None = None,
    quantile: float = 0.7,
) -> Buckets:
    """Transitions of each token's fitted loss line over the run's checkpoints (Rho-1 Fig. 2).

    losses: `[n_checkpoints, *token_shape]` (e.g. `[C, n_tokens]` or `[C, n_blocks,
    block_len]`), the run's loss of the same tokens at each checkpoint; steps: `[n_checkpoints]`
    optimizer steps, strictly increasing, n_checkpoints >= 2; valid: optional bool mask of
    `token_shape`.

    Rule: per token, fit `loss ≈ a + b·step` by least squares over all checkpoints; start =
    the line at `steps[0]`, end = the line at `steps[-1]`. H iff value > threshold, where
    `threshold` is a fixed loss in nats if given (the paper labels by absolute loss), else the
    `quantile` quantile of the valid tokens' start values (the same convention as
    `quantile_buckets`, with the run's first checkpoint in the baseline's place). Tokens
    masked out or non-finite at any checkpoint are left out.
    """
    if threshold is None:
        _check_quantile(quantile)
    y = _numpy(losses)
    s = _numpy(steps).astype(np.float64)
    if y.ndim < 2 or y.shape[0] < 2:
        raise ValueError(f"need >= 2 checkpoints as losses[n_checkpoints, ...], got shape {y.shape}")
    if s.shape != (y.shape[0],):
        raise ValueError(f"steps has shape {s.shape}, expected ({y.shape[0]},)")
    if not np.all(np.diff(s) > 0):
        raise ValueError(f"steps must be strictly increasing, got {s.tolist()}")
    token_shape = tuple(y.shape[1:])
    y = y.reshape(y.shape[0], -1)

    # The fitted value at any step is linear in the losses: line(x) = Σ_c w_c(x)·y_c with
    # w_c(x) = 1/C + (x - mean(s))(s_c - mean(s)) / Σ(s - mean(s))², so start and end for all
    # tokens are one [2, C] @ [C, n] product. Non-finite losses propagate to NaN, marking the token.
    sc = s - s.mean()
    ends = np.array([s[0], s[-1]]) - s.mean()
    weights = 1.0 / len(s) + ends[:, None] * sc[None, :] / (sc @ sc)
    fitted = np.empty((2, y.shape[1]))
    for lo in range(0, y.shape[1], _CHUNK):
        fitted[:, lo:lo + _CHUNK] = weights @ np.asarray(y[:, lo:lo + _CHUNK], dtype=np.float64)

    keep = _valid_mask(valid, token_shape).reshape(-1) & np.isfinite(fitted).all(0)
    if not keep.any():
        raise ValueError("no valid tokens (all masked out or NaN)")
    start, end = fitted[0, keep], fitted[1, keep]
    if threshold is None:
        threshold = float(np.quantile(start, quantile))
    return _classify(start, end, threshold)
