"""`slm bench`: CLM, efficient SLM and the public implementations' SLM side by side, same model and batch.

Everything runs in one process. The variants are timed round-robin (one of each per round, the
first `warmup` rounds discarded), so a load spike on a shared machine hits them all alike; the
figures are the median and the spread (max - min) of the timed rounds.

- `clm`: `selective_lm_loss` at ratio 1, backward, grads / n_selected, clip, AdamW (as `Trainer._step`).
- `slm`: the same with offline scores: top-k 0.6 by excess loss, `ref_loss` given as a tensor.
- `naive`: SLM as public implementations write it: `model(ids).logits`, `cross_entropy(reduction="none")`,
  a no-grad reference forward pass inside every step, top-k mask, masked mean, backward, AdamW.
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

import gc
import resource
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from .config import Config, ModelConfig
from .errors import UserError, did_you_mean
from .files import write_json
from .frozen import model_token_losses
from .layout import OutDir
from .loss import forward_hidden, selective_lm_loss, valid_mask
from .models import apply_lora, load_model, load_tokenizer

LARGE_VOCAB_MODEL = "random:tiny-llama"  # hidden 64, 2 layers: the loss path dominates the step
TRAIN_VARIANTS = ("clm", "slm", "naive")
PASS_VARIANTS = ("score", "forward", "backbone")
_MB = 1e6


# ---------------------------------------------------------------------------- memory


def tensor_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the CPU allocator's running total while `fn` runs, from the profiler's allocation events.

    Every tensor allocation and free is an event carrying the running total, so the maximum is
    the exact peak of live tensor memory allocated inside `fn`; tensors that existed before are
    not counted. Deterministic, unlike RSS, which moves by tens of MB between identical steps.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    stack, peak = list(prof.profiler.kineto_results.experimental_event_tree()), 0
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            peak = max(peak, node.extra_fields.total_allocated)
    return peak


def peak_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Memory allocated by `fn` above what was allocated before it, at its peak, in MB."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / _MB
    return tensor_peak_bytes(fn) / _MB


# ---------------------------------------------------------------------------- the variants


def _autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA (the trainer's mixed precision there), disabled on CPU (float32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _optimizer_step(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, n_selected: float) -> None:
    """The trainer's step after backward: grads / n_selected, clip to 1, AdamW, zero."""
    for p in params:
        if p.grad is not None:
            p.grad.div_(max(n_selected, 1.0))
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _naive_losses(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """`[B, T-1]` losses of targets 1..T-1 the textbook way: full logits, shift, cross_entropy(reduction="none")."""
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none").view(
        ids.shape[0], -1
    )


