"""Runs grouped over seeds, and the few formatting rules every section of the report shares (report.py and
methods.py use them): one definition of a group, its mean, its interval and how a change in % is written."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .selection import NA, fmt

BASELINES = ("base", "reference", "clm", "oracle")


def run_key(name: str, run: dict[str, Any]) -> tuple[Any, ...]:
    """Baselines first (base, reference, clm, oracle), then by method, ratio, seed."""
    method = run.get("method", name)
    rank = BASELINES.index(method) if method in BASELINES else len(BASELINES)
    return (rank, method, -float(run.get("ratio", 0) or 0), run.get("seed", 0) or 0, name)


def budget(run: dict[str, Any]) -> str:
    """How many tokens a run selects: 'ratio 0.5', or 'score > 0' for the threshold rules (positive, threshold)."""
    rule = run.get("rule", "topk")
    if rule == "topk" or run.get("method") in BASELINES:
        return f"ratio {fmt(run.get('ratio'), 'g')}"
    return f"score > {fmt(run.get('threshold') or 0.0, 'g')}"


@dataclass
class Group:
    """Runs that differ only in seed; comparisons use their mean perplexity."""

    label: str
    method: str
    budget: str  # how many tokens it selects (`budget`): a random control must match it
    names: list[str] = field(default_factory=list)
    ppl: dict[str, list[float]] = field(default_factory=dict)
    deltas: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # split -> each seed's Δ vs CLM

    def interval(self, split: str) -> tuple[float, float] | None:
        """The paired bootstrap 95 % interval of Δ vs CLM in % (over seeds: the envelope of theirs)."""
        d = self.deltas.get(split, [])
        if not d or len(d) < len(self.names):
            return None
        return min(x["lo"] for x in d), max(x["hi"] for x in d)

    def within_noise(self, split: str) -> bool:
        iv = self.interval(split)
        return iv is not None and iv[0] <= 0 <= iv[1]

    def mean(self, split: str) -> float:
        v = [x for x in self.ppl.get(split, []) if np.isfinite(x)]
        return float(np.mean(v)) if v else np.nan

    def std(self, split: str) -> float:
        v = [x for x in self.ppl.get(split, []) if np.isfinite(x)]
        return float(np.std(v, ddof=1)) if len(v) > 1 else np.nan


def groups(runs: dict[str, dict[str, Any]], order: list[str]) -> dict[str, Group]:
    """label (the run name without its `-s<seed>`) -> its group, in `order`."""
    found: dict[str, Group] = {}
    for n in order:
        r = runs[n]
        label = re.sub(r"-s\d+$", "", n)
        g = found.setdefault(label, Group(label, str(r.get("method", label)), budget(r)))
        g.names.append(n)
        for s, v in (r.get("val") or {}).items():
            g.ppl.setdefault(s, []).append(float(v.get("ppl", np.nan)))
        for s, d in (r.get("delta_vs_clm") or {}).items():
            g.deltas.setdefault(s, []).append(d)
    return found


def pct_change(value: float, base: float) -> float:
    return 100.0 * (value - base) / base


def signed(pct: float) -> str:
    return NA if not np.isfinite(pct) else f"{pct:+.1f} %"


def delta_cell(g: Group, clm: Group | None, split: str) -> str:
    """'−2.1 % [−2.6, −1.6]': the group's mean perplexity vs CLM's, with the envelope of its seeds' intervals."""
    if clm is None:
        return NA
    iv = g.interval(split) if g is not clm else None
    ci = f" [{iv[0]:+.1f}, {iv[1]:+.1f}]" if iv else ""
    return signed(pct_change(g.mean(split), clm.mean(split))) + ci
