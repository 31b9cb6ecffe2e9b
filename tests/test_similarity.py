"""Update similarity: known cosines, a naive concatenation reference, and a peft round trip."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn.functional import cosine_similarity

from selective_lm.analysis.similarity import full_delta, lora_delta, update_cosine
from selective_lm.analyze import adapter_delta
from selective_lm.errors import UserError


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _naive(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    common = [k for k in a if k in b]
    flat_a = torch.cat([a[k].reshape(-1).double() for k in common])
    flat_b = torch.cat([b[k].reshape(-1).double() for k in common])
    return float(cosine_similarity(flat_a, flat_b, dim=0))


DELTA = {"q": _randn(4, 3, seed=0), "v": _randn(5, seed=1)}


def test_known_cosines() -> None:
    assert update_cosine(DELTA, DELTA)[0] == pytest.approx(1.0)
    overall, per = update_cosine(DELTA, {k: -v for k, v in DELTA.items()})
    assert overall == pytest.approx(-1.0) and per == pytest.approx({"q": -1.0, "v": -1.0})
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    overall, per = update_cosine({"m": e1, "n": e1}, {"m": e2, "n": e1})
    assert per == {"m": 0.0, "n": 1.0} and overall == pytest.approx(0.5)


def test_matches_naive_concatenation() -> None:
    a = {"q": _randn(8, 6, seed=2), "k": _randn(3, 6, seed=3), "only_a": _randn(2, seed=4)}
    b = {"k": a["k"] + _randn(3, 6, seed=5), "q": 0.1 * a["q"] + _randn(8, 6, seed=6),
         "only_b": _randn(7, seed=7)}
    overall, per = update_cosine(a, b)
    assert overall == pytest.approx(_naive(a, b), abs=1e-12)
    assert set(per) == {"q", "k"}
    for k in per:
        assert per[k] == pytest.approx(_naive({k: a[k]}, {k: b[k]}), abs=1e-12)


def test_zero_norm_is_nan_and_errors() -> None:
    overall, per = update_cosine({"m": torch.zeros(3)}, {"m": torch.ones(3)})
    assert math.isnan(overall) and math.isnan(per["m"])
    with pytest.raises(ValueError, match="no module in common"):
        update_cosine({"a": torch.ones(2)}, {"b": torch.ones(2)})
    with pytest.raises(ValueError, match="shapes"):
        update_cosine({"a": torch.ones(2, 3)}, {"a": torch.ones(3, 2)})


def test_full_delta() -> None:
    base = {"w": torch.ones(2, 2), "b": torch.zeros(2), "ids": torch.arange(3), "gone": torch.ones(1)}
    run = {"w": torch.full((2, 2), 3.0), "b": torch.ones(2, dtype=torch.bfloat16),
           "ids": torch.arange(3) + 1, "new": torch.ones(1)}
    run["tied"] = run["w"]  # a tie (as lm_head/embed_tokens in a live state_dict): counted once
    base["tied"] = base["w"]
    out = full_delta(run, base)
    assert set(out) == {"w", "b"}
    assert torch.equal(out["w"], torch.full((2, 2), 2.0)) and out["b"].dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        full_delta({"w": torch.ones(2)}, {"w": torch.ones(3)})


def test_lora_delta_keys_scale_and_adapters() -> None:
    a, b = _randn(2, 5, seed=30), _randn(3, 2, seed=31)
    saved = {"base_model.model.layer.q_proj.lora_A.weight": a,
             "base_model.model.layer.q_proj.lora_B.weight": b,
             "base_model.model.layer.q_proj.base_layer.weight": torch.ones(3, 5)}
    out = lora_delta(saved, lora_alpha=8, r=2)
    assert list(out) == ["layer.q_proj"]
    torch.testing.assert_close(out["layer.q_proj"], 4.0 * b @ a)
    rs = lora_delta(saved, lora_alpha=8, r=2, use_rslora=True)
    torch.testing.assert_close(rs["layer.q_proj"], 8 / math.sqrt(2) * b @ a)
    # A live model's keys carry the adapter name; several adapters need a choice.
    live = {k.replace(".weight", ".default.weight"): v for k, v in saved.items() if "lora" in k}
    live.update({k.replace(".weight", ".other.weight"): -v for k, v in saved.items() if "lora_A" in k})
    live.update({k.replace(".weight", ".other.weight"): v for k, v in saved.items() if "lora_B" in k})
    with pytest.raises(ValueError, match="adapter_name"):
        lora_delta(live, lora_alpha=8, r=2)
    other = lora_delta(live, lora_alpha=8, r=2, adapter_name="other")
    torch.testing.assert_close(other["layer.q_proj"], -out["layer.q_proj"])
    with pytest.raises(ValueError, match="not"):
        lora_delta(saved, lora_alpha=8, r=4)
    with pytest.raises(ValueError, match="lacks its B"):
        lora_delta({"m.lora_A.weight": a}, lora_alpha=8, r=2)
    with pytest.raises(ValueError, match="unsupported"):
        lora_delta({**saved, "m.lora_magnitude_vector": torch.ones(3)}, lora_alpha=8, r=2)


def test_raw_factor_cosine_is_not_update_cosine() -> None:
    """Why the replication's number misleads: two runs from one seed share A's random start.

    Their B matrices (zero at init) learned unrelated things, so the updates are near-orthogonal,
    yet the raw [A, B] cosine is high because A barely moves. And the factors are only defined
    up to A → G A, B → B G⁻¹: an identical update can have a raw cosine far from 1.
    """
    a = _randn(4, 64, seed=40)
    run1 = {"m.lora_A.weight": a + 0.01 * _randn(4, 64, seed=41), "m.lora_B.weight": 0.01 * _randn(64, 4, seed=42)}
    run2 = {"m.lora_A.weight": a + 0.01 * _randn(4, 64, seed=43), "m.lora_B.weight": 0.01 * _randn(64, 4, seed=44)}
    raw, _ = update_cosine(run1, run2)
    delta, _ = update_cosine(lora_delta(run1, lora_alpha=8, r=4), lora_delta(run2, lora_alpha=8, r=4))
    assert raw > 0.95 and abs(delta) < 0.3

    g = torch.diag(torch.tensor([-1.0, -1.0, -1.0, 1.0]))  # flip 3 of the 4 rank-1 terms' signs
    run3 = {"m.lora_A.weight": g @ run1["m.lora_A.weight"], "m.lora_B.weight": run1["m.lora_B.weight"] @ g.inverse()}
    assert update_cosine(run1, run3)[0] < 0
    assert update_cosine(lora_delta(run1, lora_alpha=8, r=4), lora_delta(run3, lora_alpha=8, r=4))[0] == (
        pytest.approx(1.0))


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("lora_kwargs", [
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "embed_tokens"]},
    {"r": 4, "lora_alpha": 16, "use_rslora": True, "target_modules": "all-linear",
     "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"layers.1.self_attn.o_proj": 3}},
], ids=["plain+embedding", "rslora+patterns"])
def test_adapter_round_trip_matches_merge(tiny_llama, lora_kwargs, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    base_state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(tiny_llama), LoraConfig(init_lora_weights=False, **lora_kwargs))
    live = lora_delta(peft_model.state_dict(), lora_alpha=lora_kwargs["lora_alpha"], r=4,
                      use_rslora=lora_kwargs.get("use_rslora", False),
                      rank_pattern=lora_kwargs.get("rank_pattern"), alpha_pattern=lora_kwargs.get("alpha_pattern"))
    peft_model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin"))

    loaded = adapter_delta(tmp_path)
    merged = peft_model.merge_and_unload().state_dict()
    want = {name: merged[f"{name}.weight"] - base_state[f"{name}.weight"] for name in loaded}
    assert len(loaded) == len(live) > 0 and set(loaded) == set(live)
    for name, delta in loaded.items():
        assert delta.shape == base_state[f"{name}.weight"].shape
        torch.testing.assert_close(delta, want[name], atol=1e-6, rtol=0)
        torch.testing.assert_close(live[name], delta, atol=0, rtol=0)
        assert delta.abs().max() > 0
    # For full fine-tuning the same update is W_run − W_base: the two routes agree.
    full = full_delta(merged, base_state)
    assert update_cosine(loaded, {k.removesuffix(".weight"): v for k, v in full.items()})[0] == pytest.approx(1.0)


def test_load_adapter_missing(tmp_path) -> None:
    with pytest.raises(UserError, match="adapter_config.json"):
        adapter_delta(tmp_path)
