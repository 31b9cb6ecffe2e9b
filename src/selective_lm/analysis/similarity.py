"""How similar are the weight updates of two runs? Cosine of ΔW, not of raw LoRA factors.

The cs512 replication compared the raw LoRA `A`/`B` matrices. Runs started from the same seed
share `A`'s random initialisation, which dominates those matrices, and the factors are only
defined up to `A → G·A, B → B·G⁻¹`; so their cosine mostly measures the shared start. The
update a run actually applies to the model is `ΔW = scale · B @ A` per module (LoRA) or
`W_run − W_base` (full fine-tuning), and that is what is compared here.

A *delta* is a `dict[name, Tensor]`: LoRA deltas are keyed by module path as in the base model
(`model.layers.0.self_attn.q_proj`), full deltas by parameter name (`….q_proj.weight`).
Cosines are computed in float64, module by module, without concatenating the model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["full_delta", "lora_delta", "lora_delta_from_config", "update_cosine"]

# peft keys: `<prefix><module>.lora_A[.<adapter>].weight` (Linear; the adapter name is present
# in a live model's state_dict and dropped on save) or `<module>.lora_embedding_A[.<adapter>]`.
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?:(?P<lin>lora_[AB])(?:\.(?P<ad1>[^.]+))?\.weight"
    r"|(?P<emb>lora_embedding_[AB])(?:\.(?P<ad2>[^.]+))?)$"
)
_PEFT_PREFIX = "base_model.model."


def _pattern_value(pattern: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """peft's rank/alpha_pattern lookup: the first key that matches the end of the module path."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _lora_factors(
    state_dict: Mapping[str, Tensor], adapter_name: str | None
) -> tuple[dict[str, dict[str, Tensor]], set[str]]:
    """(module path -> {"A": [r, in], "B": [out, r]}, the modules that are embeddings) of one adapter."""
    found: dict[str, dict[str, Tensor]] = {}
    embeddings: set[str] = set()
    adapters: set[str] = set()
    for key, value in state_dict.items():
        m = _LORA_KEY.match(key)
        if m is None:
            if ".lora_" in key:
                raise ValueError(f"unsupported LoRA parameter {key!r} (only plain LoRA: no DoRA or LoRA bias)")
            continue  # base weights, modules_to_save, ...: not part of the low-rank update
        adapter = m["ad1"] or m["ad2"]
        if adapter is not None:
            adapters.add(adapter)
            if adapter_name is not None and adapter != adapter_name:
                continue
        kind = m["lin"] or m["emb"]
        module = m["module"].removeprefix(_PEFT_PREFIX)
        found.setdefault(module, {})[kind[-1]] = value
        if m["emb"]:
            embeddings.add(module)
    if adapter_name is None and len(adapters) > 1:
        raise ValueError(f"state_dict holds adapters {sorted(adapters)}; pass adapter_name")
    return found, embeddings


def lora_delta(
    state_dict: Mapping[str, Tensor],
    *,
    lora_alpha: float,
    r: int,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    fan_in_fan_out: bool = False,
    adapter_name: str | None = None,
) -> dict[str, Tensor]:
    """ΔW = scale · B @ A for every LoRA module of a peft state dict; float32, keyed by module path.

    state_dict: a saved adapter (`…q_proj.lora_A.weight`) or a live PeftModel's state_dict
    (`…q_proj.lora_A.default.weight`); the `base_model.model.` prefix is dropped. A: `[r, in]`,
    B: `[out, r]`, ΔW: `[out, in]`, the base weight's shape (transposed for embeddings and
    `fan_in_fan_out` layers, as peft does). scale = alpha / r, or alpha / sqrt(r) with
    rsLoRA, with r and alpha per module from `rank_pattern`/`alpha_pattern` as in peft; each
    module's A must have that many rows. adapter_name picks one adapter of a live model that
    holds several. Non-LoRA keys are ignored; DoRA, LoRA bias and conv layers raise ValueError.
    """
    factors, embeddings = _lora_factors(state_dict, adapter_name)
    deltas: dict[str, Tensor] = {}
    for module, f in factors.items():
        if "A" not in f or "B" not in f:
            raise ValueError(f"LoRA module {module!r} lacks its {'B' if 'A' in f else 'A'} matrix")
        a, b = f["A"].detach().float(), f["B"].detach().float()
        rank = _pattern_value(rank_pattern, module, r)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(
                f"LoRA module {module!r}: A {tuple(a.shape)}, B {tuple(b.shape)} are not [{rank}, in], [out, {rank}]"
            )
        alpha = _pattern_value(alpha_pattern, module, lora_alpha)
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        delta = (b @ a) * scale
        # peft stores embedding factors transposed; Conv1D (fan_in_fan_out) weights are [in, out].
        deltas[module] = delta.T if (module in embeddings or fan_in_fan_out) else delta
    return deltas


