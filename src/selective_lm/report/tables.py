"""The report's tables of downstream tasks, learning-curve speed, token buckets and update cosines (report.py
assembles them): each a section of report.md from results.json's values."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..analysis.buckets import BUCKETS
from .selection import NA, fmt, md_table, tokens_or_never


def _clm_of(name: str, runs: dict[str, dict[str, Any]], order: list[str]) -> str | None:
    """The CLM run a model is compared with: the one of its seed, else the first."""
    clms = [n for n in order if runs[n].get("method") == "clm"]
    return next((n for n in clms if runs[n].get("seed") == runs[name].get("seed")), clms[0] if clms else None)


def _with_stderr(value: float | None, stderr: float | None, spec: str) -> str:
    if value is None or not np.isfinite(value):
        return NA
    return format(value, spec) + (f" ± {stderr:.3f}" if stderr is not None and np.isfinite(stderr) else "")


def tasks_section(runs: dict[str, dict[str, Any]], order: list[str]) -> str:
    """One table per lm-eval task: each model's metrics with lm-eval's stderr, and the difference from CLM."""
    title = "## Downstream tasks"
    scores = {n: runs[n].get("tasks") or {} for n in order}
    tasks = list(dict.fromkeys(t for n in order for t in scores[n]))
    if not tasks:
        return f"{title}\n\nNo task results (`eval.tasks`, e.g. `slm run eval.tasks=[champ_answer]`)."
    text = [title, "lm-evaluation-harness metrics of each model (its tasks.json) ± lm-eval's standard error "
            "over the task's documents. Δ vs CLM is the difference from the CLM run of the same seed, ± the two "
            "standard errors combined as if independent (√(se₁² + se₂²)); both models answer the same documents, "
            "so this overstates the noise of the difference. A Δ under twice its standard error is within noise."]
    for task in tasks:
        have = [n for n in order if task in scores[n]]
        metrics = list(dict.fromkeys(m for n in have for m in scores[n][task] if not m.endswith("_stderr")))
        rows = []
        for n in have:
            mine, clm = scores[n][task], _clm_of(n, runs, order)
            theirs = scores[clm].get(task, {}) if clm is not None and clm != n else {}
            row = [f"`{n}`"]
            for m in metrics:
                a, b = mine.get(m), theirs.get(m)
                errors = [e for e in (mine.get(f"{m}_stderr"), theirs.get(f"{m}_stderr")) if e is not None]
                se = float(np.hypot(*errors)) if len(errors) == 2 else None
                row += [_with_stderr(a, mine.get(f"{m}_stderr"), ".3f"),
                        _with_stderr(a - b, se, "+.3f") if a is not None and b is not None else NA]
            rows.append(row)
        text += [f"### `{task}`", md_table(["run"] + [c for m in metrics for c in (m, f"Δ {m} vs CLM")], rows)]
    return "\n\n".join(text)


def _reach(point: float | None, interval: dict[str, Any] | None) -> str:
    text = tokens_or_never(point)
    if interval is None:
        return text
    return f"{text} [{tokens_or_never(interval['lo'])}, {tokens_or_never(interval['hi'])}]"


def speed_section(runs: dict[str, dict[str, Any]], order: list[str]) -> str:
    title = "## Learning curves and tokens to CLM's final loss"
    named = [n for n in order if runs[n].get("tokens_to_clm_final_by_split")]
    if not named:
        return f"{title}\n\nNo learning curves (runs/*/curve.jsonl; `eval.every=0` turns them off)."
    splits = list(runs[named[0]]["tokens_to_clm_final_by_split"])
    rows = [[f"`{n}`"] + [_reach(runs[n]["tokens_to_clm_final_by_split"].get(s),
                                 (runs[n].get("tokens_to_clm_final_interval") or {}).get(s)) for s in splits]
            for n in named]
    clm = next((runs[n]["tokens_seen"] for n in order if runs[n].get("method") == "clm"), None)
    return (f"{title}\n\nValidation loss on a fixed subset of each split during training "
            "(plots/learning_curves.png), and the training tokens each run needs to reach the final loss of its "
            f"CLM baseline on that subset (Rho-1's speed-up figure; CLM itself needs {fmt(clm, ',')}; "
            "\"never\" = not within the run), linear between the curve's points. The brackets are a bootstrap 95 % "
            "interval over the subset's documents (curve and target drawn together): the spread of the evaluation "
            "sample, not of training; a bound of \"never\" means that in more than 2.5 % of the draws the run does "
            "not reach CLM's loss, so no speed-up can be read from it.\n\n"
            + md_table(["run"] + [f"{s} tokens" for s in splits], rows))


def buckets_section(panels: dict[str, dict[str, dict[str, float]]]) -> str:
    text = ["## Token-bucket transitions"]
    if not panels:
        return text[0] + "\n\nNo bucket analysis in results.json (`buckets`, `buckets_trajectory`)."
    about = {
        "quantile method": "The replication's method: a token is H (high loss) if its loss exceeds a quantile "
        "of the baseline model's losses; start = baseline loss, end = the run's loss on the same tokens.",
        "trajectory method": "Rho-1's method: start and end are the ends of a straight line fitted to each "
        "token's loss over the run's checkpoints, so one noisy snapshot does not decide a token's bucket.",
    }
    for title, table in panels.items():
        rows = [[f"`{n}`"] + [fmt(100 * table[n][t], ".1f") if t in table[n] else NA for t in BUCKETS] for n in table]
        text += [f"### {title.capitalize()}", about[title], md_table(["run"] + [f"{t} %" for t in BUCKETS], rows)]
    return "\n\n".join(text)


def cosine_section(names: list[str], matrix: np.ndarray) -> str:
    title = "## Cosine similarity of parameter updates"
    if not names:
        return f"{title}\n\nNo cosine similarities in results.json."
    rows = [[f"`{a}`"] + [fmt(float(matrix[i, j]), ".3f") for j in range(len(names))] for i, a in enumerate(names)]
    return (
        f"{title}\n\nCosine between the runs' weight updates (final minus initial); 1 = same direction.\n\n"
        + md_table([""] + [f"`{n}`" for n in names], rows)
    )
