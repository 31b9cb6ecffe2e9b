"""Token buckets: hand-made cases with known answers, invariants, and a naive polyfit reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selective_lm.analysis.buckets import BUCKETS, quantile_buckets, trajectory_buckets

# 10 tokens; baseline losses 1..10, so the 0.7 quantile (linear) is 7.3: tokens 8, 9, 10 are H.
BASE = np.arange(1.0, 11.0)


def test_quantile_known_answer() -> None:
    run = BASE.copy()
    run[[7, 8]] = 0.5  # 2 H->L
    run[[0, 1, 2]] = 20.0  # 3 L->H; token 10 stays H, 4..7 stay L
    out = quantile_buckets(BASE, run)
    assert out.threshold == pytest.approx(7.3)
    assert out.counts == {"H->H": 1, "H->L": 2, "L->H": 3, "L->L": 4}
    assert out.fractions == pytest.approx({"H->H": 0.1, "H->L": 0.2, "L->H": 0.3, "L->L": 0.4})
    assert list(out.fractions) == list(BUCKETS) and out.n_tokens == 10


def test_quantile_tie_at_threshold_is_low() -> None:
    base = np.array([1.0, 2.0, 3.0])  # median = 2.0 exactly
    out = quantile_buckets(base, base, quantile=0.5)
    assert out.threshold == 2.0 and out.counts["L->L"] == 2 and out.counts["H->H"] == 1


def test_quantile_ignores_nan_and_mask() -> None:
    run = BASE.copy()
    run[[7, 8]] = 0.5
    run[[0, 1, 2]] = 20.0
    ref = quantile_buckets(BASE, run)
    # Extra tokens that are NaN in the base, NaN in the run, or masked out change nothing.
    base_x = np.concatenate([BASE, [np.nan, 100.0, 100.0]])
    run_x = np.concatenate([run, [1.0, np.nan, 1.0]])
    valid = np.array([True] * 12 + [False])
    out = quantile_buckets(base_x.reshape(1, 13), run_x.reshape(1, 13), valid.reshape(1, 13))
    assert out == ref


def test_quantile_accepts_tensors_and_2d() -> None:
    run = BASE[::-1].copy()
    ref = quantile_buckets(BASE, run)
    out = quantile_buckets(torch.tensor(BASE, dtype=torch.bfloat16).reshape(2, 5),
                           torch.tensor(run).reshape(2, 5))
    assert out.counts == ref.counts


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 0.95))
def test_quantile_sum_to_one_and_order_invariant(seed: int, quantile: float) -> None:
    rng = np.random.default_rng(seed)
    base, run = rng.gamma(2.0, size=(2, 200))
    base[rng.random(200) < 0.1] = np.nan
    out = quantile_buckets(base, run, quantile=quantile)
    assert sum(out.fractions.values()) == pytest.approx(1.0)
    assert sum(out.counts.values()) == out.n_tokens == int(np.isfinite(base).sum())
    # Linear interpolation: at most the tokens above position quantile·(n−1) start H.
    assert out.counts["H->H"] + out.counts["H->L"] <= (1 - quantile) * (out.n_tokens - 1) + 1
    perm = rng.permutation(200)
    assert quantile_buckets(base[perm], run[perm], quantile=quantile) == out


def test_quantile_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        quantile_buckets(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="no valid"):
        quantile_buckets(np.full(3, np.nan), np.ones(3))
    with pytest.raises(ValueError, match="quantile"):
        quantile_buckets(np.ones(3), np.ones(3), quantile=1.0)
    with pytest.raises(ValueError, match="valid"):
        quantile_buckets(np.ones(3), np.ones(3), valid=np.ones(4, bool))


STEPS = np.array([0.0, 10.0, 20.0, 40.0])  # uneven spacing on purpose


def _linear(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """[C, N] losses exactly on the line from `start` (step 0) to `end` (step 40)."""
    return start + (end - start) * (STEPS[:, None] / STEPS[-1])


def test_trajectory_exact_lines_fixed_threshold() -> None:
    start = np.array([5, 5, 5, 1, 1, 5, 1, 1, 1, 1.0])
    end = np.array([5, 1, 1, 5, 1, 1, 1, 1, 1, 1.0])
    out = trajectory_buckets(_linear(start, end), STEPS, threshold=3.0)
    assert out.counts == {"H->H": 1, "H->L": 3, "L->H": 1, "L->L": 5}
    assert out.threshold == 3.0


def test_trajectory_quantile_threshold_is_of_start_values() -> None:
    start = np.arange(1.0, 11.0)
    end = start[::-1].copy()
    out = trajectory_buckets(_linear(start, end), STEPS)
    assert out.threshold == pytest.approx(7.3)  # quantile of the fitted starts, not of the ends
    # starts 8, 9, 10 are H and end at 3, 2, 1; starts 1, 2, 3 end at 10, 9, 8.
    assert out.counts == {"H->H": 0, "H->L": 3, "L->H": 3, "L->L": 4}


def test_trajectory_uses_the_fit_not_the_endpoints() -> None:
    # Endpoints say L->L (1 and 1) but the least-squares line through all points is flat at 7/3.
    out = trajectory_buckets(np.array([[1.0], [5.0], [1.0]]), [0, 1, 2], threshold=2.0)
    assert out.counts["H->H"] == 1


def test_trajectory_matches_polyfit() -> None:
    rng = np.random.default_rng(0)
    losses = rng.gamma(2.0, size=(5, 1000)).astype(np.float32)
    steps = np.array([0, 3, 7, 8, 20])
    slope, intercept = np.polyfit(steps, losses.astype(np.float64), 1)
    start, end = intercept + slope * steps[0], intercept + slope * steps[-1]
    thr = np.quantile(start, 0.6)
    out = trajectory_buckets(losses, steps, quantile=0.6)
    assert out.threshold == pytest.approx(thr)
    want = {"H->H": (start > thr) & (end > thr), "H->L": (start > thr) & (end <= thr),
            "L->H": (start <= thr) & (end > thr), "L->L": (start <= thr) & (end <= thr)}
    assert out.counts == {k: int(v.sum()) for k, v in want.items()}


def test_trajectory_nan_mask_order_and_shape() -> None:
    rng = np.random.default_rng(1)
    losses = rng.gamma(2.0, size=(3, 4, 50))
    ref = trajectory_buckets(losses, [1, 2, 3])
    perm = rng.permutation(200)
    flat = losses.reshape(3, 200)
    assert trajectory_buckets(flat[:, perm], [1, 2, 3]) == ref
    extra = rng.gamma(2.0, size=(3, 3))
    extra[1, 0] = np.nan  # NaN at one checkpoint drops the token
    extra[0, 1] = np.inf
    valid = np.array([True] * 202 + [False])  # and the last extra token is masked out
    assert trajectory_buckets(np.concatenate([flat, extra], 1), [1, 2, 3], valid=valid) == ref
    assert sum(ref.fractions.values()) == pytest.approx(1.0)


def test_trajectory_errors() -> None:
    with pytest.raises(ValueError, match=">= 2 checkpoints"):
        trajectory_buckets(np.ones((1, 5)), [0])
    with pytest.raises(ValueError, match="increasing"):
        trajectory_buckets(np.ones((2, 5)), [3, 3])
    with pytest.raises(ValueError, match="steps has shape"):
        trajectory_buckets(np.ones((2, 5)), [0, 1, 2])
    with pytest.raises(ValueError, match="no valid"):
        trajectory_buckets(np.full((2, 5), np.nan), [0, 1])
