"""`slm analyze`: wire the pure analysis cores to the runs of an out dir; writes `analysis.json`.

- buckets (the replication's quantile method): per-token losses of each run vs the CLM
  baseline on `analysis.bucket_split`, threshold = the baseline's `analysis.bucket_quantile`;
- buckets_trajectory (the paper's method): each run's own trajectory snapshots on that split;
- cosine: of the real weight updates, ΔW = scale·B·A per LoRA module (ΔW = W_run − W_base for
  full fine-tuning), for every pair of runs, with per-module values beside;
- selection: noise vs clean tokens selected and the reference loss of selected/unselected
  tokens, accumulated by the trainer over the whole run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .analysis.buckets import quantile_buckets, trajectory_buckets
from .analysis.similarity import full_delta, load_adapter_delta, update_cosine
from .common import read_json, write_json
from .config import Config
from .models import load_model, load_tokenizer, load_trained

BASELINE = "clm"


def finished_runs(out: Path) -> dict[str, dict[str, Any]]:
    """name -> train.json summary, for every finished run under out/runs (sorted by name)."""
    return {p.parent.name: read_json(p) for p in sorted((out / "runs").glob("*/train.json"))}


def _token_losses(out: Path, name: str, split: str) -> np.ndarray | None:
    path = out / "runs" / name / "token_losses" / f"{split}.npy"
    return np.load(path, mmap_mode="r") if path.is_file() else None


def _trajectory(out: Path, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    files = sorted((out / "runs" / name / "token_losses" / "trajectory").glob("step-*.npy"))
    if len(files) < 2:
        return None
    steps = np.array([int(f.stem.split("-")[1]) for f in files])
    return np.stack([np.load(f) for f in files]), steps


def _deltas(cfg: Config, out: Path, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Weight updates of each run: from the adapter (LoRA) or against the base weights (full)."""
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    base_state: dict[str, torch.Tensor] | None = None
    for name in names:
        run = out / "runs" / name
        if (run / "adapter").is_dir():
            deltas[name] = load_adapter_delta(run / "adapter")
        elif (run / "model").is_dir():
            if base_state is None:
                vocab = len(load_tokenizer(cfg.model))
                base_state = {k: v.detach() for k, v in load_model(cfg.model, vocab_size=vocab).state_dict().items()}
            trained = load_trained(cfg.model, run / "model")
            deltas[name] = full_delta(trained.state_dict(), base_state)
    return deltas


def analyze(cfg: Config, out: Path) -> dict[str, Any]:
    """Buckets, trajectory buckets, update cosines and selection diagnostics of every finished run."""
    runs = finished_runs(out)
    split, q = cfg.analysis.bucket_split, cfg.analysis.bucket_quantile
    result: dict[str, Any] = {"buckets": {}, "buckets_trajectory": {}, "cosine": {}, "cosine_modules": {},
                              "selection": {}, "bucket_threshold": None}
    for name in runs:
        losses = _token_losses(out, name, split)
        base_name = _baseline(name, runs)
        base = _token_losses(out, base_name, split) if base_name else None
        if base is not None and losses is not None:
            b = quantile_buckets(base, losses, quantile=q)
            result["buckets"][name] = b.fractions
            result["bucket_threshold"] = b.threshold
        traj = _trajectory(out, name)
        if traj is not None:
            result["buckets_trajectory"][name] = trajectory_buckets(traj[0], traj[1], quantile=q).fractions
        if runs[name].get("selection"):
            result["selection"][name] = runs[name]["selection"]
    deltas = _deltas(cfg, out, list(runs))
    names = list(deltas)
    for i, a in enumerate(names):
        for b_name in names[i + 1:]:
            overall, per_module = update_cosine(deltas[a], deltas[b_name])
            result["cosine"][f"{a}|{b_name}"] = overall
            result["cosine_modules"][f"{a}|{b_name}"] = _by_module_kind(per_module)
    write_json(out / "analysis.json", result)
    return result


def _baseline(name: str, runs: dict[str, dict[str, Any]]) -> str | None:
    """The CLM run a run is compared with: the one of the same seed when several seeds ran."""
    if runs[name].get("method") == BASELINE:
        return None
    candidates = (f"{BASELINE}-s{runs[name].get('seed')}", BASELINE)
    return next((c for c in candidates if c in runs), None)


def _by_module_kind(per_module: dict[str, float]) -> dict[str, float]:
    """Mean cosine per module kind (q_proj, down_proj, ...) over layers: readable, unlike 200 entries."""
    kinds: dict[str, list[float]] = {}
    for module, value in per_module.items():
        kinds.setdefault(module.rsplit(".", 1)[-1], []).append(value)
    return {k: float(np.nanmean(v)) if not all(np.isnan(v)) else float("nan") for k, v in sorted(kinds.items())}
