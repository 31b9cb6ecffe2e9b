"""`slm report`: turn the files of an experiment directory into `report.md`, plots and an HTML page.

The report reads only files under `--out` (results.json, runs/*/log.jsonl,
runs/*/selection_sample.npz, data/train/noise_mask.npy), so it can be re-rendered anywhere
without the models. Every section tolerates missing inputs and says what is missing instead
of failing: a half-finished grid still gets a report. All numbers and all the sentences
about them are computed from the inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..errors import UserError
from ..files import read_json, write_text
from ..method.registry import METHODS, STRATEGIES
from ..store.layout import OutDir
from . import page, plots
from .documents import documents_section, main_run
from .groups import Group, budget, delta_cell, groups, pct_change, run_key
from .methods import methods_section
from .selection import (
    NA,
    controls_section,
    fmt,
    kinds_section,
    md_table,
    relative,
    selection_section,
    wrong_step_section,
)
from .tables import buckets_section, cosine_section, speed_section, tasks_section


def _selects_by_score(method: str | None) -> bool:
    """A run whose selection follows a score (top-k, bottom-k, stochastic, a plugin's): not the baselines, not
    random (count only), not a method that trains every token."""
    entry = METHODS.get(method or "")
    return entry is not None and entry.strategy is not None and STRATEGIES[entry.strategy].uses_scores
# Relative changes under this (in %) round to 0.0 % in the text, so they read as "on par".
PAR_PCT = 0.05



def report(cfg: Config, out: str | Path | OutDir) -> dict[str, Any]:
    """The stage entry point: the tokenizer (for the HTML page) is the only thing taken from `cfg`."""
    out = OutDir.of(out)
    tokenizer = None
    if any(r.selection_sample.is_file() or r.doc_selection.is_file() for r in out.run_dirs()):
        from ..training.models import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    return write_report(out, tokenizer)


def write_report(out: str | Path | OutDir, tokenizer: Any = None) -> dict[str, Any]:
    """Write report.md, plots/*.png and selection.html under `out`; return what was written or skipped."""
    out = OutDir.of(out)
    if not out.results.is_file():
        raise UserError(f"no {out.results}: run `slm analyze --out {out}` (or `slm run`) first")
    results = read_json(out.results)
    if not isinstance(results, dict):
        raise UserError(f"{out.results} is not a JSON object")
    runs: dict[str, dict[str, Any]] = results.get("runs") or {}
    order = sorted(runs, key=lambda n: run_key(n, runs[n]))
    splits = _splits(runs)
    written: dict[str, Any] = {"plots": {}, "skipped": {}}

    logs = {n: _loss_points(out.run(n).log()) for n in order}
    logs = {n: pts for n, pts in logs.items() if pts}
    curves = {n: _series(out.run(n).curve(), "tokens_seen", "val_loss") for n in order}
    curves = {n: pts for n, pts in curves.items() if pts}
    cos_names, cos_matrix = _cosine_matrix(results.get("cosine") or {}, order)
    bucket_panels = {
        title: {n: table[n] for n in sorted(table, key=lambda n: run_key(n, runs.get(n, {})))}
        for title, table in (
            ("quantile method", results.get("buckets") or {}),
            ("trajectory method", results.get("buckets_trajectory") or {}),
        )
        if table
    }
    selection = results.get("selection") or {}
    sel_runs = sorted(selection, key=lambda n: run_key(n, runs.get(n, {})))
    ppl = {s: [_ppl(runs[n], s) for n in order] for s in splits}
    figures = {
        "loss_curves": (logs, lambda p: plots.loss_curves(logs, p), "no runs/*/log.jsonl"),
        "val_ppl": (splits, lambda p: plots.val_ppl(order, ppl, p), "no validation results"),
        "learning_curves": (curves, lambda p: plots.learning_curves(curves, p), "no runs/*/curve.jsonl"),
        "buckets": (bucket_panels, lambda p: plots.buckets(bucket_panels, p), "no bucket analysis"),
        "cosine": (cos_names, lambda p: plots.cosine(cos_names, cos_matrix, p), "no cosine similarities"),
        "selection": (
            sel_runs,
            lambda p: plots.selection(
                sel_runs,
                [selection[n].get("noise_selected_frac", np.nan) for n in sel_runs],
                [selection[n].get("clean_selected_frac", np.nan) for n in sel_runs],
                p,
            ),
            "no selection diagnostics",
        ),
    }
    kind_runs = [n for n in sel_runs if (selection[n].get("by_kind") or {}).get("clean")]
    kinds = [k for k in dict.fromkeys(k for n in kind_runs for k in selection[n]["by_kind"]) if k != "clean"]
    rel = {k: [relative(selection[n]["by_kind"], k) for n in kind_runs] for k in kinds}
    figures["selection_by_kind"] = (kind_runs and kinds, lambda p: plots.selection_by_kind(kind_runs, rel, p),
                                    "no per-kind selection")
    slm_runs = [n for n in order if _selects_by_score(runs[n].get("method"))]
    over = {n: _series(out.run(n).log(), "step", "selected_by_kind") for n in slm_runs}
    over = {n: pts for n, pts in over.items() if pts}
    figures["selection_over_training"] = (over, lambda p: plots.selection_over_training(over, p),
                                          "no per-step selection by kind")
    for name, (data, draw, why) in figures.items():
        if data:
            path = out.plot(name)
            draw(path)
            written["plots"][name] = str(path)
        else:
            written["skipped"][name] = why

    samples = page.read_samples(out, [n for n in order if runs[n].get("method") not in ("reference", "base")])
    written["html"] = None
    if samples:
        write_text(out.selection_html, page.page(out, samples, {n: runs[n].get("seed") for n in order}, tokenizer))
        written["html"] = str(out.selection_html)
    else:
        written["skipped"]["selection.html"] = "no runs/*/selection_sample.npz"

    doc_run = main_run(runs, [n for n in slm_runs if METHODS[runs[n]["method"]].role == "method"])
    sections = [
        f"# Selective LM report — preset `{results.get('preset', '?')}`, selective-lm {results.get('version', '?')}",
        _runs_section(runs, order, splits, results.get("other_runs") or []),
        methods_section(out, runs, order, splits, selection),
        _comparison_section(runs, order, splits),
        tasks_section(runs, order),
        speed_section(runs, order),
        buckets_section(bucket_panels),
        cosine_section(cos_names, cos_matrix),
        controls_section(results.get("comparisons") or {}, splits, runs),
        selection_section(selection, sel_runs),
        kinds_section(selection, kind_runs, kinds, results.get("separation_step0") or {}),
        documents_section(out, doc_run, runs.get(doc_run or "", {}), tokenizer),
        wrong_step_section(selection, sel_runs, runs, order),
        _links_section(written),
    ]
    write_text(out.report, "\n\n".join(sections) + "\n")
    written["report"] = str(out.report)
    return written


