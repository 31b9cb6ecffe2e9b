"""The bounds of helpers/compare.py: AdamW's reach, the updates' and selections' checks, the losses' float32 noise."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.compare import (
    BETAS,
    GRAD_ETA,
    LOSS_ATOL,
    UPDATE_REL,
    adam_reach,
    adam_step_reach,
    assert_same_updates,
    assert_selection_within_noise,
    record,
)
from helpers.runs import float64_losses
from selective_lm.config import load_config
from selective_lm.method.loss import selective_lm_loss
from selective_lm.method.selection import select
from selective_lm.method.spec import Selection
from selective_lm.store.frozen import model_token_losses
from selective_lm.store.layout import load_store
from selective_lm.training.models import apply_lora, load_model, load_reference_model, load_tokenizer


def _adamw_moves(grads: torch.Tensor) -> torch.Tensor:
    """`[steps, n]` moves of n weights under AdamW (lr 1, no decay) fed the gradient histories `grads`."""
    w = torch.zeros(grads.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.AdamW([w], lr=1.0, betas=BETAS, weight_decay=0.0)
    moves = []
    for g in grads:
        before = w.detach().clone()
        w.grad = g.clone()
        opt.step()
        moves.append(w.detach() - before)
    return torch.stack(moves)


def test_adam_step_reach_bounds_adamw_and_is_reached() -> None:
    """No gradient history moves a weight further at step t than c_t · lr; the history ∝ (b1/b2)^(t−i) reaches it."""
    b1, b2 = BETAS
    gen = torch.Generator().manual_seed(0)
    steps = 8
    grads = torch.randn(steps, 20000, generator=gen, dtype=torch.float64) * torch.rand(steps, 20000, generator=gen,
                                                                                      dtype=torch.float64) ** 4
    moves = _adamw_moves(grads).abs()
    for t in range(1, steps + 1):
        assert float(moves[t - 1].max()) <= adam_step_reach(t) * (1 + 1e-9)
        extreme = torch.tensor([(b1 / b2) ** (t - i) for i in range(1, t + 1)], dtype=torch.float64)
        reached = float(_adamw_moves(extreme[:, None])[-1, 0].abs())
        assert reached == pytest.approx(adam_step_reach(t), rel=1e-6)  # eps (1e-8) shortens it by ~1e-8
    assert adam_step_reach(1) == 1 and adam_reach([1e-2] * 3) == pytest.approx(3e-2, rel=5e-3)


def _first_adam_step(start: torch.Tensor, grads: torch.Tensor, lr: float = 1e-2) -> dict[str, torch.Tensor]:
    """AdamW's first step from `start`, fed gradients `grads`: lr · sign(g) for every weight."""
    return {"w": start - lr * torch.sign(grads)}


def test_same_updates_allows_the_noise_it_assumes_and_refuses_a_real_difference() -> None:
    """The first AdamW step (lr · sign(g) per weight) of a million weights whose gradients are normal: float noise
    of GRAD_ETA times their rms passes (a sign flips with probability eta / pi: 1.13 sqrt(eta) expected, against
    UPDATE_REL = 2 sqrt(eta));
    gradients 5 % apart (a mis-weighted micro-batch, say) do not; nor does a weight moved further than AdamW can."""
    gen = torch.Generator().manual_seed(1)
    start = {"w": torch.randn(1000, 1000, generator=gen, dtype=torch.float64)}
    g = torch.randn(1000, 1000, generator=gen, dtype=torch.float64)
    lrs = [1e-2]
    a = _first_adam_step(start["w"], g)
    noisy = _first_adam_step(start["w"], g + GRAD_ETA * torch.randn(g.shape, generator=gen, dtype=torch.float64))
    assert not torch.equal(a["w"], noisy["w"])  # some signs flipped: the noise is there
    assert_same_updates(a, noisy, start, lrs)
    other = _first_adam_step(start["w"], g + 0.05 * torch.randn(g.shape, generator=gen, dtype=torch.float64))
    with pytest.raises(AssertionError, match=rf"updates differ: .* \(bound {UPDATE_REL:.3g}\)"):
        assert_same_updates(a, other, start, lrs)
    far = {"w": a["w"].clone()}
    far["w"][3, 7] += 3e-2  # further than one AdamW step of lr 1e-2 can part two runs
    with pytest.raises(AssertionError, match=r"worst weight w\[3, 7\]: .*AdamW's reach over 1 steps: 0.02"):
        assert_same_updates(a, far, start, lrs)
    with pytest.raises(AssertionError, match="neither run moved"):
        assert_same_updates(start, start, start, lrs)


