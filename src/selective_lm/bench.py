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
import itertools
import json
import os
import resource
import shutil
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from .config import Config, DataConfig, ModelConfig
from .corpora import CORPORA
from .data import BATCH_DOCS, prepare
from .errors import UserError, did_you_mean
from .files import atomic_path, write_json
from .frozen import encode_losses, model_token_losses
from .layout import SCORE_STORAGE, OutDir, decode_scores
from .loss import forward_hidden, selective_lm_loss, valid_mask
from .models import apply_lora, load_model, load_tokenizer, tokenizer_fingerprint
from .selection import scores, select

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
    emb, head = frozen.get_input_embeddings().weight, frozen.get_output_embeddings().weight
    result.update(
        # Weights used in matmuls (an untied input embedding is a lookup), layers, width: for model FLOPs.
        matmul_params=sum(p.numel() for p in frozen.parameters()) - (0 if head is emb else emb.numel()),
        layers=frozen.config.num_hidden_layers, hidden=frozen.config.hidden_size,
    )
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
    # A side case's target: checked when `bench.cases` runs it and it was not skipped.
    "prepare_vs_bare": ("prepare", lambda c: c["runs"]["1_proc"]["vs_bare"], False,
                        "prepare.runs.1_proc.vs_bare (tokens/s of prepare, 1 process, no noise / bare tokenizer)"),
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
    """The bench as a plain-text table (the README's Performance section quotes it)."""
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


# ---------------------------------------------------------------------------- side cases

# `bench.cases`: name -> case(cfg, out) -> its bench.json entry (under its own name, beside `cases`).
SIDE_CASES: dict[str, Callable[[Config, OutDir], dict[str, Any]]] = {}


PRECISION_RATIOS = (0.5, 0.3)
HALF_DTYPES = ("float16", "bfloat16")


def precision(cfg: Config, out: OutDir) -> dict[str, Any]:
    """What storing reference losses in half precision (`scoring.dtype`) changes, on the data of `out`.

    On `bench.precision_blocks` scored train blocks: the share of the tokens that top-k selects from the
    float32 reference losses that it also selects from their float16 / bfloat16 roundings, selecting as
    training does at step 0 (excess loss = losses of the base model `cfg.model` minus reference losses,
    per batch of `train.batch_size` blocks, `train.scope`). And the bytes per billion tokens of the score
    store in each dtype and of the token store, from the files' sizes. Skipped (with the commands that
    make them) without a train token store and a float32 score store of this model.
    """
    make = f"make them with `slm run --out {out}` (or `slm prepare`, `slm reference`, `slm score --out {out}`)"
    if not out.store_dir("train").is_dir() or not out.has_scores("train"):
        return {"skipped": f"no train token store and score store in {out}: {make}"}
    if (stored := out.score_dtype("train")) != "float32":
        return {"skipped": f"the score store in {out} is {stored}, the case compares with float32: rerun "
                           f"`slm score --out {out} scoring.dtype=float32`"}
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    try:
        store = out.store("train")
        ref = out.scores("train", store, tokenizer_fingerprint(tokenizer), "float32")
    except UserError as e:
        return {"skipped": f"{e} ({make})"}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(cfg.model, vocab_size=len(tokenizer)).to(device).eval().requires_grad_(False)
    rows = out.scored_blocks("train", cfg.bench.precision_blocks * store.block_len)
    if not len(rows):
        return {"skipped": f"the score store in {out} covers no block: rerun `slm score --out {out}`"}
    kept = {d: dict.fromkeys(PRECISION_RATIOS, 0) for d in HALF_DTYPES}
    selected = dict.fromkeys(PRECISION_RATIOS, 0)
    max_error = dict.fromkeys(HALF_DTYPES, 0.0)
    for i in range(0, len(rows), cfg.train.batch_size):
        batch = rows[i : i + cfg.train.batch_size]
        ids = torch.from_numpy(np.asarray(store.tokens[batch], dtype=np.int64)).to(device)
        valid = torch.from_numpy(store.targets(batch, cfg.data.doc_boundaries)).to(device)  # the trainer's targets
        own = model_token_losses(model, ids, valid, cfg.scoring.chunk_size)
        ref32 = torch.from_numpy(np.asarray(ref[batch]))
        refs = {d: torch.from_numpy(decode_scores(encode_losses(ref32, d), d)) for d in HALF_DTYPES}
        for d, low in refs.items():  # NaN (position 0, unscored) on both sides: no error
            max_error[d] = max(max_error[d], float(torch.nan_to_num((low - ref32).abs(), nan=0.0).max()))
        for ratio in PRECISION_RATIOS:
            base = select(scores("excess", own, ref32.to(device)), ratio, "topk", cfg.train.scope, valid)
            selected[ratio] += int(base.sum())
            for d, low in refs.items():
                chosen = select(scores("excess", own, low.to(device)), ratio, "topk", cfg.train.scope, valid)
                kept[d][ratio] += int((chosen & base).sum())
    n_tokens = int(store.meta["n_tokens"])
    positions = store.n_blocks * store.block_len
    header = (out.scores_dir("train") / "ref_loss.npy").stat().st_size - positions * 4
    token_bytes = sum(f.stat().st_size for f in out.store_dir("train").glob("*.npy"))
    return {
        "model": cfg.model.name, "blocks": len(rows), "block_len": store.block_len,
        "batch_size": cfg.train.batch_size, "scope": cfg.train.scope,
        "agreement": {d: {str(r): kept[d][r] / max(selected[r], 1) for r in PRECISION_RATIOS} for d in HALF_DTYPES},
        "max_abs_error": max_error,
        "score_bytes_per_billion_tokens": {d: (header + positions * SCORE_STORAGE[d].itemsize) * 1e9 / n_tokens
                                           for d in SCORE_STORAGE},
        "token_store_bytes_per_billion_tokens": token_bytes * 1e9 / n_tokens,
        "seconds": time.perf_counter() - start,
    }


