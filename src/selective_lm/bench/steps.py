"""`slm bench`'s step cases: CLM, efficient SLM, naive SLM, scoring and forward passes timed on one model."""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch._C._profiler import _EventType
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from ..config import ModelConfig
from ..method.loss import Batch, forward_hidden, selective_lm_loss, valid_mask
from ..method.registry import METHODS, OBJECTIVES
from ..method.spec import Selection
from ..store.frozen import frozen_model, model_token_losses
from ..training.engine import compile_layers, compiles
from ..training.models import apply_lora, load_model

LARGE_VOCAB_MODEL = "random:tiny-llama"  # hidden 64, 2 layers: the loss path dominates the step
# Besides CLM, SLM and the naive SLM: one variant per registered objective other than cross-entropy (its method's step
# on every token: distillation, a plugin's), named after it.
OBJECTIVE_VARIANTS = tuple(n for n in OBJECTIVES if n != "ce")
TRAIN_VARIANTS = ("clm", "slm", "naive", *OBJECTIVE_VARIANTS)
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
    if device.type == "cuda":
        gc.collect()  # garbage freed inside `fn` would offset its peak (the CPU's count starts at 0 with `fn`)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / _MB
    return tensor_peak_bytes(fn) / _MB


def profile_step(fn: Callable[[], Any], device: torch.device, step_s: float, top: int = 8) -> dict[str, Any]:
    """Where one (warmed-up) step's time goes, from the profiler: what a step too slow for its FLOPs is waiting on.

    On CUDA: the kernels launched (`kernels`), their summed time, and `busy` = that time / the step's
    unprofiled median `step_s` (well below 1: the GPU waits on the host), with the top kernels. On both
    devices: the top host ops by self CPU time. Each entry: [name, ms, calls].
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    kernel_ms = sum(e.self_device_time_total for e in kernels) / 1e3

    def ranked(rows: list[Any], time: Callable[[Any], float]) -> list[list[Any]]:
        return [[e.key[:100], round(time(e) / 1e3, 3), e.count] for e in sorted(rows, key=time, reverse=True)[:top]]

    return {
        "kernels": sum(e.count for e in kernels), "kernel_ms": round(kernel_ms, 3),
        "busy": kernel_ms / (step_s * 1e3) if kernels else None,
        "top_kernels": ranked(kernels, lambda e: e.self_device_time_total),
        "top_host_ops": ranked([e for e in events if e.device_type == DeviceType.CPU], lambda e: e.self_cpu_time_total),
    }


# ---------------------------------------------------------------------------- the variants


def _autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA (the trainer's mixed precision there), disabled on CPU (float32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _optimizer_step(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, n_selected: float) -> None:
    """The trainer's step after backward: grads / n_selected (one foreach op), clip to 1, AdamW, zero."""
    torch._foreach_mul_([p.grad for p in params if p.grad is not None], 1.0 / max(n_selected, 1.0))
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
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
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda" or None)  # as the trainer's

    def train(score_kind: str, r: float) -> None:
        with _autocast(device):
            out = selective_lm_loss(student, ids, valid, ref_loss, Selection("topk", r, score_kind),
                                    chunk_size=chunk_size)
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

    def objective(name: str) -> Callable[[], None]:
        """The objective's step on every token at its default keys, the reference's hidden states computed online
        (no grad) when it reads the reference's distribution, as the trainer does."""
        method = next(m for m, e in METHODS.items() if e.objective == name and not e.selects)
        entry = OBJECTIVES[name]

        def step() -> None:
            with _autocast(device):
                reference = None
                if "reference_logits" in entry.needs:
                    with torch.no_grad():
                        reference = forward_hidden(frozen, ids)
                batch = Batch(student, ids, valid, ref_loss, Selection(method, 1.0, "none"), chunk_size=chunk_size,
                              reference=reference)
                out = entry.loss(batch, None)
            out.loss_sum.backward()
            _optimizer_step(params, opt, float(out.n_selected))

        return step

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
        **{name: objective(name) for name in OBJECTIVE_VARIANTS},
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
    frozen = frozen_model(load_model(model_cfg, vocab_size=vocab_size), device, device.type == "cuda")  # as scoring
    base = load_model(model_cfg, vocab_size=vocab_size)
    student = (apply_lora(base, model_cfg) if model_cfg.lora else base.requires_grad_(True)).to(device).train()
    if compiles(settings.get("compile", "auto"), device):  # as the trainer: decoder layers compiled on CUDA
        compile_layers(student)
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
        if settings.get("profile"):
            entry["profile"] = profile_step(fns[name], device, med)
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
