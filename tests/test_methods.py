"""The field's token-selection methods (docs/methods-side-by-side.md) against hand computations: on tiny tensors
(the selected set and the loss from given losses and entropies) and on a tiny random Llama (full logits, the
textbook way). The models run in float64, so `assert_close`'s float64 tolerances (rtol 1e-7) bound the only
difference, the order of the sums over at most a few dozen tokens."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from selective_lm.method import loss as loss_module
from selective_lm.method.distill import DistillParams
from selective_lm.method.loss import Batch, SelectiveLM, forward_hidden, selective_loss_of_losses, valid_mask
from selective_lm.method.registry import METHODS, OBJECTIVES
from selective_lm.method.selection import num_selected, scores
from selective_lm.method.spec import Selection
from selective_lm.method.weighting import WeightedParams, excess_weights

VOCAB = 64


def tiny_llama(seed: int = 0, lora: bool = False) -> nn.Module:
    """A float64 Llama; with `lora`, LoRA on two projections (random B, so the adapters get gradients) and the
    head frozen: the loss path's frozen-linear branch (row gradients made in the forward)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.float64)
    if lora:
        model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                 target_modules=["q_proj", "v_proj"]))
    return model


def tokens(rows: int = 2, width: int = 11, pad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids `[rows, width]` and their valid mask; with `pad`, the last row's last 4 positions are padding."""
    ids = torch.randint(VOCAB, (rows, width), generator=torch.Generator().manual_seed(3))
    attention = torch.ones_like(ids)
    if pad:
        attention[-1, -4:] = 0
    return ids, valid_mask(ids, attention)


def by_hand(model: nn.Module, ids: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per valid target, row-major: CE (with grad), the student's entropy, its full logits (with grad)."""
    logits = model(input_ids=ids).logits[:, :-1][valid[:, 1:]]
    targets = ids[:, 1:][valid[:, 1:]]
    log_p = torch.log_softmax(logits, -1)
    ce = -log_p[torch.arange(len(targets)), targets]
    entropy = -(log_p.exp() * log_p).sum(-1).detach()
    return {"ce": ce, "entropy": entropy, "logits": logits}


def flat(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return x[valid]


def run(model: nn.Module, ids: torch.Tensor, valid: torch.Tensor, selection: Selection, **batch) -> dict:
    """The micro-batch's loss as the trainer computes it: the objective inside `SelectiveLM`'s forward."""
    return SelectiveLM(model)(ids, valid, batch.pop("ref_loss", None), selection=selection, **batch)


def grads(loss: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))


# --------------------------------------------------------------------------- registrations


def test_registered_with_their_papers_defaults() -> None:
    assert METHODS["entropy_topk"].score == "entropy" and METHODS["entropy_topk"].ratio == 0.2
    assert (METHODS["eslm"].score, METHODS["eslm_loss"].score) == ("entropy", "loss")
    assert METHODS["eslm"].ratio is None and METHODS["eslm"].strategy == "topk"
    assert (METHODS["topk_distill"].strategy, METHODS["topk_distill"].objective) == ("topk", "distill")
    assert METHODS["bottomk_distill"].compare == ("bottomk_distill", "topk_distill")
    assert not METHODS["dft"].selects and not METHODS["weighted"].selects
    assert OBJECTIVES["dft"].logs_ce and OBJECTIVES["weighted"].needs == {"reference_loss"}
    assert WeightedParams() == WeightedParams(interpolation=0.75, sparsification=None, truncation=None)
    # What each run reads: the online ones no reference, weighting by excess loss the reference's losses.
    assert Selection("entropy_topk").needs == {"student_logits"} and not Selection("eslm").needs_reference
    assert Selection("eslm_loss").needs == frozenset() and Selection("dft").needs == frozenset()
    assert Selection("weighted").needs_reference and Selection("topk_distill").needs == {"reference_loss",
                                                                                       "reference_logits"}


def test_a_fixed_ratio_replaces_any_below_one() -> None:
    assert Selection("entropy_topk", ratio=0.6).rule_used.ratio == 0.2
    assert Selection("entropy_topk", ratio=0.6).every_token().rule_used.ratio == 1.0  # a warm-up trains all
    assert Selection("eslm", ratio=0.3).rule_used == ("topk", "entropy", 0.3, None)


# --------------------------------------------------------------------------- on tiny tensors

NAN = math.nan
# One row, 10 targets after position 0: distinct losses and entropies, ranked differently.
LOSSES = torch.tensor([[NAN, 2.0, 0.5, 3.0, 1.0, 4.0, 0.2, 2.5, 1.5, 0.1, 3.5]])
ENTROPY = torch.tensor([[NAN, 0.3, 2.9, 0.1, 2.2, 0.4, 1.7, 0.8, 2.4, 3.1, 0.6]])
VALID = ~LOSSES.isnan()


def test_entropy_score_kind_is_the_entropy_and_needs_it() -> None:
    torch.testing.assert_close(scores("entropy", LOSSES, entropy=ENTROPY), ENTROPY, equal_nan=True)
    with pytest.raises(ValueError, match="student's entropy"):
        scores("entropy", LOSSES)


def test_entropy_topk_trains_the_fifth_with_the_highest_entropy() -> None:
    """10 targets x 0.2 = 2: entropies 3.1 (position 9) and 2.9 (position 2); their losses 0.1 + 0.5."""
    losses = LOSSES.clone().requires_grad_(True)
    out = selective_loss_of_losses(losses, VALID, None, Selection("entropy_topk"), entropy=ENTROPY)
    assert out.weights.nonzero()[:, 1].tolist() == [2, 9]
    torch.testing.assert_close(out.loss_sum, torch.tensor(0.5 + 0.1))
    assert out.n_selected == 2 and out.n_unselected == 8


@pytest.mark.parametrize("alpha", [0.5, 0.7, 0.8])
def test_eslm_keeps_the_scores_above_the_value_at_risk(alpha: float) -> None:
    """ESLM: VaR_α = the ⌈α n⌉-th smallest score of the batch; keep the scores above it (at these α the ratio's
    count is that of the strict quantile: n = 10, α n whole). With the loss, the kept losses' mean is CVaR_α."""
    n = int(VALID.sum())
    below = math.ceil(round(alpha * n, 9))  # the VaR's rank (α n is whole here: no float noise above it)
    for method, score in (("eslm", ENTROPY), ("eslm_loss", LOSSES)):
        values = score[VALID]
        var = values.sort().values[below - 1]
        keep = VALID & (score > var)
        out = selective_loss_of_losses(LOSSES, VALID, None, Selection(method, ratio=round(1 - alpha, 10)),
                                       entropy=ENTROPY)
        assert torch.equal(out.weights.bool(), keep), method
        torch.testing.assert_close(out.loss_sum, LOSSES[keep].sum())
    cvar = LOSSES[VALID].sort().values[below:].mean()
    out = selective_loss_of_losses(LOSSES, VALID, None, Selection("eslm_loss", ratio=round(1 - alpha, 10)))
    torch.testing.assert_close(out.mean(), cvar)


def test_weights_of_excess_loss_by_hand() -> None:
    """|excess| = 1, 3, 0, 2 (mean 1.5), then each transform of Helm et al. written out."""
    excess = torch.tensor([[NAN, 1.0, -3.0, 0.0, 2.0]], dtype=torch.float64)
    valid = ~excess.isnan()

    def w(**params) -> list[float]:
        return excess_weights(excess, valid, WeightedParams(**params), rows=1)[0].tolist()

    dense = [0.0, 1 / 1.5, 3 / 1.5, 0.0, 2 / 1.5]
    assert w(interpolation=0.0) == pytest.approx(dense)
    assert w() == pytest.approx([0.0, *(0.75 + 0.25 * x for x in dense[1:])])  # λ = 0.75: the repository's
    assert w(interpolation=0.0, truncation=1.5) == pytest.approx([0.0, 1.0, 1.5, 0.0, 1.5])  # 1, 1.5, 0, 1.5: mean 1
    assert w(interpolation=0.0, sparsification=0.5) == pytest.approx([0.0, 0.0, 2.0, 0.0, 2.0])  # the top 2 of 4
    assert w(interpolation=1.0) == pytest.approx([0.0, 1.0, 1.0, 1.0, 1.0])  # CLM
    zero = excess_weights(torch.zeros_like(excess), valid, WeightedParams(interpolation=0.0), rows=1)
    assert zero[0].tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]  # nothing to weigh by: uniform


def test_weights_are_made_per_unit() -> None:
    """Two units of one row each: each has mean weight 1 over its own valid tokens."""
    excess = torch.tensor([[NAN, 1.0, 3.0], [NAN, 10.0, 30.0]], dtype=torch.float64)
    w = excess_weights(excess, ~excess.isnan(), WeightedParams(interpolation=0.0), rows=1)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.5, 1.5], [0.0, 0.5, 1.5]], dtype=torch.float64))
    whole = excess_weights(excess, ~excess.isnan(), WeightedParams(interpolation=0.0), rows=2)
    torch.testing.assert_close(whole.sum(), torch.tensor(4.0, dtype=torch.float64))


