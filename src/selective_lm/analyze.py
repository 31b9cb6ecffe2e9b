"""`slm analyze`: the analysis of the current grid's runs, written as `analysis.json` and `results.json`.

The runs analysed are the grid of the config (`Config.grid_runs`: CLM, the oracle, every method
× ratio × seed) that have finished training, plus the reference and the base model when they
were evaluated. Run directories of other configs (an earlier grid in the same `--out`) are
listed under `other_runs` and left out of every table. Per run:

- buckets (the replication's quantile method): per-token losses of each run vs the CLM
  baseline on `analysis.bucket_split`, threshold = the baseline's `analysis.bucket_quantile`;
- buckets_trajectory (the paper's method): each run's own trajectory snapshots on that split;
- cosine: of the real weight updates, ΔW = scale·B·A per LoRA module (ΔW = W_run − W_base for
  full fine-tuning), for every pair of runs, with per-module-kind means beside;
- selection: noise vs clean tokens selected, the share of each token kind trained, and the
  reference loss of selected/unselected tokens, accumulated by the trainer over the whole run;
  each kind's share ÷ clean share with its token count and a bootstrap interval over optimizer
  steps (`by_kind_interval`), and, where the train split has CHAMP's wrong-step labels, the share
  trained after the first wrong step ÷ before it with a paired bootstrap over documents (`wrong_step`);
- separation_step0: per token kind, the probability that a clean token's step-0 excess loss
  (base minus reference) outranks one of the kind;
- per run: Δ perplexity vs CLM with a paired bootstrap interval over validation documents
  (`delta_vs_clm`), the same by token kind on validation splits with kinds (`val_by_kind`: the
  wrong-step labels of val_noisy), and the training tokens needed to reach CLM's final
  learning-curve loss (`tokens_to_clm_final`);
- comparisons: the controls' questions as paired intervals, `"<a>|<b>"` → split → Δ % of a vs b, for the
  pairs each registered control names (`registry.Method.compare`: top-k vs distill of its seed, selection or
  transfer?; bottom-k vs random of its ratio and seed, does the score's sign matter?; a plugin's own).

`results.json` (DESIGN.md) joins these with each run's training summary and validation results;
`slm report` reads only it and the run directories, so the stages can be run one by one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from . import __version__
from .analysis.buckets import quantile_buckets, trajectory_buckets
from .analysis.selection import WRONG_STEP, outrank_probability
from .analysis.similarity import full_delta, lora_delta_from_config, update_cosine
from .analysis.uncertainty import doc_sums, first_reach, paired_delta, ratio_of_shares, tokens_to_reach
from .config import Config
from .errors import UserError
from .evaluate import model_digest
from .files import fingerprint, read_json, write_json
from .harness import task_results
from .method.registry import METHODS
from .store.layout import OutDir, RunDir
from .training.models import load_model, load_tokenizer, load_trained

BASELINE = "clm"
RUN_FIELDS = ("method", "ratio", "seed", "steps", "tokens_seen", "tokens_trained", "train_loss_final", "strategy",
              "score", "scope")
ANALYSIS_KEYS = ("buckets", "buckets_trajectory", "cosine", "cosine_modules", "selection")


def grid_runs(cfg: Config, out: OutDir) -> tuple[dict[str, RunDir], list[str]]:
    """(finished runs of the config's grid in grid order, names of the other run dirs under runs/)."""
    train_meta = out.store("train").meta if out.store_dir("train").is_dir() else {}
    names = list(cfg.grid_runs(has_noise=bool(train_meta.get("noise"))))
    runs = {n: out.run(n) for n in names if out.run(n).finished}
    return runs, [r.name for r in out.run_dirs() if r.name not in names]


def _token_losses(run: RunDir, split: str) -> np.ndarray | None:
    path = run.token_losses(split)
    return np.load(path, mmap_mode="r") if path.is_file() else None


def _trajectory(run: RunDir) -> tuple[np.ndarray, np.ndarray] | None:
    files = run.trajectory_loss_files()
    if len(files) < 2:
        return None
    return np.stack([np.load(f) for _, f in files]), np.array([step for step, _ in files])


def adapter_delta(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """ΔW per module of a peft adapter directory; reads safetensors only, never unpickles a `.bin`."""
    config_path, weights_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise UserError(f"{path} not found: expected a peft adapter saved as safetensors")
    return lora_delta_from_config(load_file(weights_path), json.loads(config_path.read_text()))


def _deltas(cfg: Config, runs: dict[str, RunDir]) -> dict[str, dict[str, torch.Tensor]]:
    """Weight updates of each run: from the adapter (LoRA) or against the base weights (full)."""
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    base_state: dict[str, torch.Tensor] | None = None
    for name, run in runs.items():
        if run.adapter_dir.is_dir():
            deltas[name] = adapter_delta(run.adapter_dir)
        elif run.model_dir.is_dir():
            if base_state is None:
                vocab = len(load_tokenizer(cfg.model))
                base_state = {k: v.detach() for k, v in load_model(cfg.model, vocab_size=vocab).state_dict().items()}
            deltas[name] = full_delta(load_trained(cfg.model, run.model_dir).state_dict(), base_state)
    return deltas


def _analysis(cfg: Config, runs: dict[str, RunDir], summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Buckets, trajectory buckets, update cosines and selection diagnostics of `runs` (by name: the
    cosine keys `"a|b"` put the names in sorted order)."""
    runs = {name: runs[name] for name in sorted(runs)}
    split, q = cfg.analysis.bucket_split, cfg.analysis.bucket_quantile
    result: dict[str, Any] = {"buckets": {}, "buckets_trajectory": {}, "cosine": {}, "cosine_modules": {},
                              "selection": {}, "bucket_threshold": None}
    for name, run in runs.items():
        losses = _token_losses(run, split)
        base_name = _baseline(name, summaries)
        base = _token_losses(runs[base_name], split) if base_name else None
        if base is not None and losses is not None:
            b = quantile_buckets(base, losses, quantile=q)
            result["buckets"][name] = b.fractions
            result["bucket_threshold"] = b.threshold
        traj = _trajectory(run)
        if traj is not None:
            result["buckets_trajectory"][name] = trajectory_buckets(traj[0], traj[1], quantile=q).fractions
        if summaries[name].get("selection"):
            result["selection"][name] = _selection(run, summaries[name]["selection"], cfg.train.seed)
    deltas = _deltas(cfg, runs)
    names = list(deltas)
    for i, a in enumerate(names):
        for b_name in names[i + 1:]:
            overall, per_module = update_cosine(deltas[a], deltas[b_name])
            result["cosine"][f"{a}|{b_name}"] = overall
            result["cosine_modules"][f"{a}|{b_name}"] = _by_module_kind(per_module)
    return result


def _selection(run: RunDir, sel: dict[str, Any], seed: int) -> dict[str, Any]:
    """A run's selection diagnostics with intervals: each kind's trained share ÷ the clean share, bootstrapped over
    the optimizer steps of log.jsonl (`kind_counts`, absent in older logs: no interval), and the after ÷ before
    wrong-step share, bootstrapped over the labelled documents (paired: both kinds of a drawn document)."""
    out = {k: v for k, v in sel.items() if k != "wrong_step_docs"}
    steps = [r.get("kind_counts") or {} for r in run.log()]
    if any(steps) and "clean" in sel.get("kind_tokens", {}):
        def col(kind: str, i: int) -> np.ndarray:
            return np.array([r.get(kind, [0.0, 0.0])[i] for r in steps])

        out["by_kind_interval"] = {
            kind: {**(ratio_of_shares(col(kind, 0), col(kind, 1), col("clean", 0), col("clean", 1), seed=seed)
                      or {}), "tokens": int(tokens)}
            for kind, tokens in sel["kind_tokens"].items() if kind != "clean"}
    docs = sel.get("wrong_step_docs")
    if docs and docs["doc_ids"]:
        after, before = WRONG_STEP
        ratio = ratio_of_shares(docs[f"{after}_selected"], docs[f"{after}_valid"], docs[f"{before}_selected"],
                                docs[f"{before}_valid"], seed=seed)
        shares = {f"{k}_share": sum(docs[f"{k}_selected"]) / sum(docs[f"{k}_valid"]) if sum(docs[f"{k}_valid"])
                  else None for k in WRONG_STEP}
        out["wrong_step"] = {**shares, **(ratio or {}), "documents": len(docs["doc_ids"]),
                             **{f"{k}_tokens": int(sum(docs[f"{k}_valid"])) for k in WRONG_STEP}}
    return out


def _run_entries(cfg: Config, out: OutDir, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """results.json `runs`: each grid run's summary, validation and task results, then the reference and base."""
    entries: dict[str, Any] = {}
    for name, s in summaries.items():
        # Runs trained before selection rules existed were all ratio (top-k count) runs.
        entries[name] = {k: s[k] for k in RUN_FIELDS} | {"rule": s.get("rule", "topk"), "threshold": s.get("threshold"),
                                                         "selected_share": s.get("selected_share")}
        entries[name]["val"] = _val(out.run(name))
        entries[name]["tasks"] = task_results(out.run(name), s["config_hash"])
    # A self-reference (ema, checkpoint) has no model of its own: a reference/ left by another mode is not it.
    for name in ("base",) if cfg.reference.is_self else ("reference", "base"):
        run = out.run(name)
        if not run.eval_path.is_file():
            continue
        trained = read_json(run.reference_json).get("train", {}) if name == "reference" else {}
        entries[name] = {"method": name, "ratio": 1.0, "seed": cfg.train.seed, "steps": trained.get("steps", 0),
                         "tokens_seen": trained.get("tokens_seen", 0),
                         "tokens_trained": trained.get("tokens_trained", 0),
                         "train_loss_final": trained.get("train_loss_final"), "val": _val(run),
                         "tasks": task_results(run, model_digest(cfg, run))}
    return entries


def _val(run: RunDir) -> dict[str, Any]:
    return read_json(run.eval_path) if run.eval_path.is_file() else {}


def _eval_rows(cfg: Config, out: OutDir, split: str) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(doc ids, token kinds or None) of the tokens `slm eval` scores on `split` (its spread subset)."""
    if not out.store_dir(split).is_dir():
        return None
    store = out.store(split)
    rows = store.spread_blocks(cfg.eval.max_tokens)
    kinds = np.asarray(store.noise_kind[rows]) if store.noise_kind is not None else None
    return np.asarray(store.doc_ids[rows]), kinds


def _paired(out: OutDir, a: str, b: str, split: str, doc_ids: np.ndarray, seed: int,
            mask: np.ndarray | None = None) -> dict[str, float] | None:
    """Δ perplexity of run a vs run b on `split` (on the `mask` tokens only), in %, paired bootstrap over documents."""
    run_loss, base_loss = _token_losses(out.run(a), split), _token_losses(out.run(b), split)
    if run_loss is None or base_loss is None or not run_loss.shape == doc_ids.shape == base_loss.shape:
        return None
    keep = np.isfinite(run_loss) & np.isfinite(base_loss) & (True if mask is None else mask)
    if not keep.any():
        return None
    _, run_nats, counts = doc_sums(np.where(keep, run_loss, np.nan), doc_ids)
    _, base_nats, _ = doc_sums(np.where(keep, base_loss, np.nan), doc_ids)
    return paired_delta(run_nats, base_nats, counts, seed=seed)


def _deltas_vs_clm(cfg: Config, out: OutDir, entries: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """run -> split -> Δ perplexity vs the CLM run of its seed, in %, with a paired bootstrap 95 % interval
    over the validation documents (`analysis.uncertainty`)."""
    result: dict[str, dict[str, dict[str, float]]] = {}
    for split in cfg.eval.splits:
        if (rows := _eval_rows(cfg, out, split)) is None:
            continue
        for name in entries:
            base_name = _baseline(name, entries)
            if base_name is not None and (d := _paired(out, name, base_name, split, rows[0], cfg.train.seed)):
                result.setdefault(name, {})[split] = d
    return result


def _val_by_kind(cfg: Config, out: OutDir, entries: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """run -> split -> kind -> perplexity on the tokens of that kind (`ppl`, `tokens`, `documents`) and its Δ vs
    CLM with a paired bootstrap over documents (`lo`/`hi` None when the tokens lie in one document), on the
    validation splits that record token kinds (val_noisy's wrong-step labels)."""
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for split in cfg.eval.splits:
        rows = _eval_rows(cfg, out, split)
        if rows is None or rows[1] is None:
            continue
        doc_ids, kinds = rows
        names = out.store(split).kind_names
        for name in entries:
            losses = _token_losses(out.run(name), split)
            if losses is None or losses.shape != kinds.shape:
                continue
            base_name = _baseline(name, entries)
            for k in np.unique(kinds):
                mask = (kinds == k) & np.isfinite(losses)
                if not mask.any():
                    continue
                documents = len(np.unique(doc_ids[mask]))
                delta = _paired(out, name, base_name, split, doc_ids, cfg.train.seed, mask) if base_name else None
                if delta and documents < 2:  # resampling one document gives it back every time: no interval
                    delta.update(lo=None, hi=None)
                entry = {"ppl": float(np.exp(np.asarray(losses)[mask].mean())), "tokens": int(mask.sum()),
                         "documents": documents, "delta_vs_clm": delta}
                result.setdefault(name, {}).setdefault(split, {})[names[k]] = entry
    return result


def control_pair(ea: dict[str, Any], eb: dict[str, Any]) -> bool:
    """Whether runs a and b (their results entries) are a control's pair (`registry.Method.compare`): the methods
    it names, the same seed, and the same ratio and rule when both select (top-k vs distill of its seed: selection
    or transfer; bottom-k vs random of its ratio and seed: the score's sign)."""
    keys = ("seed", "ratio", "rule") if all(METHODS[e["method"]].selects for e in (ea, eb)) else ("seed",)
    return any(m.compare == (ea.get("method"), eb.get("method")) for m in METHODS.values()) \
        and all(ea.get(k) == eb.get(k) for k in keys)


def _comparisons(cfg: Config, out: OutDir, entries: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """`"<a>|<b>"` -> split -> Δ % of a vs b, for every pair of runs a control names (`control_pair`)."""
    pairs = [(a, b) for a, ea in entries.items() for b, eb in entries.items()
             if ea.get("method") in METHODS and eb.get("method") in METHODS and control_pair(ea, eb)]
    result: dict[str, dict[str, dict[str, float]]] = {}
    for split in cfg.eval.splits:
        if (rows := _eval_rows(cfg, out, split)) is None:
            continue
        for a, b in pairs:
            if d := _paired(out, a, b, split, rows[0], cfg.train.seed):
                result.setdefault(f"{a}|{b}", {})[split] = d
    return result


def separation_step0(cfg: Config, out: OutDir) -> dict[str, dict[str, float | None]]:
    """kind -> step-0 excess loss (base minus reference) of its tokens vs clean tokens, on scored train blocks:
    mean excess, token count and the probability that a clean token outranks one of the kind."""
    path = out.run("base").token_losses("train")
    if not path.is_file() or not out.has_scores("train") or cfg.reference.is_self:
        return {}
    store = out.store("train")
    names = store.kind_names
    rows = out.scored_blocks("train", cfg.analysis.separation_tokens)
    base = np.load(path)
    if store.noise_kind is None or not names or base.shape != (len(rows), store.block_len):
        return {}
    excess = (base - out.score_values("train")[rows]).ravel()
    kinds = np.asarray(store.noise_kind[rows]).ravel()
    ok = np.isfinite(excess)
    clean = excess[ok & (kinds == 0)]
    result = {}
    for k, name in enumerate(names):
        mine = excess[ok & (kinds == k)]
        if mine.size:
            result[name] = {"tokens": int(mine.size), "mean_excess": float(mine.mean()),
                            "p_clean_outranks": outrank_probability(clean, mine) if k else 0.5}
    return result


def tokens_to_reach_point(curve: list[dict[str, Any]], split: str, target: float) -> float | None:
    """Training tokens at which a learning curve first reaches `target` (linear between points), None if never."""
    points = [r for r in curve if split in r.get("val_loss", {})]
    tokens, losses = [r["tokens_seen"] for r in points], [[r["val_loss"][split]] for r in points]
    reached = first_reach(tokens, losses, [target])[0] if points else np.nan
    return float(reached) if np.isfinite(reached) else None


def _tokens_to_clm_final(cfg: Config, out: OutDir, entries: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """run -> split -> tokens the run needs to reach its CLM baseline's final curve loss (Rho-1's speed-up):
    `point`, and `interval` (bootstrap over the curve subset's documents, `tokens_to_reach`) when the curves
    hold each document's loss (`doc_nats`; older curves do not)."""
    result: dict[str, dict[str, Any]] = {}
    for name in entries:
        base_name = _baseline(name, entries)
        curve = out.run(name).curve()
        base_curve = out.run(base_name).curve() if base_name else []
        if not curve or not base_curve:
            continue
        final = base_curve[-1]
        for split in final["val_loss"]:
            entry = {"point": tokens_to_reach_point(curve, split, final["val_loss"][split]), "interval": None}
            docs = [r.get("doc_nats", {}).get(split) for r in curve]
            target, counts = final.get("doc_nats", {}).get(split), final.get("doc_tokens", {}).get(split)
            if target is not None and all(d is not None and len(d) == len(target) for d in docs):
                entry["interval"] = tokens_to_reach([r["tokens_seen"] for r in curve], docs, target, counts,
                                                    seed=cfg.train.seed)
            result.setdefault(name, {})[split] = entry
    return result


def analyze(cfg: Config, out: str | Path | OutDir) -> dict[str, Any]:
    """Write analysis.json and results.json for the current grid; a no-op when their inputs are unchanged."""
    out = OutDir.of(out)
    runs, others = grid_runs(cfg, out)
    summaries = {name: run.summary for name, run in runs.items()}
    entries = _run_entries(cfg, out, summaries)
    inputs = fingerprint({n: s["config_hash"] for n, s in summaries.items()}, cfg.analysis.model_dump(),
                         cfg.eval.model_dump(), {n: [e["val"], e["tasks"]] for n, e in entries.items()}, others)
    if out.results.is_file():
        previous = read_json(out.results)
        if previous.get("inputs") == inputs:
            return previous
    analysis = _analysis(cfg, runs, summaries)
    deltas, speed = _deltas_vs_clm(cfg, out, entries), _tokens_to_clm_final(cfg, out, entries)
    by_kind = _val_by_kind(cfg, out, entries)
    for name, entry in entries.items():
        entry["delta_vs_clm"] = deltas.get(name, {})
        if name in by_kind:
            entry["val_by_kind"] = by_kind[name]
        first = next(iter(cfg.eval.splits), None)
        by_split = speed.get(name, {})
        entry["tokens_to_clm_final"] = by_split[first]["point"] if first in by_split else None
        entry["tokens_to_clm_final_by_split"] = {split: e["point"] for split, e in by_split.items()}
        entry["tokens_to_clm_final_interval"] = {split: e["interval"] for split, e in by_split.items()
                                                 if e["interval"] is not None}
    write_json(out.analysis, analysis)
    results = {"preset": cfg.preset, "version": __version__, "runs": entries,
               **{k: analysis[k] for k in ANALYSIS_KEYS}, "bucket_threshold": analysis["bucket_threshold"],
               "separation_step0": separation_step0(cfg, out), "comparisons": _comparisons(cfg, out, entries),
               "other_runs": others, "inputs": inputs}
    write_json(out.results, results)
    return results


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
