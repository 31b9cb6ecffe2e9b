"""`slm bench`: CLM, efficient SLM and the public implementations' SLM side by side, same model and batch.

Everything runs in one process. The variants are timed round-robin (one of each per round, the
first `warmup` rounds discarded), so a load spike on a shared machine hits them all alike; the
figures are the median and the spread (max - min) of the timed rounds.

- `clm`: `selective_lm_loss` at ratio 1, backward, grads / n_selected, clip, AdamW (as `Trainer.step`).
- `slm`: the same with offline scores: top-k 0.6 by excess loss, `ref_loss` given as a tensor.
- `naive`: SLM as public implementations write it: `model(ids).logits`, `cross_entropy(reduction="none")`,
  a no-grad reference forward pass inside every step, top-k mask, masked mean, backward, AdamW.
- one variant per registered objective besides cross-entropy, named after it. For `distill`: a no-grad
  reference forward to its hidden states, then CE + KL(reference || student) on every token through both
  heads a chunk at a time. Against `clm` it is the cost of computing the reference's logits online, the
  most a cache of them could save.
- `score`: `scoring.model_token_losses` on the frozen merged model (a plain causal LM) in tokens/s.
- `forward`: `model(ids)` under no_grad on the same frozen model: the full Hugging Face forward,
  logits included, no loss. The head belongs to "the same model"; scoring cannot be compared with
  a forward that skips it, because every loss needs the logits. `backbone` (hidden states only,
  no head) is reported too, to show what the head costs.

Memory, `peak_mb`: the peak above what was allocated just before one (warmed-up) step or pass,
so weights, optimizer state and the reference model are not counted, only what the step
allocates. On CUDA: `max_memory_allocated` after a reset. On CPU: the exact peak of live tensor
memory from the profiler's allocation events (`tensor_peak_bytes`); the RSS high-water mark was
tried first and moved by tens of MB between identical steps, more than the differences it had
to resolve. The process's RSS high-water mark is reported as `rss_max_mb`.

Inputs are random token ids of the model's vocabulary: no `slm prepare` needed, and the speed of
each variant does not depend on the text.
"""


from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import Config, ModelConfig
from ..errors import UserError, did_you_mean
from ..files import write_json
from ..store.layout import OutDir
from ..training.models import load_tokenizer
from .overhead import overhead
from .side import gpu, precision, prepare_case
from .steps import LARGE_VOCAB_MODEL, PASS_VARIANTS, TRAIN_VARIANTS, peak_mb, run_case, tensor_peak_bytes

# `bench.cases`: name -> case(cfg, out) -> its bench.json entry (under its own name, beside `cases`).
SIDE_CASES: dict[str, Callable[[Config, OutDir], dict[str, Any]]] = {
    "precision": precision, "prepare": prepare_case, "overhead": overhead, "gpu": gpu}

# ---------------------------------------------------------------------------- targets and report