def test_selection_within_noise_allows_ties_and_refuses_a_wrong_pick() -> None:
    scores = torch.tensor([[0.0, 3.0, 1.0, 1.00005, 2.0, torch.nan]])
    valid = ~torch.isnan(scores)

    def topk(s: torch.Tensor) -> torch.Tensor:
        return select(s, 0.6, "topk", "batch", valid)

    mask = topk(scores)  # 3 of 5: positions 1, 4 and 3 (1.00005)
    assert mask.tolist() == [[False, True, False, True, True, False]]
    assert_selection_within_noise(mask, scores, 1e-4, topk)
    tie = mask.clone()
    tie[0, 2], tie[0, 3] = True, False  # 1.0 for 1.00005: within 2 x 1e-4
    assert_selection_within_noise(tie, scores, 1e-4, topk)
    with pytest.raises(AssertionError, match=r"beyond their noise 1e-05"):
        assert_selection_within_noise(tie, scores, 1e-5, topk)
    wrong = mask.clone()
    wrong[0, 0], wrong[0, 3] = True, False  # 0.0 for 1.00005
    with pytest.raises(AssertionError, match=r"\(0, 0\): score 0 in"):
        assert_selection_within_noise(wrong, scores, 1e-4, topk)

    def draw(s: torch.Tensor) -> torch.Tensor:  # random draws read no score: no tie to allow
        return select(s, 0.6, "random", "batch", valid, torch.Generator().manual_seed(5))

    drawn = draw(scores)
    assert_selection_within_noise(drawn, scores, 1.0, draw)
    swapped = drawn.clone()
    swapped[0, :5] = ~swapped[0, :5]
    with pytest.raises(AssertionError):
        assert_selection_within_noise(swapped, scores, 1.0, draw)


@pytest.mark.parametrize("which", ["base", "reference"])
def test_float32_losses_are_within_loss_atol_of_float64(smoke_out: Path, which: str) -> None:
    """The bound the selections and score means are checked with holds here, in every batch shape the runs use."""
    cfg = load_config("smoke")
    model = (load_model(cfg.model, vocab_size=len(load_tokenizer(cfg.model))) if which == "base"
             else load_reference_model(cfg, smoke_out)).eval()
    store = load_store(smoke_out / "data" / "train")
    ids = torch.from_numpy(np.asarray(store.tokens[:16], dtype=np.int64))
    valid = torch.from_numpy(store.targets(np.arange(16), cfg.data.doc_boundaries))
    exact = float64_losses(model, ids, valid)
    worst = 0.0
    for rows in (4, 8, 16):
        for chunk in (64, cfg.scoring.chunk_size):
            got = torch.cat([model_token_losses(model, ids[i:i + rows], valid[i:i + rows], chunk)
                             for i in range(0, 16, rows)])
            worst = max(worst, float((got.double() - exact)[valid].abs().max()))
    record("loss_float32", error=worst, bound=LOSS_ATOL)
    assert 0 < worst <= LOSS_ATOL


def _gradients(model: torch.nn.Module, ids: torch.Tensor, valid: torch.Tensor, rows: int) -> dict[str, torch.Tensor]:
    """The gradient of the summed CE of every valid token (a CLM step's, before its scaling), in forwards of `rows`."""
    model.zero_grad(set_to_none=True)
    for i in range(0, len(ids), rows):
        selective_lm_loss(model, ids[i:i + rows], valid[i:i + rows], selection=Selection(method="clm")).loss_sum \
            .backward()
    return {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_float32_gradients_are_within_grad_eta_of_float64(smoke_out: Path, lora: bool) -> None:
    """The gradient noise UPDATE_REL and GRAD_NORM_REL follow from holds here: every entry of a step's gradient
    (16 rows, 1008 targets: the tests' largest step) within GRAD_ETA times its tensor's rms of the float64 one, in
    every batch shape the runs use."""
    cfg = load_config("smoke", overrides=[f"model.lora={str(lora).lower()}"])
    torch.manual_seed(0)
    model = load_model(cfg.model, vocab_size=len(load_tokenizer(cfg.model)))
    if lora:
        model = apply_lora(model, cfg.model)
        with torch.no_grad():  # B as after some steps, so that A has a gradient too
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 1e-2)
    store = load_store(smoke_out / "data" / "train")
    ids = torch.from_numpy(np.asarray(store.tokens[:16], dtype=np.int64))
    valid = torch.from_numpy(store.targets(np.arange(16), cfg.data.doc_boundaries))
    exact = _gradients(copy.deepcopy(model).double(), ids, valid, 16)
    worst = 0.0
    for rows in (4, 8, 16):
        got = _gradients(model, ids, valid, rows)
        for name, g in exact.items():
            rms = float(g.square().mean().sqrt())
            assert rms > 0, name
            worst = max(worst, float((got[name] - g).abs().max()) / rms)
    record("grad_float32", error=worst, bound=GRAD_ETA)
    assert 0 < worst <= GRAD_ETA
