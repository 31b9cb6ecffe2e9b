"""Loss: the shift, the efficient selective path against the naive one (loss and gradients), memory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from selective_lm.bench import tensor_peak_bytes
from selective_lm.bench.overhead import count_host_syncs
from selective_lm.method.loss import (
    forward_hidden,
    scores,
    selected_loss_sum,
    selective_lm_loss,
    selective_loss_of_losses,
    token_losses,
    valid_mask,
)
from selective_lm.method.selection import select
from selective_lm.method.spec import Selection

VOCAB = 300
# A selection strategy's method and its `train.stochastic` (stochastic_positive is the stochastic method's other draw).
METHOD_OF = {"topk": ("topk", "softmax"), "random": ("random", "softmax"), "bottomk": ("bottomk", "softmax"),
             "stochastic": ("stochastic", "softmax"), "stochastic_positive": ("stochastic", "positive")}


def selection(strategy: str = "topk", score: str = "excess", ratio: float = 0.6, **fields: object) -> Selection:
    """The `Selection` whose rule applies this strategy (the loss takes one value, not its fields)."""
    method, stochastic = METHOD_OF[strategy]
    return Selection(method=method, score=score, ratio=ratio, stochastic=stochastic, **fields)


def tiny_llama(tied: bool, lora: bool = False, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config).to(dtype)
    if lora:  # random B (init_lora_weights=False) so that LoRA A gets a nonzero gradient too
        model = get_peft_model(
            model,
            LoraConfig(
                r=4,
                lora_alpha=8,
                lora_dropout=0.0,
                init_lora_weights=False,
                target_modules=["q_proj", "v_proj", "down_proj"],
            ),
        )
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids [3, 16] with right padding in two rows, its attention mask and valid mask."""
    ids = torch.randint(VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    attention[1, 11:] = 0
    attention[2, 5:] = 0
    return ids, attention, valid_mask(ids, attention)


def naive_token_losses(model: nn.Module, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """The textbook way: full logits, shift, cross_entropy(reduction='none'); [B, T-1] for targets 1..T-1."""
    logits = model(input_ids=ids, attention_mask=attention).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(
        ids.shape[0], -1
    )


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


def test_valid_mask_covers_shift_padding_labels_and_documents() -> None:
    ids = torch.arange(12).view(2, 6)
    attention = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])  # right and left padding
    labels = ids.clone()
    labels[0, 2] = -100
    docs = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    assert valid_mask(ids).tolist() == [[False] + [True] * 5] * 2
    assert valid_mask(ids, attention, labels).tolist() == [
        [False, True, False, True, False, False],
        [False, False, False, True, True, True],
    ]
    assert valid_mask(ids, doc_ids=docs)[:, 1:].tolist() == [
        [True, True, False, True, True],
        [True] * 3 + [False, True],
    ]
    with pytest.raises(ValueError, match="attention_mask"):
        valid_mask(ids, attention[:, :3])


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_token_losses_are_the_shifted_cross_entropy(chunk_size: int) -> None:
    model = tiny_llama(tied=False)
    ids, attention, valid = batch()
    with torch.no_grad():
        hidden, head = forward_hidden(model, ids, attention)
        got = token_losses(hidden, head, ids, valid, chunk_size=chunk_size)
        naive = naive_token_losses(model, ids, attention)
    assert not got.requires_grad and got.shape == ids.shape
    assert torch.isnan(got[~valid]).all() and torch.isnan(got[:, 0]).all()
    torch.testing.assert_close(got[:, 1:][valid[:, 1:]], naive[valid[:, 1:]], rtol=1e-10, atol=0)


def test_uniform_logits_give_log_vocab() -> None:
    head = nn.Linear(8, 50)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    ids = torch.randint(50, (2, 5))
    losses = token_losses(torch.randn(2, 5, 8), head, ids, chunk_size=3)
    torch.testing.assert_close(losses[:, 1:], torch.full((2, 4), math.log(50)))


