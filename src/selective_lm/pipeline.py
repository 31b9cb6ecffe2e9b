"""`slm run`: the preset's comparison grid as cached, resumable stages; writes `results.json`.

prepare → reference → score (once for all runs) → CLM, oracle and every method × ratio × seed
→ eval of every run, of the reference and of the base model → trajectory losses → analyze →
report. Every stage is skipped when its outputs match the config that produced them (token
stores by config fingerprint, runs by `train.json`'s config hash, scores and token losses by
the fingerprints of their inputs), so a second `slm run` does nothing and a changed ratio
re-runs only what depends on it. A killed run resumes from the last checkpoint of the stage
it was in. Only this module wires stages together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import __version__
from .analyze import analyze
from .common import fingerprint, read_json, run_lock, write_json
from .config import Config
from .data import prepare
from .evaluate import evaluate, evaluate_trajectory
from .report import report
from .scoring import reference, score
from .train import needs_reference, run_name, train


@dataclass(frozen=True)
class Task:
    """One unit of the overall progress display; `cost` (in tokens processed) sizes the ETA."""

    label: str
    cost: float


def grid_configs(cfg: Config, has_noise: bool) -> dict[str, Config]:
    """run name -> its config: CLM, the oracle (when the train split has a noise mask), methods × ratios × seeds."""
    specs: list[dict[str, Any]] = [{"method": "clm", "ratio": 1.0}]
    if cfg.grid.oracle and has_noise:
        specs.append({"method": "oracle", "ratio": 1.0})
    specs += [{"method": m, "ratio": r} for m in cfg.grid.methods for r in cfg.grid.ratios]
    configs: dict[str, Config] = {}
    for seed in range(cfg.train.seed, cfg.train.seed + cfg.grid.seeds):
        for spec in specs:
            t = cfg.train.model_copy(update={**spec, "seed": seed, "name": None})
            configs[run_name(t, with_seed=cfg.grid.seeds > 1)] = cfg.model_copy(update={"train": t})
    return configs


def _results(cfg: Config, out: Path, evals: dict[str, dict[str, Any]], analysis: dict[str, Any]) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for name, val in evals.items():
        if name in ("reference", "base"):
            ref = read_json(out / "reference" / "reference.json") if name == "reference" else {}
            trained = ref.get("train", {})
            runs[name] = {"method": name, "ratio": 1.0, "seed": cfg.train.seed, "steps": trained.get("steps", 0),
                          "tokens_seen": trained.get("tokens_seen", 0),
                          "tokens_trained": trained.get("tokens_trained", 0),
                          "train_loss_final": trained.get("train_loss_final"), "val": val}
            continue
        s = read_json(out / "runs" / name / "train.json")
        runs[name] = {k: s[k] for k in ("method", "ratio", "seed", "steps", "tokens_seen", "tokens_trained",
                                        "train_loss_final", "strategy", "score", "scope")}
        runs[name]["val"] = val
    return {"preset": cfg.preset, "version": __version__, "runs": runs,
            **{k: analysis.get(k, {}) for k in ("buckets", "buckets_trajectory", "cosine", "cosine_modules",
                                                 "selection")},
            "bucket_threshold": analysis.get("bucket_threshold")}


def run(cfg: Config, out: Path) -> dict[str, Any]:
    """Run (or resume, or confirm) the whole experiment under `out`; returns a short summary."""
    with run_lock(out):
        return _run(cfg, out)


def _run(cfg: Config, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    prepared = prepare(cfg, out)
    train_tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.grad_accum * cfg.data.block_len
    configs = grid_configs(cfg, has_noise=bool(prepared.get("train", {}).get("noise_rate")))
    val_tokens = sum(prepared.get(s, {}).get("n_tokens", 0) for s in cfg.eval.splits)
    evaluated = [*configs, "reference", "base"]
    tasks = [Task("reference", 3 * cfg.reference.steps * cfg.reference.batch_size * cfg.data.block_len),
             Task("score", prepared["train"]["n_tokens"] if cfg.scoring.mode == "offline" else 0),
             *(Task(f"train {n}", 3 * train_tokens) for n in configs),
             *(Task(f"eval {n}", val_tokens) for n in evaluated),
             Task("analyze + report", val_tokens)]
    bar = tqdm(total=sum(t.cost for t in tasks), desc="slm run", unit="tok", unit_scale=True, position=0,
               dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
    progress = iter(tasks)

    def advance() -> None:
        task = next(progress)
        bar.set_description(f"slm run · {task.label}")
        bar.update(task.cost)

    reference(cfg, out)
    advance()
    if cfg.scoring.mode == "offline" and any(needs_reference(c.train) for c in configs.values()):
        score(cfg, out)
    advance()
    ref_model = None
    if cfg.scoring.mode == "online":
        from .scoring import load_reference_model

        ref_model = load_reference_model(cfg, out)
    for name, run_cfg in configs.items():
        train(run_cfg, out, name, reference_model=ref_model, replace_stale=True)
        advance()
    evals: dict[str, dict[str, Any]] = {}
    for name in evaluated:
        evals[name] = evaluate(configs.get(name, cfg), out, name)
        if name in configs:
            evaluate_trajectory(cfg, out, name)
        advance()
    inputs = fingerprint({n: read_json(out / "runs" / n / "train.json")["config_hash"] for n in configs},
                         cfg.analysis.model_dump(), evals)
    previous = out / "results.json"
    if previous.is_file() and read_json(previous).get("inputs") == inputs:
        results = read_json(previous)
    else:
        results = {**_results(cfg, out, evals, analyze(cfg, out)), "inputs": inputs}
        write_json(out / "results.json", results)
        report(cfg, out)
    advance()
    bar.close()
    return {"out": str(out), "runs": {n: {s: round(v["ppl"], 3) for s, v in r["val"].items()}
                                      for n, r in results["runs"].items()},
            "report": str(out / "report.md"), "seconds": round(time.perf_counter() - start, 1)}
