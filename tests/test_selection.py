"""Selection: exact counts, validity, determinism, padding invariance, distributions, `global` scope."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selective_lm.method.selection import STRATEGIES, max_selected, num_selected, select

HARD_STRATEGIES = sorted(STRATEGIES)
SCOPES = ["batch", "sequence", "global"]  # global without a process group is batch


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Small score grids with many ties (integer scores) and random validity."""
    rows = draw(st.integers(1, 4))
    width = draw(st.integers(1, 10))
    flat = draw(st.lists(st.integers(-3, 3), min_size=rows * width, max_size=rows * width))
    keep = draw(st.lists(st.booleans(), min_size=rows * width, max_size=rows * width))
    scores = torch.tensor(flat, dtype=torch.float32).reshape(rows, width)
    valid = torch.tensor(keep).reshape(rows, width)
    return scores.masked_fill(~valid, torch.nan), valid


ratios = st.floats(0.01, 1.0)
settings.register_profile("selection", max_examples=60, deadline=None)
settings.load_profile("selection")


def units(x: torch.Tensor, scope: str) -> torch.Tensor:
    """The rows a scope selects within: the whole batch flattened, or each sequence."""
    return x.reshape(1, -1) if scope != "sequence" else x


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    ("n", "ratio", "k"),
    [
        (5, 0.5, 3),
        (3, 0.5, 2),
        (10, 0.25, 3),
        (4, 0.3, 1),
        (2, 0.75, 2),
        (10, 0.01, 1),
        (0, 0.5, 0),
        (7, 1.0, 7),
    ],
)
def test_count_rounds_half_up_and_keeps_at_least_one(n: int, ratio: float, k: int) -> None:
    assert num_selected(torch.tensor(n), ratio).item() == k


@given(
    batch=batches(), ratio=ratios, strategy=st.sampled_from(HARD_STRATEGIES), scope=st.sampled_from(SCOPES)
)
def test_exact_count_within_valid_and_deterministic(batch, ratio, strategy, scope) -> None:
    scores, valid = batch
    mask = select(scores, ratio, strategy, scope, valid, gen(7))
    assert mask.dtype == torch.bool and not (mask & ~valid).any()
    counts = units(mask, scope).sum(dim=1)
    assert torch.equal(counts, num_selected(units(valid, scope).sum(dim=1), ratio))
    assert torch.equal(mask, select(scores, ratio, strategy, scope, valid, gen(7)))


@given(batch=batches(), ratio=ratios, strategy=st.sampled_from(HARD_STRATEGIES), scope=st.sampled_from(SCOPES),
       soft=st.booleans())
def test_max_selected_bounds_the_count_whatever_is_valid_and_is_it_when_all_are(batch, ratio, strategy, scope,
                                                                                soft) -> None:
    """The loss path gathers `max_selected` rows, a size known on the host: it must hold every chosen token."""
    scores, valid = batch
    bound = max_selected(*valid.shape, ratio, scope, soft=soft)
    assert int((select(scores, ratio, strategy, scope, valid, gen(3), soft=soft) != 0).sum()) <= bound
    everything = torch.ones_like(valid)
    all_valid = select(scores.nan_to_num(0.0), ratio, strategy, scope, everything, gen(3))
    assert int(all_valid.sum()) == max_selected(*valid.shape, ratio, scope)