def test_half_precision_model_gives_float32_losses() -> None:
    head = nn.Linear(8, 50).to(torch.bfloat16)
    losses = token_losses(torch.randn(1, 6, 8, dtype=torch.bfloat16), head, torch.randint(50, (1, 6)))
    assert losses.dtype == torch.float32


@pytest.mark.parametrize("lora", [False, True])
def test_forward_hidden_reaches_the_logits_through_the_head(lora: bool) -> None:
    model = tiny_llama(tied=True, lora=lora)
    ids, attention, _ = batch()
    with torch.no_grad():
        hidden, head = forward_hidden(model, ids, attention)
        torch.testing.assert_close(head(hidden), model(input_ids=ids, attention_mask=attention).logits)
    assert hidden.shape == (*ids.shape, 32)


def test_forward_hidden_refuses_transformed_logits() -> None:
    model = tiny_llama(tied=False)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        forward_hidden(model, *batch()[:2])


CASES = [  # (ratio, strategy, soft)
    (1.0, "topk", False),  # CLM
    (0.5, "topk", False),
    (0.3, "stochastic", False),
    (0.5, "topk", True),
]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize(("ratio", "strategy", "soft"), CASES)
def test_efficient_loss_and_gradients_equal_the_naive_implementation(
    tied, lora, ratio, strategy, soft
) -> None:
    model = tiny_llama(tied=tied, lora=lora)
    ids, attention, valid = batch()
    ref_loss = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 5
    # chunk_size 4 < selected rows: the checkpointed multi-chunk path is the one under test.
    out = selective_lm_loss(
        model,
        ids,
        valid,
        ref_loss,
        selection(strategy, ratio=ratio, soft=soft),
        generator=torch.Generator().manual_seed(3),
        attention_mask=attention,
        chunk_size=4,
    )
    out.mean().backward()
    efficient = grads(model)

    naive = naive_token_losses(model, ids, attention)
    own = torch.full(ids.shape, torch.nan, dtype=naive.dtype)
    own[:, 1:][valid[:, 1:]] = naive.detach()[valid[:, 1:]]
    chosen = select(
        own - ref_loss, ratio, strategy, "batch", valid, torch.Generator().manual_seed(3), soft=soft
    )
    w = chosen[:, 1:].to(naive.dtype)
    loss = (torch.where(w != 0, naive, 0) * w).sum() / w.sum()  # masked (weighted) mean
    loss.backward()

    torch.testing.assert_close(out.mean(), loss.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.n_selected, w.sum())
    if ratio == 1.0:
        assert torch.equal(chosen, valid)
    reference = grads(model)
    assert reference.keys() == efficient.keys() and len(reference) > 0
    for name, g in reference.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(efficient[name], g, rtol=1e-5, atol=1e-12, msg=name)


SYNC_CASES = [  # (strategy, score kind, ratio, scope, soft, units): both head paths, every strategy
    ("topk", "excess", 1.0, "batch", False, 1),  # CLM (the oracle is CLM on another valid mask)
    ("topk", "excess", 0.3, "batch", False, 1),
    ("topk", "excess", 0.6, "sequence", False, 3),
    ("random", "none", 0.3, "sequence", False, 1),
    ("stochastic", "excess", 0.3, "batch", False, 3),
    ("stochastic_positive", "excess", 0.4, "batch", False, 1),
    ("bottomk", "loss", 0.3, "batch", False, 1),
    ("topk", "excess", 0.3, "batch", True, 1),
]


