"""`slm eval`: token-weighted validation loss and perplexity of a run, the reference or the base model.

Perplexity is exp(Σ nats / Σ tokens) over every predicted token of a split (lm-eval's
weighted perplexity), with the project's one next-token shift (`loss.token_losses`). The
per-token losses are kept under `token_losses/<split>.npy` (same shape as the token store,
NaN where nothing was predicted) for the bucket analyses; trajectory snapshots are evaluated
on the bucket split into `token_losses/trajectory/step-NNNNNN.npy`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from .common import UserError, fingerprint, read_json, write_json
from .config import Config
from .data import load_store
from .models import apply_lora, load_model, load_tokenizer, load_trained
from .scoring import load_reference_model, store_fingerprint, token_loss_pass


def summarize(losses: np.ndarray) -> dict[str, float]:
    """Token-weighted mean loss and perplexity of a `[n_blocks, T]` loss array (NaN = no target)."""
    finite = np.isfinite(losses)
    n = int(finite.sum())
    if n == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "tokens": 0}
    mean = float(np.sum(losses[finite], dtype=np.float64) / n)
    return {"loss": mean, "ppl": math.exp(mean), "tokens": n}


def model_dir(out: Path, name: str) -> Path:
    """Where an evaluated model's outputs go: `runs/<name>`, `reference/` or `base/`."""
    return out / name if name in ("reference", "base") else out / "runs" / name


def _load(cfg: Config, out: Path, name: str, vocab: int) -> tuple[Any, str]:
    """The model to evaluate and a digest of its weights (to invalidate stale token losses)."""
    if name == "reference":
        desc = read_json(out / "reference" / "reference.json")
        return load_reference_model(cfg, out), desc["digest"]
    if name == "base":
        return load_model(cfg.model, vocab_size=vocab), fingerprint(cfg.model.name, cfg.model.revision)
    run = out / "runs" / name
    summary = run / "train.json"
    if not summary.is_file():
        raise UserError(f"run {name!r} has not finished training in {out}/runs: run `slm train` first")
    path = run / "adapter" if (run / "adapter").is_dir() else run / "model"
    return load_trained(cfg.model, path, vocab), read_json(summary)["config_hash"]


def evaluate(cfg: Config, out: Path, name: str | None = None) -> dict[str, Any]:
    """Evaluate one model (`train.name`-derived run, `reference` or `base`) on `eval.splits`."""
    from .train import run_name

    name = name or run_name(cfg.train)
    tokenizer = load_tokenizer(cfg.model)
    stores = {split: load_store(out / "data" / split) for split in cfg.eval.splits}
    target = model_dir(out, name)
    model, digest = _load(cfg, out, name, len(tokenizer))
    model.eval().requires_grad_(False)
    results: dict[str, Any] = {}
    for split, store in stores.items():
        path = target / "token_losses" / f"{split}.npy"
        expected = {"model": digest, "store": store_fingerprint(store)}
        meta_path = path.with_suffix(".json")
        if not (path.is_file() and meta_path.is_file() and read_json(meta_path) == expected):
            path.parent.mkdir(parents=True, exist_ok=True)
            token_loss_pass(model, store, path, cfg, expected, f"eval {name} {split}")
            write_json(meta_path, expected)
        results[split] = summarize(np.load(path, mmap_mode="r"))
    write_json(target / "eval.json", results)
    return results


def evaluate_trajectory(cfg: Config, out: Path, name: str) -> list[int]:
    """Per-token losses on the bucket split at every trajectory snapshot of a LoRA run; returns the steps."""
    run = out / "runs" / name
    snaps = sorted((run / "checkpoints" / "trajectory").glob("step-*.safetensors"))
    if len(snaps) < 2 or not cfg.model.lora:
        return []
    split = cfg.analysis.bucket_split
    store = load_store(out / "data" / split)
    tokenizer = load_tokenizer(cfg.model)
    model = apply_lora(load_model(cfg.model, vocab_size=len(tokenizer)), cfg.model)
    model.eval().requires_grad_(False)
    params = dict(model.named_parameters())
    steps = []
    for snap in snaps:
        step = int(snap.stem.split("-")[1])
        path = run / "token_losses" / "trajectory" / f"step-{step:06d}.npy"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with torch.no_grad():
                for key, value in load_file(snap).items():
                    params[key].copy_(value)
            expected = {"snapshot": snap.name, "store": store_fingerprint(store)}
            token_loss_pass(model, store, path, cfg, expected, f"trajectory {name} step {step}")
        steps.append(step)
    return steps