@given(batch=batches(), ratio=ratios, strategy=st.sampled_from(HARD_STRATEGIES), data=st.data())
def test_invalid_columns_and_rows_change_nothing(batch, ratio, strategy, data) -> None:
    scores, valid = batch
    scope = data.draw(st.sampled_from(["batch", "sequence"]))
    width = scores.shape[1]
    where = sorted(data.draw(st.lists(st.integers(0, width), min_size=1, max_size=4)))
    cols, real = [], []
    for j in range(width + 1):  # insert padding columns before column j (or at the end)
        for _ in range(where.count(j)):
            cols.append(None)
        if j < width:
            real.append(len(cols))
            cols.append(j)
    pad_scores = torch.stack(
        [scores[:, j] if j is not None else torch.full_like(scores[:, 0], 5.0) for j in cols], 1
    )
    pad_valid = torch.stack(
        [valid[:, j] if j is not None else torch.zeros_like(valid[:, 0]) for j in cols], 1
    )
    if scope == "batch":  # an all-padding row appended changes nothing either
        pad_scores = torch.cat([pad_scores, torch.full_like(pad_scores[:1], 9.0)])
        pad_valid = torch.cat([pad_valid, torch.zeros_like(pad_valid[:1])])
    expected = select(scores, ratio, strategy, scope, valid, gen(3))
    padded = select(pad_scores, ratio, strategy, scope, pad_valid, gen(3))
    assert torch.equal(padded[: scores.shape[0], real], expected)
    assert not padded[~pad_valid].any()


@given(batch=batches(), strategy=st.sampled_from(HARD_STRATEGIES), scope=st.sampled_from(SCOPES))
def test_ratio_one_selects_every_valid_token(batch, strategy, scope) -> None:
    scores, valid = batch
    assert torch.equal(select(scores, 1.0, strategy, scope, valid, gen()), valid)


@given(batch=batches(), ratio=ratios, scope=st.sampled_from(SCOPES))
def test_topk_selected_scores_dominate_with_ties_to_earlier_positions(batch, ratio, scope) -> None:
    scores, valid = batch
    mask = select(scores, ratio, "topk", scope, valid)
    for s, m, v in zip(units(scores, scope), units(mask, scope), units(valid, scope), strict=True):
        if m.any() and (v & ~m).any():
            low, high = s[m].min(), s[v & ~m].max()
            assert low >= high
            if low == high:  # among equal scores, the selected ones come first
                tied = v & (s == low)
                first_unselected_tie = (tied & ~m).nonzero().min()
                assert not (tied & m)[first_unselected_tie:].any()


@given(batch=batches(), scope=st.sampled_from(SCOPES))
def test_bottomk_at_half_is_the_complement_of_topk(batch, scope) -> None:
    """The sign check selects exactly what top-k leaves, ties included, in every unit of even valid count."""
    scores, valid = batch
    top, bottom = (select(scores, 0.5, s, scope, valid) for s in ("topk", "bottomk"))
    for t, b, v in zip(units(top, scope), units(bottom, scope), units(valid, scope), strict=True):
        if int(v.sum()) % 2 == 0:
            assert torch.equal(b, v & ~t)


@given(batch=batches(), ratio=ratios, scope=st.sampled_from(SCOPES))
def test_bottomk_takes_the_lowest_scores(batch, ratio, scope) -> None:
    scores, valid = batch
    mask = select(scores, ratio, "bottomk", scope, valid)
    for s, m, v in zip(units(scores, scope), units(mask, scope), units(valid, scope), strict=True):
        if m.any() and (v & ~m).any():
            assert s[m].max() <= s[v & ~m].min()


def test_bottomk_at_half_on_distinct_scores() -> None:
    scores = torch.tensor([[0.3, -1.0, 2.0, 0.1], [5.0, 4.0, -2.0, 0.0]])
    valid = torch.ones(2, 4, dtype=torch.bool)
    assert select(scores, 0.5, "bottomk", "batch", valid).tolist() == [[False, True, False, True],
                                                                      [False, False, True, True]]


def test_topk_ties_go_to_the_earliest_positions() -> None:
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 2.0, 0.0]])
    valid = torch.tensor([[True, True, False, True, True, True]])
    assert select(scores, 0.4, "topk", "batch", valid).tolist() == [[False, True, False, True, False, False]]


@given(
    batch=batches(), ratio=ratios, strategy=st.sampled_from(HARD_STRATEGIES), scope=st.sampled_from(SCOPES)
)
def test_soft_weights_sum_to_the_hard_count(batch, ratio, strategy, scope) -> None:
    scores, valid = batch
    w = select(scores, ratio, strategy, scope, valid, soft=True)
    assert w.is_floating_point() and (w >= 0).all() and not w[~valid].any()
    expected = num_selected(units(valid, scope).sum(dim=1), ratio).float()
    torch.testing.assert_close(units(w, scope).sum(dim=1), expected)