# ---------------------------------------------------------------- reading


def _splits(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Validation splits present in any run: clean first, then noisy, then the rest."""
    names = {s for r in runs.values() for s in (r.get("val") or {})}
    return sorted(names, key=lambda s: ("clean" not in s, "noisy" not in s, s))


def _ppl(run: dict[str, Any], split: str) -> float:
    return float(((run.get("val") or {}).get(split) or {}).get("ppl", np.nan))


def _loss_points(log: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, loss) pairs of a run's log; a record without a usable loss is skipped."""
    points = []
    for row in log:
        try:
            points.append((int(row["step"]), float(row["loss"])))
        except (KeyError, TypeError, ValueError):
            continue
    return points


def _series(records: list[dict[str, Any]], x: str, field: str) -> dict[str, list[tuple[int, float]]]:
    """key -> (record[x], value) points of a per-record mapping `field` (a curve's `val_loss` per split,
    a log's `selected_by_kind` per kind)."""
    points: dict[str, list[tuple[int, float]]] = {}
    for row in records:
        for key, value in (row.get(field) or {}).items():
            points.setdefault(key, []).append((int(row[x]), float(value)))
    return points


def _cosine_matrix(pairs: dict[str, float], order: list[str]) -> tuple[list[str], np.ndarray]:
    """The symmetric matrix of `"a|b": cos` pairs (diagonal 1, unknown pairs NaN)."""
    pairs = {k: v for k, v in pairs.items() if "|" in k}
    found = {n for key in pairs for n in key.split("|", 1)}
    names = [n for n in order if n in found] + sorted(found - set(order))
    idx = {n: i for i, n in enumerate(names)}
    matrix = np.full((len(names), len(names)), np.nan)
    np.fill_diagonal(matrix, 1.0)
    for key, value in pairs.items():
        a, b = key.split("|", 1)
        matrix[idx[a], idx[b]] = matrix[idx[b], idx[a]] = float(value)
    return names, matrix


# ---------------------------------------------------------------- formatting


# ---------------------------------------------------------------- sections


def _runs_section(runs: dict[str, dict[str, Any]], order: list[str], splits: list[str], others: list[str]) -> str:
    if not runs:
        return "## Runs\n\nresults.json has no runs yet."
    note = (f"\n\nNot in this grid (other configs in the same out dir, left out of every table): "
            f"{', '.join(f'`{n}`' for n in others)}." if others else "")
    header = ["run", "method", "selects", "seed", "steps", "tokens trained", "trained share", "train loss (final)"]
    header += [f"{s} ppl" for s in splits]
    rows = []
    for n in order:
        r = runs[n]
        rows.append(
            [
                f"`{n}`",
                str(r.get("method", NA)),
                budget(r),
                fmt(r.get("seed"), "d"),
                fmt(r.get("steps"), ","),
                fmt(r.get("tokens_trained"), ","),
                fmt(r.get("selected_share"), ".3f"),
                fmt(r.get("train_loss_final"), ".3f"),
            ]
            + [fmt(_ppl(r, s), ".2f") for s in splits]
        )
    text = ("## Runs\n\nPerplexity is token-weighted (exp of the mean loss over all validation tokens). *Selects*: "
            "the ratio of each scope unit's tokens (rule topk), or every token whose score exceeds a threshold "
            "(rules positive and threshold; random controls then draw as many). *Trained share*: tokens trained / "
            "tokens that could train, over the whole run (`log.jsonl` has it per step as `selected_frac`).\n\n")
    text += md_table(header, rows)
    multi = [g for g in groups(runs, order).values() if len(g.names) > 1]
    if multi:
        rows = [
            [f"`{g.label}`", g.method, g.budget, str(len(g.names))] + [_mean_std(g.ppl[s]) for s in splits]
            for g in multi
        ]
        text += "\n\n### Over seeds\n\nMean ± sample standard deviation of validation perplexity.\n\n"
        text += md_table(["group", "method", "selects", "seeds"] + [f"{s} ppl" for s in splits], rows)
    return text + note


def _mean_std(values: list[float]) -> str:
    v = np.array([x for x in values if np.isfinite(x)])
    if v.size == 0:
        return NA
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if v.size > 1 else f"{v[0]:.2f}"


def _comparison_section(runs: dict[str, dict[str, Any]], order: list[str], splits: list[str]) -> str:
    title = "## SLM vs the baselines"
    found = groups(runs, order)
    # The methods under test (`registry.Method.role`): not the baselines, not the controls.
    slm = [g for g in found.values() if g.method in METHODS and METHODS[g.method].role == "method"]
    if not slm or not splits:
        return f"{title}\n\nNo SLM run with validation results: nothing to compare."
    by_method = {g.method: g for g in found.values() if g.method in ("clm", "oracle", "reference")}
    clm = by_method.get("clm")
    randoms = {g.budget: g for g in found.values() if g.method == "random"}
    lines = [
        title,
        "Each SLM setting beside the random-selection control of the same count (ratio or threshold), the oracle (CLM "
        "trained without the injected noise tokens), CLM and the reference model. Δ is the relative "
        "perplexity change vs CLM (negative = better), with its paired bootstrap 95 % interval over the "
        "validation documents in brackets; settings with several seeds use the mean (and the envelope of "
        "their intervals). A difference whose interval covers 0 is called within noise.",
    ]
    for g in slm:
        peers = (g, randoms.get(g.budget), *(by_method.get(m) for m in ("oracle", "clm", "reference")))
        rows_of = [x for x in peers if x]
        header = ["model"] + [c for s in splits for c in (f"{s} ppl", f"Δ {s} vs CLM")]
        rows = []
        for x in rows_of:
            row = [f"`{x.label}`" + (f" ({len(x.names)} seeds)" if len(x.names) > 1 else "")]
            for s in splits:
                row += [fmt(x.mean(s), ".2f"), delta_cell(x, clm, s)]
            rows.append(row)
        lines += [
            f"### `{g.label}`",
            md_table(header, rows),
            _verdict(g, clm, randoms.get(g.budget), by_method.get("oracle"), splits),
        ]
    return "\n\n".join(lines)


def _versus(g: Group, other: Group, splits: list[str], name: str, noise: tuple[str, ...] = ()) -> str:
    """'3.1 % better than CLM on val_clean but 2.0 % worse on val_noisy'; a split of `noise` (the difference's
    interval covers 0) reads 'within noise', whatever the point estimate, as everywhere else in the report."""
    parts: list[str] = []
    last = None
    for s in splits:
        pct = pct_change(g.mean(s), other.mean(s))
        if not np.isfinite(pct):
            continue
        word = "within noise" if s in noise else "on par" if abs(pct) < PAR_PCT else ("better" if pct < 0 else "worse")
        text = f"{word} ({pct:+.1f} %)" if word == "within noise" else word if word == "on par" \
            else f"{abs(pct):.1f} % {word}"
        if not parts:
            text += f" with {name}" if word in ("on par", "within noise") else f" than {name}"
        joiner = "" if not parts else (" and " if word == last else " but ")
        parts.append(f"{joiner}{text} on {s}")
        last = word
    return "".join(parts) or "not comparable (perplexities missing)"


def _verdict(g: Group, clm: Group | None, rnd: Group | None, oracle: Group | None, splits: list[str]) -> str:
    """The comparison in words, every claim derived from the group means."""
    out: list[str] = []
    seeds = f" (mean of {len(g.names)} seeds)" if len(g.names) > 1 else ""
    if clm is None:
        out.append(f"There is no CLM run, so `{g.label}` cannot be compared with plain training.")
        better: list[str] = []
        worse: list[str] = []
    else:
        noise = [s for s in splits if g.within_noise(s)]
        out.append(f"`{g.label}`{seeds} is {_versus(g, clm, splits, 'CLM', tuple(noise))}.")
        deltas = {s: pct_change(g.mean(s), clm.mean(s)) for s in splits}
        if noise:
            out.append(f"On {', '.join(noise)} the difference is within noise (its 95 % interval covers 0): neither "
                       "a gain nor a loss.")
        better = [s for s, d in deltas.items() if np.isfinite(d) and d <= -PAR_PCT and s not in noise]
        worse = [s for s, d in deltas.items() if np.isfinite(d) and d >= PAR_PCT and s not in noise]
        noisy_seed = [s for s in splits if abs(g.mean(s) - clm.mean(s)) < g.std(s)]
        if noisy_seed:
            out.append(f"On {', '.join(noisy_seed)} the difference is smaller than the spread across seeds.")
    entry = METHODS.get(g.method)
    if entry is not None and not entry.selects:
        out.append("It trains every token (a weighting, not a selection): no random control applies.")
    elif rnd is None:
        out.append(f"There is no random-selection control that selects {g.budget}.")
    else:
        wins = [s for s in splits if g.mean(s) < rnd.mean(s)]
        known = [s for s in splits if np.isfinite(g.mean(s)) and np.isfinite(rnd.mean(s))]
        if known and len(wins) == len(known):
            every = {1: known[0], 2: "both splits"}.get(len(known), f"all {len(known)} splits")
            out.append(f"It beats `{rnd.label}` (random selection, {g.budget}) on {every}.")
        elif wins:
            lost = [s for s in known if s not in wins]
            out.append(f"It beats `{rnd.label}` on {', '.join(wins)} but not on {', '.join(lost)}.")
        elif known:
            out.append(
                f"It does not beat `{rnd.label}` on any split: the selection score adds nothing over "
                f"random selection of {g.budget}."
            )
    if oracle is not None:
        out.append(f"It is {_versus(g, oracle, splits, 'the oracle')}.")
    if clm is not None:
        clean = [s for s in better if "clean" in s]
        noisy = [s for s in worse if "noisy" in s]
        if not better:
            out.append(f"**No gain here:** `{g.label}` is not better than CLM on any validation split.")
        elif clean and noisy:
            out.append(
                f"**Its gain on {clean[0]} comes with a loss on {noisy[0]}**, which suggests it imitates "
                "the reference's style rather than filtering noise."
            )
        elif not worse:
            out.append(f"`{g.label}` improves on CLM without losing on any split"
                       + (f" ({', '.join(noise)} within noise)." if noise else "."))
    return " ".join(out)


def _links_section(written: dict[str, Any]) -> str:
    lines = ["## Figures and pages", ""]
    for name, path in written["plots"].items():
        lines.append(f"- [{name}](plots/{Path(path).name})\n\n  ![{name}](plots/{Path(path).name})")
    if written["html"]:
        lines.append("- [selected tokens, highlighted per run](selection.html)")
    lines += [f"- {name}: not drawn ({why})" for name, why in written["skipped"].items()]
    return "\n".join(lines)