def test_the_sync_counter_sees_value_reads_and_mask_indexing() -> None:
    x = torch.arange(6.0)
    with count_host_syncs() as counts:
        float(x.sum())
        x[x > 2].sum()
        x[x > 4] = 0
        x[torch.tensor([0, 1])] = 1  # an index tensor, not a mask: no sync
    assert sum(counts.values()) == 3, counts


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize(("strategy", "score_kind", "ratio", "scope", "soft", "units"), SYNC_CASES)
def test_the_loss_path_reads_nothing_on_the_host(lora, strategy, score_kind, ratio, scope, soft, units) -> None:
    """On a GPU every read of a value on the host (or shape that depends on the data) waits for the queue to
    drain: the loss, its selection and its backward add none to the model's own forward (transformers reads
    the attention mask, or the position ids for packed sequences)."""
    model = tiny_llama(tied=False, lora=lora)
    ids, attention, valid = batch()
    ref_loss = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 5
    gens = [torch.Generator().manual_seed(m) for m in range(units)]
    rule = selection(strategy, score_kind, ratio, scope=scope, soft=soft)
    with torch.no_grad(), count_host_syncs() as model_own:
        forward_hidden(model, ids, attention)
    with count_host_syncs() as counts:
        out = selective_lm_loss(model, ids, valid, ref_loss, rule, generator=gens, units=units,
                                attention_mask=attention, chunk_size=4)
        out.loss_sum.backward()
    assert counts == model_own
    with count_host_syncs() as counts:
        losses = torch.rand(ids.shape, dtype=torch.float64, requires_grad=True)
        selective_loss_of_losses(torch.where(valid, losses, torch.nan), valid, ref_loss, rule, generator=gens,
                                 units=units).loss_sum.backward()
    assert not counts


def test_non_finite_scores_make_the_loss_nan_or_with_check_finite_raise() -> None:
    """Without a host read a bad score cannot raise: it makes loss_sum NaN, which the trainer reads once per step."""
    model = tiny_llama(tied=True)
    ids, attention, valid = batch()
    ref_loss = torch.zeros(ids.shape, dtype=torch.float64)
    ref_loss[0, 3] = torch.nan  # a valid position
    for ratio in (1.0, 0.3):
        out = selective_lm_loss(model, ids, valid, ref_loss, selection(ratio=ratio), attention_mask=attention)
        assert torch.isnan(out.loss_sum) and out.n_selected > 0
    ref_loss[0, 3] = 0.0
    ref_loss[0, 0] = ref_loss[2, 10] = torch.nan  # not valid: position 0 and padding
    out = selective_lm_loss(model, ids, valid, ref_loss, selection(ratio=0.3), attention_mask=attention)
    assert torch.isfinite(out.loss_sum)
    losses = token_losses(*forward_hidden(model, ids, attention), ids, valid)
    ref_loss[0, 3] = torch.inf
    with pytest.raises(ValueError, match="finite"):
        selective_loss_of_losses(losses, valid, ref_loss, selection(ratio=0.5), check_finite=True)
    assert torch.isnan(selective_loss_of_losses(losses, valid, ref_loss, selection(ratio=0.5)).loss_sum)


def test_selected_loss_sum_of_a_gather_too_small_for_the_weights_is_refused() -> None:
    hidden, ids = torch.randn(2, 5, 4, dtype=torch.float64), torch.randint(7, (2, 5))
    head = nn.Linear(4, 7, bias=False).double()
    weights = torch.zeros(2, 5)
    weights[0, 2], weights[1, 4], weights[1, 1] = 0.5, 2.0, 1.0
    full = selected_loss_sum(hidden, head, ids, weights)
    for size in (3, 5):  # the three rows, then two filler rows of weight 0
        torch.testing.assert_close(selected_loss_sum(hidden, head, ids, weights, size=size), full)
    with pytest.raises(ValueError, match="more than size=2 nonzero weights"):
        selected_loss_sum(hidden, head, ids, weights, size=2)