def lora_delta_from_config(state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """`lora_delta` with r, alpha, rsLoRA, patterns and fan_in_fan_out read from a peft
    `adapter_config.json` dict (or `LoraConfig.to_dict()`)."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"not a LoRA adapter: peft_type {config['peft_type']!r}")
    if config.get("use_dora"):
        raise ValueError("DoRA adapters are not supported: their update is not scale · B @ A")
    return lora_delta(
        state_dict,
        lora_alpha=config["lora_alpha"],
        r=config["r"],
        use_rslora=bool(config.get("use_rslora", False)),
        rank_pattern=config.get("rank_pattern"),
        alpha_pattern=config.get("alpha_pattern"),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
    )


def full_delta(run_state: Mapping[str, Tensor], base_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """W_run − W_base (float32) for every floating-point tensor present in both state dicts.

    A name whose shapes differ raises ValueError (the two are not the same architecture, and
    dropping e.g. a resized embedding would silently change the cosine). Tensors tied to one
    already seen (the same storage, e.g. `lm_head.weight` and `embed_tokens.weight` in a live
    model's state_dict) are counted once, under their first name.
    """
    deltas: dict[str, Tensor] = {}
    seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
    for name, run in run_state.items():
        base = base_state.get(name)
        if base is None or not (run.is_floating_point() and base.is_floating_point()):
            continue
        if run.shape != base.shape:
            raise ValueError(f"{name}: run shape {tuple(run.shape)} != base shape {tuple(base.shape)}")
        # Same address, shape and strides = the same memory (a tie), not just a shared buffer.
        ident = (run.data_ptr(), tuple(run.shape), run.stride())
        if run.numel() and ident in seen:
            continue
        seen.add(ident)
        deltas[name] = run.detach().float() - base.detach().float()
    return deltas


def _cosine(dot: float, sq_a: float, sq_b: float) -> float:
    """dot / (|a| |b|) clipped to [-1, 1] against rounding; NaN when either norm is zero
    (an update that did not move has no direction)."""
    if sq_a == 0.0 or sq_b == 0.0:
        return math.nan
    return max(-1.0, min(1.0, dot / math.sqrt(sq_a * sq_b)))


def _flat64(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).to(torch.float64)


def update_cosine(
    delta_a: Mapping[str, Tensor], delta_b: Mapping[str, Tensor]
) -> tuple[float, dict[str, float]]:
    """Cosine of two updates over the modules both contain, and per module.

    The overall value equals the cosine of the two flattened concatenations of the common
    modules (in `delta_a`'s order), accumulated as Σ dot / sqrt(Σ|a|² Σ|b|²) so no model-sized
    vector is built. Zero norm → NaN (see `_cosine`). ValueError when no module is common or a
    common module's shapes differ; modules in only one delta are ignored.
    """
    common = [name for name in delta_a if name in delta_b]
    if not common:
        raise ValueError("the two deltas have no module in common")
    dot = sq_a = sq_b = 0.0
    per_module: dict[str, float] = {}
    for name in common:
        a, b = delta_a[name], delta_b[name]
        if a.shape != b.shape:
            raise ValueError(f"{name}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
        va, vb = _flat64(a), _flat64(b)
        d, na, nb = float(va @ vb), float(va @ va), float(vb @ vb)
        per_module[name] = _cosine(d, na, nb)
        dot, sq_a, sq_b = dot + d, sq_a + na, sq_b + nb
    return _cosine(dot, sq_a, sq_b), per_module