def _variants(
    student: torch.nn.Module, frozen: torch.nn.Module, ids: torch.Tensor, ref_loss: torch.Tensor,
    ratio: float, chunk_size: int,
) -> dict[str, Callable[[], Any]]:
    """One step / pass of each variant on the same batch, as closures."""
    device = ids.device
    valid = valid_mask(ids)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def train(score_kind: str, r: float) -> None:
        with _autocast(device):
            out = selective_lm_loss(student, ids, valid, ref_loss, score_kind=score_kind, ratio=r,
                                    strategy="topk", chunk_size=chunk_size)
        out.loss_sum.backward()
        _optimizer_step(params, opt, float(out.n_selected))

    def naive() -> None:
        with _autocast(device):
            own = _naive_losses(student, ids)
            with torch.no_grad():
                ref = _naive_losses(frozen, ids)
            excess = (own.detach() - ref).flatten()
            mask = torch.zeros_like(excess)
            mask[torch.topk(excess, max(1, int(ratio * excess.numel()))).indices] = 1.0
            loss = (own.flatten() * mask).sum()
        loss.backward()
        _optimizer_step(params, opt, float(mask.sum()))

    @torch.no_grad()
    def forward() -> None:
        with _autocast(device):
            frozen(input_ids=ids, use_cache=False)

    @torch.no_grad()
    def backbone() -> None:
        with _autocast(device):
            forward_hidden(frozen, ids)

    return {
        "clm": lambda: train("none", 1.0),
        "slm": lambda: train("excess", ratio),
        "naive": naive,
        "score": lambda: model_token_losses(frozen, ids, valid, chunk_size),
        "forward": forward,
        "backbone": backbone,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(
    model_cfg: ModelConfig, vocab_size: int, device: torch.device, settings: Mapping[str, Any], chunk_size: int
) -> dict[str, Any]:
    """Time and measure every variant on one model (LoRA student + frozen copy) and one random batch."""
    torch.manual_seed(0)
    frozen = load_model(model_cfg, vocab_size=vocab_size).to(device).eval().requires_grad_(False)
    base = load_model(model_cfg, vocab_size=vocab_size)
    student = (apply_lora(base, model_cfg) if model_cfg.lora else base.requires_grad_(True)).to(device).train()
    b, t = settings["batch_size"], settings["block_len"]
    ids = torch.randint(vocab_size, (b, t), generator=torch.Generator().manual_seed(0)).to(device)
    ref_loss = model_token_losses(frozen, ids, valid_mask(ids), chunk_size)  # offline scores, as from the store
    fns = _variants(student, frozen, ids, ref_loss, settings["ratio"], chunk_size)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(settings["warmup"] + settings["steps"]):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_ >= settings["warmup"]:
                times[name].append(time.perf_counter() - start)
    peaks = {name: peak_mb(fn, device) for name, fn in fns.items() if name != "backbone"}
    n_tokens = b * t
    result: dict[str, Any] = {}
    for name in fns:
        med = statistics.median(times[name])
        entry = {"step_s": med, "step_s_spread": max(times[name]) - min(times[name]), "step_s_all": times[name]}
        if name in PASS_VARIANTS:
            entry["tokens_per_s"] = n_tokens / med
        if name in peaks:
            entry["peak_mb"] = peaks[name]
        result[name] = entry
    vocab = frozen.get_output_embeddings().weight.shape[0]
    result.update(
        model=model_cfg.name, lora=model_cfg.lora, vocab_size=vocab, batch_size=b, block_len=t, tokens=n_tokens,
        chunk_size=chunk_size, ratio=settings["ratio"],
        logits_mb=n_tokens * vocab * (2 if device.type == "cuda" else 4) / _MB,
        rss_max_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
        params_mb=sum(p.numel() * p.element_size() for p in frozen.parameters()) / _MB,
    )
    return result


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
        case = main if which == "main" else large
        if case is None:
            continue
        value = measure(cases[case])
        ok = None if value is None else (value <= threshold if at_most else value >= threshold)
        out[name] = {"case": case, "rule": f"{rule} {'<=' if at_most else '>='} {threshold:g}", "value": value,
                     "threshold": threshold, "pass": ok}
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(result: Mapping[str, Any]) -> str:
    """The bench as a plain-text table (the README's Performance section quotes it)."""
    lines = [f"device: {result['device']}"]
    for name, c in result["cases"].items():
        lines.append(f"\n{name}: {c['model']}, vocab {c['vocab_size']}, batch {c['batch_size']} x {c['block_len']}, "
                     f"chunk {c['chunk_size']}, full logits {c['logits_mb']:.0f} MB")
        lines.append(f"  {'variant':<9}{'step s':>9}{'spread':>9}{'tokens/s':>10}{'peak MB':>9}")
        for v in (*TRAIN_VARIANTS, *PASS_VARIANTS):
            e = c[v]
            lines.append(f"  {v:<9}{e['step_s']:>9.3f}{e['step_s_spread']:>9.3f}"
                         f"{_fmt(e.get('tokens_per_s'), '.0f'):>10}{_fmt(e.get('peak_mb'), '.0f'):>9}")
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
    result = {"device": where, "torch": torch.__version__, "settings": s, "cases": cases,
              "targets": targets(cases, main, large, cfg.bench.targets)}
    for name in cfg.bench.cases:
        result[name] = SIDE_CASES[name](cfg, OutDir.of(out))
    path = OutDir.of(out).bench
    write_json(path, result)
    print(format_table(result))
    return {"bench": str(path), "targets": {k: t["pass"] for k, t in result["targets"].items()}}


# ---------------------------------------------------------------------------- side cases

# `bench.cases`: name -> case(cfg, out) -> its bench.json entry (under its own name, beside `cases`).
SIDE_CASES: dict[str, Callable[[Config, OutDir], dict[str, Any]]] = {}
