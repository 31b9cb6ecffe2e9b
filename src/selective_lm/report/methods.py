"""The report's "Methods side by side": every method of the grid in one row, seeds merged (report.py places it).

Two tables: what each method gained (Δ perplexity vs CLM with its interval, each seed's Δ, the tokens it needs
to reach CLM's final curve loss) and what it cost and trained (its step time ÷ CLM's with the offline scoring
of the tokens it read counted, and the share of each token kind it trained). Timings come from the runs'
`log.jsonl` (`step_s`) and the score store's `tokens_per_s`: they are this machine's, taken while the runs ran.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import yaml

from ..config.sections import SELF_REFERENCE_MODES
from ..files import read_json
from ..method.registry import METHODS, SCORE_KINDS, STRATEGIES
from ..store.layout import OutDir
from .groups import Group, delta_cell, groups
from .selection import NA, fmt, md_table, relative, tokens_or_never

KINDS = ("web", "header", "after_wrong_step", "before_wrong_step")  # a kind the grid's runs lack shows NA


def reads_offline_scores(run: dict[str, Any], scoring_mode: str, reference_mode: str = "trained") -> bool:
    """Whether the run's selection or objective read the reference's losses from the score store (`slm score`),
    whose cost is then the run's too; with `scoring.mode=online` or a self-reference (`reference.mode` ema or
    checkpoint) the step computes them and `step_s` has them."""
    entry = METHODS.get(run.get("method") or "")
    if entry is None or scoring_mode != "offline" or reference_mode in SELF_REFERENCE_MODES:
        return False
    kind = SCORE_KINDS.get(run.get("score") or "")
    by_score = entry.selects and STRATEGIES[entry.strategy].uses_scores and kind is not None \
        and "reference_loss" in kind.needs
    return by_score or "reference_loss" in entry.needs


def _modes(out: OutDir, name: str) -> tuple[str, str]:
    """The run's stored `scoring.mode` and `reference.mode` (their defaults when it stored none)."""
    path = out.run(name).config_path
    cfg = (yaml.safe_load(path.read_text()) if path.is_file() else None) or {}
    return (str((cfg.get("scoring") or {}).get("mode", "offline")),
            str((cfg.get("reference") or {}).get("mode", "trained")))


def step_cost(out: OutDir, name: str, run: dict[str, Any], tokens_per_s: float | None) -> tuple[float, float]:
    """(median seconds per optimizer step from log.jsonl, seconds per step of offline scoring of the tokens the
    run read: its tokens per step ÷ the scorer's tokens per second); NaN where unknown."""
    times = [float(r["step_s"]) for r in out.run(name).log() if isinstance(r.get("step_s"), (int, float))]
    step = float(np.median(times)) if times else math.nan
    if not reads_offline_scores(run, *_modes(out, name)):
        return step, 0.0
    steps = run.get("steps") or 0
    if not tokens_per_s or not steps:
        return step, math.nan
    return step, run.get("tokens_seen", 0) / steps / tokens_per_s


def _reach(values: list[dict[str, Any] | None]) -> str:
    """Tokens to CLM's final loss over seeds: the median of the seeds' points and the envelope of their
    intervals, "never" (infinite) where a seed does not reach it."""
    if not values or any(v is None for v in values):
        return NA

    def tokens(x: float | None) -> float:
        return math.inf if x is None else float(x)

    point = float(np.median([tokens(v["tokens"]) for v in values]))
    lo, hi = min(tokens(v["lo"]) for v in values), max(tokens(v["hi"]) for v in values)
    return f"{tokens_or_never(point)} [{tokens_or_never(lo)}, {tokens_or_never(hi)}]"


def _mean(values: list[float]) -> float:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else math.nan