# --------------------------------------------------------------------------- on a tiny model


def test_entropy_topk_on_a_model_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """The head's entropy pass runs for the entropy score kind and for nothing else; the loss is the CE of the
    hand-picked tokens (the 20 % with the highest entropy of the full logits)."""
    model = tiny_llama()
    ids, valid = tokens(pad=True)
    ref = by_hand(model, ids, valid)
    n = int(valid.sum())
    k = int(num_selected(torch.tensor(n), 0.2))
    top = ref["entropy"].topk(k).indices
    calls = []
    real = loss_module.token_entropies
    monkeypatch.setattr(loss_module, "token_entropies", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = run(model, ids, valid, Selection("entropy_topk"))
    assert calls == [1]
    assert sorted(flat(out["weights"], valid).nonzero()[:, 0].tolist()) == sorted(top.tolist())
    torch.testing.assert_close(out["loss_sum"], ref["ce"][top].sum())
    for g, want in zip(grads(out["loss_sum"], model), grads(ref["ce"][top].sum(), model), strict=True):
        torch.testing.assert_close(g, want)
    run(model, ids, valid, Selection("eslm_loss", ratio=0.5))
    run(model, ids, valid, Selection("topk", ratio=0.5), ref_loss=torch.zeros(ids.shape, dtype=torch.float64))
    assert calls == [1]  # neither the loss nor excess loss computes an entropy


def test_dft_is_ce_times_its_detached_probability() -> None:
    """TRL's dft_loss: Σ -sg(p) log p over the valid targets, divided by their count (n_selected)."""
    model = tiny_llama()
    ids, valid = tokens(pad=True)
    ce = by_hand(model, ids, valid)["ce"]
    expected = (torch.exp(-ce).detach() * ce).sum()
    out = run(model, ids, valid, Selection("dft"))
    torch.testing.assert_close(out["loss_sum"], expected)
    assert out["n_selected"] == out["n_valid"] == valid.sum() and out["n_unselected"] == 0
    torch.testing.assert_close(out["loss_selected"], ce.mean().detach())  # logged: the plain CE
    for g, want in zip(grads(out["loss_sum"], model), grads(expected, model), strict=True):
        torch.testing.assert_close(g, want)


@pytest.mark.parametrize("params", [{}, {"interpolation": 0.0, "sparsification": 0.5}, {"truncation": 0.3}])
def test_weighted_is_ce_times_blended_excess_weights(params: dict) -> None:
    """The weights written out: |own - reference| (clipped), per unit of the micro-batch (or the top half set to
    1), over their mean, blended with 1; the loss Σ w x CE; n_selected = Σ w = the valid count."""
    model = tiny_llama()
    ids, valid = tokens(pad=True)
    ce = by_hand(model, ids, valid)["ce"]
    ref_loss = torch.rand(ids.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 5
    p = WeightedParams(**params)
    a = (ce.detach() - ref_loss[valid]).abs()
    if p.truncation is not None:
        a = a.clamp(max=p.truncation)
    if p.sparsification is not None:
        top = a.topk(int(num_selected(torch.tensor(len(a)), p.sparsification))).indices
        a = torch.zeros_like(a).index_fill(0, top, 1.0)
    w = p.interpolation + (1 - p.interpolation) * a / a.mean()
    out = run(model, ids, valid, Selection("weighted"), ref_loss=ref_loss, params=p)
    torch.testing.assert_close(flat(out["weights"], valid), w)
    torch.testing.assert_close(out["loss_sum"], (w * ce).sum())
    torch.testing.assert_close(out["n_selected"], valid.sum().to(torch.float64))
    for g, want in zip(grads(out["loss_sum"], model), grads((w * ce).sum(), model), strict=True):
        torch.testing.assert_close(g, want)


def _distill_by_hand(student: nn.Module, ref: nn.Module, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """CE + KL(q || p) per valid target (DistillParams' defaults: weight 1, temperature 1), from full logits."""
    s = by_hand(student, ids, valid)
    with torch.no_grad():
        q = torch.log_softmax(by_hand(ref, ids, valid)["logits"], -1)
    kl = (q.exp() * (q - torch.log_softmax(s["logits"], -1))).sum(-1)
    return s["ce"] + kl


def _distill(student: nn.Module, ref: nn.Module, ids: torch.Tensor, valid: torch.Tensor, method: str,
             ref_loss: torch.Tensor, soft: bool = False) -> dict:
    with torch.no_grad():
        reference = forward_hidden(ref, ids)
    sel = Selection(method, ratio=0.5, soft=soft)
    b = Batch(student, ids, valid, ref_loss, sel, reference=reference, params=DistillParams())
    out = OBJECTIVES[sel.objective].loss(b, b.params)
    return {"loss_sum": out.loss_sum, "weights": out.weights, "n_selected": out.n_selected}


@pytest.mark.parametrize("lora", [False, True])
def test_topk_distill_trains_distillation_on_the_selected_tokens_only(lora: bool) -> None:
    """Top-k by excess (own - reference loss) at 0.5 by hand, CE + KL summed there; bottom-k distills the rest
    (30 valid targets: the two halves are complements), and the two add up to distillation on every token."""
    student, ref = tiny_llama(0, lora), tiny_llama(1)
    ids, valid = tokens(rows=3)
    per_token = _distill_by_hand(student, ref, ids, valid)
    ref_loss = by_hand(ref, ids, valid)["ce"].detach()
    excess = per_token.new_zeros(ids.shape).masked_scatter(valid, by_hand(student, ids, valid)["ce"].detach()
                                                           - ref_loss)
    ref_full = torch.full(ids.shape, NAN, dtype=torch.float64).masked_scatter(valid, ref_loss)
    n = int(valid.sum())
    assert n % 2 == 0
    top = flat(excess, valid).topk(n // 2).indices
    out = _distill(student, ref, ids, valid, "topk_distill", ref_full)
    assert sorted(flat(out["weights"], valid).nonzero()[:, 0].tolist()) == sorted(top.tolist())
    torch.testing.assert_close(out["loss_sum"], per_token[top].sum())
    rest = _distill(student, ref, ids, valid, "bottomk_distill", ref_full)
    assert torch.equal((out["weights"] + rest["weights"])[valid], torch.ones(n, dtype=torch.float64))
    every = _distill(student, ref, ids, valid, "distill", ref_full)
    torch.testing.assert_close(out["loss_sum"] + rest["loss_sum"], every["loss_sum"])
    for g, want in zip(grads(out["loss_sum"], student), grads(per_token[top].sum(), student), strict=True):
        torch.testing.assert_close(g, want)


@pytest.mark.parametrize("lora", [False, True])
def test_soft_topk_distill_weighs_each_token(lora: bool) -> None:
    """train.soft: the weights k x softmax(excess) of every valid token multiply its CE + KL (not a hard mask)."""
    student, ref = tiny_llama(0, lora), tiny_llama(1)
    ids, valid = tokens(rows=3)
    per_token = _distill_by_hand(student, ref, ids, valid)
    ref_loss = by_hand(ref, ids, valid)["ce"].detach()
    ref_full = torch.full(ids.shape, NAN, dtype=torch.float64).masked_scatter(valid, ref_loss)
    excess = by_hand(student, ids, valid)["ce"].detach() - ref_loss
    w = torch.softmax(excess, 0) * int(num_selected(valid.sum(), 0.5))
    out = _distill(student, ref, ids, valid, "topk_distill", ref_full, soft=True)
    torch.testing.assert_close(flat(out["weights"], valid), w)
    torch.testing.assert_close(out["loss_sum"], (w * per_token).sum())
    torch.testing.assert_close(out["n_selected"], w.sum())
    for g, want in zip(grads(out["loss_sum"], student), grads((w * per_token).sum(), student), strict=True):
        torch.testing.assert_close(g, want)


def test_ce_of_the_losses_path_matches_f_cross_entropy() -> None:
    """The by-hand CE above is F.cross_entropy's (so the hand computations check against the textbook loss)."""
    model = tiny_llama()
    ids, valid = tokens()
    logits = model(input_ids=ids).logits[:, :-1][valid[:, 1:]]
    torch.testing.assert_close(by_hand(model, ids, valid)["ce"],
                               F.cross_entropy(logits, ids[:, 1:][valid[:, 1:]], reduction="none"))