SIDE_CASES["precision"] = precision


# Dense bf16 peak TFLOPS by device-name fragment (first match wins): the MFU denominator of case gpu.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0}


def gpu(cfg: Config, out: OutDir) -> dict[str, Any]:
    """Case gpu: tokens/s and model-FLOPs utilisation of CLM, SLM and naive steps and of scoring, at scale.

    A randomly initialised TinyLlama-1.1B-shaped Llama (`bench.gpu_model`), full fine-tuning,
    bf16 autocast on CUDA, batch `bench.gpu_batch_size` x `bench.gpu_block_len`, through
    `run_case` (the same variants as the step cases). Model FLOPs per token (PaLM's count): 6N +
    12 L d T for a training step, 2N + 4 L d T for a forward pass, N the matmul weights; SLM counts
    the FLOPs of the model on every token fed (the useful work is the same sequence). MFU needs the
    device's peak: `bench.gpu_peak_tflops`, else PEAK_BF16_TFLOPS by name.
    """
    b = cfg.bench
    if not torch.cuda.is_available() and not b.gpu_on_cpu:
        return {"skipped": "no CUDA device: run `slm bench bench.cases=[gpu]` on a GPU machine"}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_cfg = cfg.model.model_copy(update={"name": b.gpu_model, "tokenizer": None, "lora": False})
    settings = {**b.model_dump(), "batch_size": b.gpu_batch_size, "block_len": b.gpu_block_len}
    case = run_case(model_cfg, b.gpu_vocab, device, settings, cfg.scoring.chunk_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = b.gpu_peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    attention = case["layers"] * case["hidden"] * case["block_len"]
    flops = {"train": 6 * case["matmul_params"] + 12 * attention, "pass": 2 * case["matmul_params"] + 4 * attention}
    for v in (*TRAIN_VARIANTS, *PASS_VARIANTS):
        entry = case[v]
        entry["tokens_per_s"] = case["tokens"] / entry["step_s"]
        per_token = flops["train"] if v in TRAIN_VARIANTS else flops["pass"]
        entry["mfu"] = entry["tokens_per_s"] * per_token / (peak * 1e12) if peak and v != "backbone" else None
    return {**case, "model_flops_per_token": flops, "peak_tflops": peak}


SIDE_CASES["gpu"] = gpu


PREPARE_RUNS = {"1_proc": (0.0, 1), "2_proc": (0.0, 2), "noise_1_proc": (0.2, 1), "noise_2_proc": (0.2, 2)}
# name -> (data.noise_rate, data.num_proc) of each timed `prepare` of case prepare


def prepare_case(cfg: Config, out: OutDir) -> dict[str, Any]:
    """Case prepare: tokens/s of `slm prepare` beside the bare tokenizer on the same texts.

    The corpus: the embedded CHAMP corpus's train documents (model-written solutions), cycled to
    about `bench.prepare_tokens` tokens of `cfg.model`'s tokenizer, written once as JSONL under
    `bench/` and reused; `data.corpus=custom` streams it through `datasets`, as a user's corpus.
    `bare`: `tokenizer(texts, add_special_tokens=False)` on batches of data.BATCH_DOCS texts in this
    process and nothing else: the ceiling. Each of PREPARE_RUNS is the real `prepare` of the train
    split into a throwaway store, timed from the call, so loading the tokenizer and opening the
    dataset count (`setup_s`, a prepare of one block after a warm-up one, is what they cost).
    `vs_bare`: tokens/s (tokens written) over bare's. Bare and every run are timed round-robin for
    `bench.prepare_rounds` rounds and the medians kept (`s_all` has every round): one pass of a few
    seconds moved by 20 % between identical rounds here. `same_store`: whether the stores of a noise
    rate are identical for every num_proc (they must be). Peak memory is not measured here: it would
    be this process's, models included; tests/test_data.py measures prepare's on a large corpus.
    """
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    corpus = _prepare_corpus(tokenizer, cfg.bench.prepare_tokens, out.bench_dir)
    with corpus.open() as f:
        texts = [json.loads(line)["text"] for line in f]

    def bare() -> tuple[float, int]:
        t = time.perf_counter()
        n = sum(len(ids) for i in range(0, len(texts), BATCH_DOCS)
                for ids in tokenizer(texts[i:i + BATCH_DOCS], add_special_tokens=False)["input_ids"])
        return time.perf_counter() - t, n

    scratch = out.bench_dir / "prepare-store"

    def timed(noise_rate: float, num_proc: int, cap: int | None = None) -> tuple[float, dict[str, Any]]:
        data = cfg.data.model_copy(update={"corpus": "custom", "sources": {"train": str(corpus)}, "max_tokens": cap,
                                           "noise_rate": noise_rate, "num_proc": num_proc})
        shutil.rmtree(scratch, ignore_errors=True)  # else prepare would reuse the store of the last run
        t = time.perf_counter()
        prepare(cfg.model_copy(update={"data": data}), scratch, splits=["train"])
        return time.perf_counter() - t, OutDir.of(scratch).store("train").meta

    try:
        setup_s = min(timed(0.0, 1, cfg.data.block_len)[0] for _ in range(2))  # the first imports datasets
        times: dict[str, list[float]] = {name: [] for name in ("bare", *PREPARE_RUNS)}
        metas: dict[str, dict[str, Any]] = {}
        fingerprints: dict[str, set[str]] = {}
        for _ in range(cfg.bench.prepare_rounds):
            seconds, bare_tokens = bare()
            times["bare"].append(seconds)
            for name, (rate, num_proc) in PREPARE_RUNS.items():
                seconds, metas[name] = timed(rate, num_proc)
                times[name].append(seconds)
                fingerprints.setdefault(str(rate), set()).add(metas[name]["fingerprint"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    bare_s = statistics.median(times["bare"])
    runs = {}
    for name, (rate, num_proc) in PREPARE_RUNS.items():
        meta, seconds = metas[name], statistics.median(times[name])
        runs[name] = {"noise_rate": rate, "num_proc": num_proc, "s": seconds, "s_all": times[name],
                      "tokens": meta["n_tokens"], "tokens_per_s": meta["n_tokens"] / seconds,
                      "vs_bare": meta["n_tokens"] / seconds / (bare_tokens / bare_s)}
        if meta["noise"]:
            runs[name]["realized_noise_rate"] = meta["noise"]["realized_rate"]
    return {
        "tokenizer": cfg.model.tokenizer or cfg.model.name, "corpus": str(corpus), "docs": len(texts),
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
        "bare": {"s": bare_s, "s_all": times["bare"], "tokens": bare_tokens, "tokens_per_s": bare_tokens / bare_s},
        "setup_s": setup_s, "runs": runs, "same_store": {r: len(fp) == 1 for r, fp in fingerprints.items()},
        "seconds": time.perf_counter() - start,
    }


def _prepare_corpus(tokenizer: Any, n_tokens: int, where: Path) -> Path:
    """CHAMP's train documents cycled to about `n_tokens` tokens, as JSONL; made once per size and tokenizer."""
    path = where / f"prepare-corpus-{n_tokens}-{tokenizer_fingerprint(tokenizer)}.jsonl"
    if path.is_file():
        return path
    texts = [d.text for d in CORPORA["champ"](DataConfig())["train"].documents]
    sample = texts[:64]
    chars_per_token = sum(map(len, sample)) / sum(map(len, tokenizer(sample, add_special_tokens=False)["input_ids"]))
    chars = 0
    with atomic_path(path) as tmp, tmp.open("w") as f:
        for text in itertools.cycle(texts):
            if chars >= n_tokens * chars_per_token:
                break
            f.write(json.dumps({"text": text}) + "\n")
            chars += len(text)
    return path


SIDE_CASES["prepare"] = prepare_case
