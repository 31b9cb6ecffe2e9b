"""Paired bootstrap intervals, per-kind selection counts, the outrank probability, spread blocks, speed-up."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selective_lm.analysis import selection as diag
from selective_lm.analysis.uncertainty import doc_sums, paired_delta, ratio_of_shares, tokens_to_reach
from selective_lm.analyze import tokens_to_reach_point
from selective_lm.store.layout import TokenStore


def test_doc_sums_group_finite_losses_by_document() -> None:
    losses = np.array([[np.nan, 1.0, 2.0], [np.nan, 3.0, 4.0]])
    docs = np.array([[0, 0, 1], [1, 1, 2]])
    ids, nats, counts = doc_sums(losses, docs)
    assert ids.tolist() == [0, 1, 2] and nats.tolist() == [1.0, 5.0, 4.0] and counts.tolist() == [1, 2, 1]


def test_identical_models_give_zero_and_a_constant_shift_an_exact_interval() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(50, 200, size=40).astype(float)
    base = counts * rng.uniform(1.5, 2.5, size=40)
    same = paired_delta(base, base, counts)
    assert same == {"pct": 0.0, "lo": 0.0, "hi": 0.0}
    shifted = paired_delta(base + 0.1 * counts, base, counts)  # every token 0.1 nats worse
    assert shifted["pct"] == pytest.approx(100 * math.expm1(0.1))
    assert shifted["lo"] == pytest.approx(shifted["pct"]) and shifted["hi"] == pytest.approx(shifted["pct"])


def test_interval_covers_zero_for_noise_and_excludes_it_for_a_real_gain() -> None:
    rng = np.random.default_rng(1)
    counts = np.full(60, 100.0)
    base = counts * 2.0 + rng.normal(0, 5, 60)
    noise_only = paired_delta(base + rng.normal(0, 5, 60), base, counts, seed=3)
    assert noise_only["lo"] < 0 < noise_only["hi"]  # per-document noise around no change: within noise
    gain = paired_delta(base - 0.05 * counts + rng.normal(0, 1, 60), base, counts, seed=3)
    assert gain["hi"] < 0 and gain["lo"] < gain["pct"] < gain["hi"]
    assert paired_delta(base, base + 1, counts, seed=3) == paired_delta(base, base + 1, counts, seed=3)
    with pytest.raises(ValueError):
        paired_delta([1.0], [1.0, 2.0], [1, 1])


def test_outrank_probability_is_the_auc() -> None:
    assert diag.outrank_probability(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert diag.outrank_probability(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert diag.outrank_probability(np.array([1.0, 1.0]), np.array([1.0])) == 0.5  # ties count half
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    brute = np.mean((a[:, None] > b[None, :]) + 0.5 * (a[:, None] == b[None, :]))
    assert diag.outrank_probability(a, b) == pytest.approx(brute)
    assert diag.outrank_probability(np.array([]), b) is None


def test_counts_by_kind_follow_the_weights() -> None:
    valid = torch.tensor([[False, True, True, True, True]])
    weights = torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0]])
    kinds = torch.tensor([[0, 0, 1, 1, 5]], dtype=torch.uint8)
    noise = kinds == 1
    totals = dict(zip(diag.FIELDS, diag.counts(weights, valid, noise, None, kinds).tolist(), strict=True))
    shares = diag.by_kind(totals, ["clean", "web", "numbers", "x", "y", "header"])
    assert shares["clean"] == 1.0 and shares["web"] == 0.5 and shares["header"] == 1.0 and shares["numbers"] is None
    assert diag.diagnostics(totals)["noise_selected_frac"] == 0.5


def _store(doc_ids: np.ndarray) -> TokenStore:
    return TokenStore(path=None, tokens=np.zeros_like(doc_ids), doc_ids=doc_ids, noise_mask=None, meta={})


def test_spread_blocks_cover_every_document_before_filling() -> None:
    docs = np.repeat(np.arange(6), [40, 8, 8, 8, 24, 32]).reshape(15, 8).astype(np.int32)  # 120 tokens, 6 docs
    store = _store(docs)
    rows = store.spread_blocks(6 * 8)
    assert len(rows) == 6 and set(np.unique(docs[rows])) == set(range(6))
    assert store.spread_blocks(None).tolist() == list(range(15))
    assert len(store.spread_blocks(3 * 8)) == 3  # fewer blocks than documents: spread over the documents
    sub = store.subset(rows)
    assert sub.doc_ids.shape == (6, 8) and sub.rows.tolist() == rows.tolist()


def test_tokens_to_reach_interpolates_and_says_never() -> None:
    curve = [{"tokens_seen": 0, "val_loss": {"v": 3.0}}, {"tokens_seen": 100, "val_loss": {"v": 2.0}},
             {"tokens_seen": 200, "val_loss": {"v": 1.0}}]
    assert tokens_to_reach_point(curve, "v", 1.5) == pytest.approx(150.0)
    assert tokens_to_reach_point(curve, "v", 3.5) == 0.0
    assert tokens_to_reach_point(curve, "v", 0.5) is None


def test_tokens_to_reach_bootstraps_documents() -> None:
    """Point estimate = the interpolated crossing on all documents; the interval comes from documents drawn
    with replacement for curve and target at once; a target some draws never reach gives an open bound."""
    tokens = [0, 100, 200]
    counts = np.array([10.0, 10.0, 10.0, 10.0])
    run = np.array([[30.0, 30.0, 30.0, 30.0], [20.0, 21.0, 19.0, 20.0], [10.0, 11.0, 9.0, 10.0]])
    r = tokens_to_reach(tokens, run, np.full(4, 15.0), counts, seed=3)
    assert r["tokens"] == pytest.approx(150.0) and r["never"] == 0.0
    assert 100 < r["lo"] <= r["tokens"] <= r["hi"] < 200
    same = tokens_to_reach(tokens, np.repeat(run[:, :1], 4, axis=1), np.full(4, 15.0), counts, seed=3)
    assert same["lo"] == same["hi"] == pytest.approx(150.0)  # identical documents: no spread
    # one document never gets below the target: draws heavy in it never reach it
    hard = run.copy()
    hard[:, 0] = [30.0, 29.0, 28.0]
    r = tokens_to_reach(tokens, hard, np.full(4, 17.0), counts, seed=3)
    assert r["tokens"] is not None and r["hi"] is None and 0 < r["never"] < 1
    with pytest.raises(ValueError, match="need tokens"):
        tokens_to_reach(tokens, run[:2], np.full(4, 15.0), counts)


def test_ratio_of_shares_is_paired_over_units() -> None:
    """(Σ a_sel / Σ a_n) / (Σ b_sel / Σ b_n), its interval from units drawn with both kinds at once; units
    without either kind are left out; an undefined share gives None."""
    a_sel, a_n = np.array([1.0, 2.0, 0.0, 3.0, 0.0]), np.array([4.0, 4.0, 2.0, 6.0, 0.0])
    b_sel, b_n = np.array([2.0, 1.0, 1.0, 0.0, 0.0]), np.array([2.0, 2.0, 2.0, 0.0, 0.0])
    r = ratio_of_shares(a_sel, a_n, b_sel, b_n, seed=1)
    assert r["ratio"] == pytest.approx((6 / 16) / (4 / 6)) and r["units"] == 4
    assert r["lo"] <= r["ratio"] <= r["hi"]
    same = ratio_of_shares(a_sel, a_n, a_sel, a_n)  # a kind against itself: exactly 1, no spread
    assert same["ratio"] == same["lo"] == same["hi"] == pytest.approx(1.0)
    assert ratio_of_shares(a_sel, a_n, b_sel * 0, b_n) is None
    rng = np.random.default_rng(0)  # more units, less spread
    wide = ratio_of_shares(*(rng.integers(0, 5, 20).astype(float) for _ in range(4)), seed=0)
    n = [rng.integers(5, 10, 400).astype(float) for _ in range(2)]
    narrow = ratio_of_shares(n[0] * 0.5, n[0], n[1] * 0.5, n[1], seed=0)
    assert narrow["hi"] - narrow["lo"] < wide["hi"] - wide["lo"]