def test_statistics_of_a_topk_selection() -> None:
    model = tiny_llama(tied=False)
    ids, attention, valid = batch()
    ref_loss = torch.zeros(ids.shape, dtype=torch.float64)
    out = selective_lm_loss(model, ids, valid, ref_loss, selection(ratio=0.5), attention_mask=attention)
    assert out.n_valid == valid.sum() and out.n_selected == round(0.5 * int(valid.sum()) + 1e-9)
    assert out.n_unselected == out.n_valid - out.n_selected
    assert out.score_selected > out.score_unselected  # excess = own loss here: the hardest half
    torch.testing.assert_close(out.loss_selected, out.mean().detach())
    assert out.loss_sum.requires_grad and not out.loss_selected.requires_grad


def test_nothing_valid_gives_zero_loss_that_still_backpropagates() -> None:
    model = tiny_llama(tied=True)
    ids = batch()[0]
    valid = torch.zeros(ids.shape, dtype=torch.bool)
    out = selective_lm_loss(model, ids, valid, selection=selection(score="loss", ratio=0.5))
    out.mean().backward()
    assert out.mean() == 0 and out.n_selected == 0 and torch.isnan(out.score_selected)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_scores_kinds() -> None:
    own = torch.tensor([[torch.nan, 2.0, 3.0]])
    ref = torch.tensor([[torch.nan, 0.5, 4.0]])
    assert scores("excess", own, ref)[0, 1:].tolist() == [1.5, -1.0]
    assert scores("loss", own)[0, 1:].tolist() == [2.0, 3.0]
    assert scores("reference", own, ref)[0, 1:].tolist() == [-0.5, -4.0]
    assert scores("none", own).tolist() == [[0.0, 0.0, 0.0]]


@pytest.mark.parametrize(
    ("kind", "ref", "message"),
    [
        ("exces", torch.zeros(1, 3), "did you mean 'excess'"),
        ("excess", None, "needs reference losses"),
        ("excess", torch.zeros(1, 4), "shape"),
        ("reference", torch.tensor([[0.0, torch.nan, 1.0]]), "NaN at a valid position"),
    ],
)
def test_scores_bad_input(kind: str, ref: torch.Tensor | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        scores(kind, torch.tensor([[torch.nan, 2.0, 3.0]]), ref)


def test_selective_lm_loss_bad_input() -> None:
    model = tiny_llama(tied=True)
    ids = batch()[0]
    with pytest.raises(ValueError, match="position 0"):
        selective_lm_loss(model, ids, torch.ones(ids.shape, dtype=torch.bool), selection=selection(score="loss"))
    with pytest.raises(ValueError, match="by position"):
        selective_lm_loss(model, ids, valid_mask(ids), selection(score="none", ratio=0.5))  # refused when made
    with pytest.raises(ValueError, match="chunk_size"):
        token_losses(torch.zeros(1, 3, 4), nn.Linear(4, 5), torch.zeros(1, 3, dtype=torch.long), chunk_size=0)


def test_loss_path_peak_memory_is_a_few_chunks() -> None:
    # V = 150k, 1024 tokens, chunk 128: full float32 logits are 614 MB, one chunk 77 MB.
    # Measured: 154 MB without grad (logits + log-softmax of one chunk), 240 MB for forward +
    # backward (checkpointed chunks), versus 1853 MB for naive head + cross_entropy + backward.
    vocab, width, tokens, chunk = 150_000, 16, 1024, 128
    head = nn.Linear(width, vocab, bias=False)
    hidden = torch.randn(1, tokens, width, requires_grad=True)
    ids = torch.randint(vocab, (1, tokens))
    full, one_chunk = tokens * vocab * 4, chunk * vocab * 4
    with torch.no_grad():
        no_grad = tensor_peak_bytes(lambda: token_losses(hidden, head, ids, chunk_size=chunk))
    everything = torch.ones(ids.shape, dtype=torch.bool)
    with_grad = tensor_peak_bytes(
        lambda: selected_loss_sum(hidden, head, ids, everything, chunk_size=chunk).backward()
    )
    assert no_grad < 2.5 * one_chunk, no_grad / 1e6
    assert with_grad < 4 * one_chunk < full, with_grad / 1e6
    assert hidden.grad is not None and head.weight.grad is not None