def methods_section(out: OutDir, runs: dict[str, dict[str, Any]], order: list[str], splits: list[str],
                    selection: dict[str, dict[str, Any]]) -> str:
    title = "## Methods side by side"
    found = {k: g for k, g in groups(runs, order).items() if g.method in METHODS}
    clm = next((g for g in found.values() if g.method == "clm"), None)
    if clm is None or len(found) < 2 or not splits:
        return f"{title}\n\nNeeds a CLM run and another method with validation results."
    scoring = read_json(out.scores_dir("train") / "meta.json") if out.has_scores("train") else {}
    tokens_per_s = scoring.get("tokens_per_s")
    cost = {n: step_cost(out, n, runs[n], tokens_per_s) for g in found.values() for n in g.names}
    clm_step = _mean([cost[n][0] for n in clm.names])

    def seeds(g: Group, split: str) -> str:
        d = [fmt(x.get("pct"), "+.1f") for x in g.deltas.get(split, [])]
        return " / ".join(d) if len(d) > 1 and g is not clm else NA

    def reach(g: Group, split: str) -> str:
        if g is clm:
            return f"{fmt(_mean([runs[n].get('tokens_seen') for n in g.names]), ',.0f')} (its end)"
        return _reach([(runs[n].get("tokens_to_clm_final_interval") or {}).get(split) for n in g.names])

    gain = [[f"`{g.label}`", METHODS[g.method].role, str(len(g.names))]
            + [c for s in splits for c in (delta_cell(g, clm, s), seeds(g, s))]
            + [reach(g, s) for s in splits] for g in found.values()]
    header = ["method", "role", "seeds"] + [c for s in splits for c in (f"Δ {s} vs CLM", f"each seed's Δ {s}")]
    header += [f"tokens to CLM's {s} loss" for s in splits]

    def kind(g: Group, k: str) -> str:
        return fmt(_mean([relative((selection.get(n) or {}).get("by_kind") or {}, k) for n in g.names]), ".2f")

    def ratio(g: Group) -> str:
        step = _mean([cost[n][0] for n in g.names])
        total = _mean([cost[n][0] + cost[n][1] for n in g.names])
        return f"{fmt(total / clm_step, '.2f')} ({fmt(step / clm_step, '.2f')})" if np.isfinite(clm_step) else NA

    spend = [[f"`{g.label}`", fmt(_mean([runs[n].get("tokens_trained") for n in g.names]), ",.0f"),
              fmt(_mean([cost[n][0] for n in g.names]), ".2f"), fmt(_mean([cost[n][1] for n in g.names]), ".2f"),
              ratio(g)] + [kind(g, k) for k in KINDS] for g in found.values()]
    ref_log = out.reference.log()
    ref_s, ref_steps = sum(float(r.get("step_s", 0.0)) for r in ref_log), len(ref_log)
    return "\n\n".join([
        title,
        "Every method of the grid in one row (seeds merged: the Δ of the mean perplexity vs CLM's, the envelope of "
        "the seeds' paired bootstrap 95 % intervals over validation documents, and each seed's own Δ vs the CLM "
        "run of its seed). *Tokens to CLM's loss*: the training tokens a run needs to reach its CLM's final loss "
        "on the curve subset, the median over seeds and the envelope of the seeds' bootstrap intervals (\"never\": "
        "not within the run: a seed that never reaches it counts as infinitely many tokens).",
        md_table(header, gain),
        "What each cost and trained. *Step s*: the median seconds of an optimizer step in `log.jsonl` (every "
        "forward the step runs, the reference's included for an online method), mean over seeds; *scoring s*: "
        "per step, the offline scoring of the tokens a run read, counted for a run whose selection or objective "
        "reads the score store (its tokens per step ÷ the scorer's "
        f"{fmt(tokens_per_s, ',.0f')} tokens/s); *cost ÷ CLM*: (step + scoring) ÷ CLM's step, and in brackets "
        "the step alone. Not counted: the reference's own training, once for the whole grid ("
        f"{ref_steps} steps, {fmt(ref_s / 60, '.1f')} min here). Kinds: the share of the kind's tokens trained ÷ "
        "the share of clean tokens trained (1 = no preference; the token-kind table below has the intervals), "
        "mean over seeds. Timings are this machine's, taken as the runs ran.",
        md_table(["method", "tokens trained", "step s", "scoring s", "cost ÷ CLM"] + [f"`{k}`" for k in KINDS],
                 spend),
    ])