def test_soft_topk_is_k_times_softmax() -> None:
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    valid = torch.tensor([[False, True, True, True]])
    w = select(scores, 0.5, "topk", "batch", valid, soft=True, temperature=2.0)
    expected = torch.cat([torch.zeros(1), 2 * torch.softmax(torch.tensor([0.5, 1.0, 1.5]), 0)])
    torch.testing.assert_close(w[0], expected)


def test_stochastic_is_gumbel_top_k_with_softmax_probabilities() -> None:
    # k = 1 per row, 20k independent rows: selection frequencies estimate softmax(score / T).
    row = torch.tensor([0.0, 1.0, 2.0, -1.0])
    scores, valid = row.expand(20_000, 4).clone(), torch.ones(20_000, 4, dtype=torch.bool)
    for temperature in (1.0, 3.0):
        mask = select(scores, 0.25, "stochastic", "sequence", valid, gen(1), temperature=temperature)
        torch.testing.assert_close(
            mask.float().mean(0), torch.softmax(row / temperature, 0), atol=0.015, rtol=0
        )


def test_stochastic_positive_probabilities_and_fallback() -> None:
    valid = torch.ones(20_000, 4, dtype=torch.bool)
    row = torch.tensor([1.0, 3.0, -2.0, 0.0])
    mask = select(row.expand(20_000, 4).clone(), 0.25, "stochastic_positive", "sequence", valid, gen(2))
    torch.testing.assert_close(mask.float().mean(0), torch.tensor([0.25, 0.75, 0.0, 0.0]), atol=0.015, rtol=0)
    # k = 3 but one positive score: it is always taken, the other two slots are uniform over the rest.
    mask = select(row.expand(20_000, 4).clone() - 2, 0.75, "stochastic_positive", "sequence", valid, gen(3))
    torch.testing.assert_close(
        mask.float().mean(0), torch.tensor([2 / 3, 1.0, 2 / 3, 2 / 3]), atol=0.015, rtol=0
    )
    # No positive score at all: uniform (soft: equal weights).
    none_positive = torch.full((1, 4), -1.0)
    w = select(none_positive, 0.5, "stochastic_positive", "batch", valid[:1], soft=True)
    torch.testing.assert_close(w, torch.full((1, 4), 0.5))


def test_random_is_uniform_and_ignores_scores() -> None:
    valid = torch.ones(20_000, 5, dtype=torch.bool)
    scores = torch.tensor([9.0, 0.0, 0.0, 0.0, -9.0]).expand(20_000, 5).clone()
    mask = select(scores, 0.4, "random", "sequence", valid, gen(4))
    torch.testing.assert_close(mask.float().mean(0), torch.full((5,), 0.4), atol=0.015, rtol=0)


def test_global_without_process_group_is_batch() -> None:
    scores, valid = torch.randn(3, 8, generator=gen(5)), torch.rand(3, 8, generator=gen(6)) < 0.7
    for strategy in HARD_STRATEGIES:
        batch = select(scores, 0.5, strategy, "batch", valid, gen(8))
        assert torch.equal(select(scores, 0.5, strategy, "global", valid, gen(8)), batch)


@given(batch=batches(), threshold=st.sampled_from([-1.5, 0.0, 0.5, 2.0]), strategy=st.sampled_from(HARD_STRATEGIES),
       scope=st.sampled_from(SCOPES))
def test_threshold_counts_the_tokens_above_it(batch, threshold, strategy, scope) -> None:
    """Rules positive/threshold: each scope unit selects as many tokens as score above the threshold (maybe
    none); top-k selects exactly those, the other strategies as many by their own keys, all inside valid."""
    scores, valid = batch
    chosen = select(scores, 1.0, strategy, scope, valid, gen(), threshold=threshold)
    above = valid & (scores > threshold)
    assert not (chosen & ~valid).any()
    assert torch.equal(units(chosen, scope).sum(1), units(above, scope).sum(1))
    if strategy == "topk":
        assert torch.equal(chosen, above)