# What each target measures: (case, the measured ratio, whether the threshold is an upper bound, rule text).
_TARGETS: dict[str, tuple[str, Callable[[Mapping[str, Any]], float | None], bool, str]] = {
    "slm_step_vs_clm": ("main", lambda c: _ratio(c["slm"]["step_s"], c["clm"]["step_s"]), True,
                        "slm.step_s / clm.step_s"),
    "naive_step_vs_slm": ("main", lambda c: _ratio(c["naive"]["step_s"], c["slm"]["step_s"]), False,
                          "naive.step_s / slm.step_s"),
    "score_vs_forward": ("main", lambda c: _ratio(c["score"]["tokens_per_s"], c["forward"]["tokens_per_s"]), False,
                         "score.tokens_per_s / forward.tokens_per_s"),
    "slm_peak_vs_clm": ("main", lambda c: _ratio(c["slm"]["peak_mb"], c["clm"]["peak_mb"]), True,
                        "slm.peak_mb / clm.peak_mb"),
    "loss_path_peak_vs_logits": (
        "large", lambda c: _ratio(max(c[v]["peak_mb"] for v in ("clm", "slm", "score")), c["logits_mb"]), True,
        "max(clm, slm, score).peak_mb / logits_mb (whole step: an upper bound of the loss path)"),
    # A side case's target: checked when `bench.cases` runs it and it was not skipped.
    "prepare_vs_bare": ("prepare", lambda c: c["runs"]["1_proc"]["vs_bare"], False,
                        "prepare.runs.1_proc.vs_bare (tokens/s of prepare, 1 process, no noise / bare tokenizer)"),
    "overhead_step_vs_bare": ("overhead", lambda c: c.get("step_vs_bare"), True,
                              "overhead.trainer_step_s / overhead.bare_step_s"),
    "overhead_extra_syncs": ("overhead", lambda c: c.get("extra_syncs_per_step"), True,
                             "overhead.extra_syncs_per_step (host syncs of the trainer beyond the bare loop)"),
    "gpu_clm_mfu": ("gpu", lambda c: c.get("clm", {}).get("mfu"), False, "gpu.clm.mfu"),
    "gpu_slm_mfu": ("gpu", lambda c: c.get("slm", {}).get("mfu"), False, "gpu.slm.mfu"),
    "gpu_slm_step_vs_clm": ("gpu", lambda c: _ratio(c.get("slm", {}).get("step_s"), c.get("clm", {}).get("step_s")),
                            True, "gpu.slm.step_s / gpu.clm.step_s"),
    "gpu_score_vs_forward": ("gpu", lambda c: _ratio(c.get("score", {}).get("tokens_per_s"),
                                                     c.get("forward", {}).get("tokens_per_s")), False,
                             "gpu.score.tokens_per_s / gpu.forward.tokens_per_s"),
    "score_f16_topk_agreement": ("precision", lambda c: min(c["agreement"]["float16"].values(), default=None)
                                 if "agreement" in c else None, False,
                                 "min over ratios of precision.agreement.float16 (top-k selections kept)"),
}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def targets(cases: Mapping[str, Mapping[str, Any]], main: str, large: str | None,
            thresholds: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """Each target of `bench.targets` with its measured value, threshold and verdict (None when not measurable)."""
    out = {}
    for name, threshold in thresholds.items():
        if name not in _TARGETS:
            raise UserError(f"unknown bench target {name!r}{did_you_mean(name, _TARGETS)} "
                            f"(bench.targets: {', '.join(_TARGETS)})")
        which, measure, at_most, rule = _TARGETS[name]
        case = {"main": main, "large": large}.get(which, which)
        if case is None or case not in cases:
            continue
        value = measure(cases[case])
        ok = None if value is None else (value <= threshold if at_most else value >= threshold)
        out[name] = {"case": case, "rule": f"{rule} {'<=' if at_most else '>='} {threshold:g}", "value": value,
                     "threshold": threshold, "pass": ok}
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(result: Mapping[str, Any]) -> str:
    """The bench as a plain-text table (docs/performance.md quotes it)."""
    lines = [f"device: {result['device']}"]
    step_cases = {**result["cases"], **{k: v for k, v in result.items() if isinstance(v, dict) and "clm" in v}}
    for name, c in step_cases.items():
        lines.append(f"\n{name}: {c['model']}, vocab {c['vocab_size']}, batch {c['batch_size']} x {c['block_len']}, "
                     f"chunk {c['chunk_size']}, full logits {c['logits_mb']:.0f} MB")
        lines.append(f"  {'variant':<9}{'step s':>9}{'spread':>9}{'tokens/s':>10}{'peak MB':>9}{'MFU':>7}")
        for v in (*TRAIN_VARIANTS, *PASS_VARIANTS):
            e = c[v]
            lines.append(f"  {v:<9}{e['step_s']:>9.3f}{e['step_s_spread']:>9.3f}"
                         f"{_fmt(e.get('tokens_per_s'), '.0f'):>10}{_fmt(e.get('peak_mb'), '.0f'):>9}"
                         f"{_fmt(e.get('mfu'), '.1%'):>7}")
    lines.append("\ntargets:")
    for name, t in result["targets"].items():
        verdict = {True: "pass", False: "FAIL", None: "n/a"}[t["pass"]]
        lines.append(f"  {name:<26}{_fmt(t['value'], '.3f'):>7}  ({t['rule']})  {verdict}")
    return "\n".join(lines)


def case_name(model_cfg: ModelConfig) -> str:
    """`smollm2-lora` for the default; otherwise the model's last name component and lora/full."""
    short = model_cfg.name.rsplit("/", 1)[-1].rsplit(":", 1)[-1].removesuffix("-135m")
    return f"{short}-{'lora' if model_cfg.lora else 'full'}"


def bench(cfg: Config, out: str | Path | OutDir) -> dict[str, Any]:
    """Run the bench on `cfg.model` and the large-vocab case; write `out/bench.json`, print the table.

    Settings come from the `bench` config section. Returns the path and the targets' verdicts
    only (the CLI prints the return value after the table).
    """
    s = cfg.bench.model_dump()
    for name in cfg.bench.cases:
        if name not in SIDE_CASES:
            raise UserError(f"unknown bench case {name!r}{did_you_mean(name, SIDE_CASES)} "
                            f"(bench.cases: {', '.join(SIDE_CASES)})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chunk = cfg.scoring.chunk_size
    main = case_name(cfg.model)
    cases = {main: run_case(cfg.model, len(load_tokenizer(cfg.model)), device, s, chunk)}
    large = None
    if s["large_vocab"]:
        large = "large-vocab"
        large_cfg = cfg.model.model_copy(update={"name": LARGE_VOCAB_MODEL, "tokenizer": None})
        cases[large] = run_case(large_cfg, s["large_vocab"], device, s, chunk)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    result = {"device": where, "torch": torch.__version__, "settings": s, "cases": cases}
    for name in cfg.bench.cases:
        result[name] = SIDE_CASES[name](cfg, OutDir.of(out))
    side = {name: result[name] for name in cfg.bench.cases}
    result["targets"] = targets({**cases, **side}, main, large, cfg.bench.targets)
    path = OutDir.of(out).bench
    write_json(path, result)
    print(format_table(result))
    return {"bench": str(path), "targets": {k: t["pass"] for k, t in result["targets"].items()}}


__all__ = ["PASS_VARIANTS", "SIDE_CASES", "TRAIN_VARIANTS", "bench", "format_table", "gpu", "overhead", "peak_mb",
           "precision", "prepare_case", "run_case", "targets", "tensor_peak_bytes"]