def test_threshold_selects_nothing_when_no_score_exceeds_it() -> None:
    scores, valid = -torch.rand(2, 6, generator=gen(1)), torch.ones(2, 6, dtype=torch.bool)
    for strategy in HARD_STRATEGIES:
        assert not select(scores, 1.0, strategy, "batch", valid, gen(), threshold=0.0).any()


def test_score_kinds_signs() -> None:
    """excess = own - reference (Rho-1); retrospective = reference - own (ssToken); reference = -reference."""
    from selective_lm.method.selection import scores as score_of

    own, ref = torch.tensor([[2.0, 1.0]]), torch.tensor([[1.5, 3.0]])
    assert torch.equal(score_of("excess", own, ref), own - ref)
    assert torch.equal(score_of("retrospective", own, ref), ref - own)
    assert torch.equal(score_of("reference", own, ref), -ref)
    assert torch.equal(score_of("loss", own, ref), own)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": float("nan")}, "ratio"),
        ({"strategy": "topkk"}, "did you mean 'topk'"),
        ({"strategy": "stochastic_pos"}, "did you mean 'stochastic_positive'"),
        ({"scope": "sequnce"}, "did you mean 'sequence'"),
        ({"valid": torch.ones(2, 4, dtype=torch.bool)}, "must both be"),
        ({"valid": torch.ones(2, 3)}, "bool"),
        ({"scores": torch.tensor([[0.0, torch.nan, 1.0]] * 2)}, "finite"),
        ({"temperature": 0.0}, "temperature"),
        ({"threshold": float("inf")}, "threshold"),
        ({"threshold": 0.0, "soft": True}, "threshold"),
        ({"strategy": "random", "threshold": 0.0, "scores": torch.tensor([[0.0, torch.nan, 1.0]] * 2)}, "finite"),
    ],
)
def test_bad_input_raises_a_clear_value_error(kwargs: dict, message: str) -> None:
    args = {"scores": torch.zeros(2, 3), "ratio": 0.5, "strategy": "topk", "scope": "batch"}
    args |= {"valid": torch.ones(2, 3, dtype=torch.bool)} | kwargs
    with pytest.raises(ValueError, match=message):
        select(
            args["scores"],
            args["ratio"],
            args["strategy"],
            args["scope"],
            args["valid"],
            temperature=args.get("temperature", 1.0),
            threshold=args.get("threshold"),
            soft=args.get("soft", False),
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_global_scope_over_two_processes_equals_one_process_on_the_concatenation(tmp_path: Path) -> None:
    worker = Path(__file__).parent / "helpers" / "dist_global_worker.py"
    sys.path.insert(0, str(worker.parent))
    try:
        from helpers.dist_global_worker import CASES
    finally:
        sys.path.remove(str(worker.parent))
    port, outs = _free_port(), [tmp_path / f"rank{r}.pt" for r in range(2)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(r), "2", str(port), str(outs[r])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    for p in procs:
        log, _ = p.communicate(timeout=60)
        assert p.returncode == 0, log
    ranks = [torch.load(o) for o in outs]
    width = max(r["scores"].shape[1] for r in ranks)
    pad = [(0, width - r["scores"].shape[1]) for r in ranks]
    scores = torch.cat(
        [torch.nn.functional.pad(r["scores"], p, value=torch.nan) for r, p in zip(ranks, pad, strict=True)]
    )
    valid = torch.cat([torch.nn.functional.pad(r["valid"], p) for r, p in zip(ranks, pad, strict=True)])
    for i, (strategy, ratio, soft) in enumerate(CASES):
        one = select(scores, ratio, strategy, "batch", valid, gen(1234 + i), soft=soft)
        two = torch.cat(
            [torch.nn.functional.pad(r["results"][i], p) for r, p in zip(ranks, pad, strict=True)]
        )
        assert torch.equal(two, one), (strategy, ratio, soft)
