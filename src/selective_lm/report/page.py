"""selection.html: what every training run selected, side by side on the same blocks.

Each run saves the first selection unit of its step 0 (`selection_sample.npz`: rows, tokens, weights). The block
order depends on the seed only (`BlockOrder`), so every run of a seed reads the same first unit: the page shows
those blocks, one row per run, each token highlighted by that run's weight, with its score (the step-0 excess loss,
`step0.py`) and its kind on hover. The reference trains on another split and is no run: it has no row. Runs whose
samples share no block (other seeds) get a section of their own. One static file, inline CSS, no script.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UserError
from ..store.layout import BASELINE_DIRS, OutDir, TokenStore
from ..training.models import token_texts
from .step0 import Step0, read_step0

HTML_BLOCKS = 3  # per group of runs that read the same blocks
HTML_MAX_TOKENS = 400

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:80em;color:#222}
.row{display:grid;grid-template-columns:12em 1fr;gap:1em;border-top:1px solid #ddd;padding:.5em 0}
.name{font-family:monospace;font-weight:bold}.name small{display:block;font-weight:normal;color:#666}
.toks{font-family:monospace;white-space:pre-wrap;line-height:1.7}
.t{color:#999;padding:0 1px}.sel{color:#111}
.noise{text-decoration:underline wavy #d00;text-decoration-thickness:1px;box-shadow:inset 0 -3px 0 #f3b0b0}
.legend span{margin-right:1.5em;padding:.1em .4em}"""


@dataclass
class Group:
    """Runs that sampled the same blocks (one seed's runs), and the blocks every one of them sampled."""

    runs: list[str] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)


def read_samples(out: OutDir, names: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """run -> its selection sample, for the training runs under runs/ (never the reference or the base model)."""
    samples = {}
    for n in names:
        path = out.run(n).selection_sample
        if n not in BASELINE_DIRS and path.is_file():
            with np.load(path) as z:
                samples[n] = {k: z[k] for k in ("rows", "tokens", "weights")}
    return samples


def groups(samples: Mapping[str, Mapping[str, np.ndarray]], labels: Mapping[str, str]) -> list[Group]:
    """Runs in order, each joining the first group of its label (its seed) whose blocks it also sampled (the group
    keeps the blocks they all sampled, in the first run's order), else starting one. By label, not by overlap alone:
    two seeds' first units may share a block by chance, and their runs read different blocks after it."""
    found: list[tuple[str, Group]] = []
    for name, s in samples.items():
        rows = [int(r) for r in s["rows"]]
        label = labels.get(name, "")
        for key, g in found:
            shared = [b for b in g.blocks if b in rows]
            if key == label and shared:
                g.runs.append(name)
                g.blocks = shared
                break
        else:
            found.append((label, Group([name], list(dict.fromkeys(rows)))))
    return [g for _, g in found]


def _title(tid: int, weight: float, kind: str | None, ref: float, excess: float) -> str:
    """A token's hover text: its weight in this run, its step-0 score (where measured), its kind, its id."""
    parts = [f"weight {weight:.3g}"]
    if np.isfinite(excess):
        parts.append(f"excess {excess:+.3f} (base {excess + ref:.3f} − reference {ref:.3f})")
    elif np.isfinite(ref):
        parts.append(f"reference loss {ref:.3f}")
    if kind is not None:
        parts.append(f"kind {kind}")
    return " · ".join([*parts, f"id {tid}"])


def _row(name: str, note: str, texts: Sequence[str], ids: Sequence[int], weights: np.ndarray,
         noise: np.ndarray | None, kinds: Sequence[str | None], ref: np.ndarray, excess: np.ndarray) -> str:
    """One run's row: each token's look depends on its text, noise flag, scores and this run's weight only, so two
    rows differ exactly where the runs' weights differ."""
    spans = []
    for t, (text, tid) in enumerate(zip(texts, ids, strict=True)):
        w = float(weights[t])
        cls = "t sel" if w > 0 else "t"
        if noise is not None and noise[t]:
            cls += " noise"
        # A weight of 1 (hard selection) is full green; soft weights shade below and cap at it.
        style = f" style='background:rgba(40,160,60,{0.15 + 0.6 * min(w, 1.0):.2f})'" if w > 0 else ""
        title = html.escape(_title(tid, w, kinds[t], float(ref[t]), float(excess[t])), quote=True)
        body = html.escape(text.replace("\n", "↵\n"), quote=True)
        spans.append(f"<span class='{cls}'{style} title='{title}'>{body}</span>")
    return (f"<div class='row' data-run='{html.escape(name, quote=True)}'><div class='name'>{html.escape(name)}"
            f"<small>{html.escape(note)}</small></div><div class='toks'>{''.join(spans)}</div></div>")


def render(samples: Mapping[str, Mapping[str, np.ndarray]], labels: Mapping[str, str], tokenizer: Any,
           store: TokenStore | None, step0: Step0) -> str:
    """The page: per group of runs (`groups`), up to HTML_BLOCKS of their shared blocks, one row per run.

    samples: run -> {"rows" [B], "tokens" [B, T], "weights" [B, T]}; labels: run -> its group's caption word
    (e.g. its seed); store: the train split (noise mask and token kinds; None: neither shown).
    """
    names = store.kind_names if store is not None else []
    scored = bool(step0.excess)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Selected tokens</title>",
        f"<style>{_CSS}</style></head><body><h1>Selected tokens per run</h1>",
        "<p class='legend'><span class='t sel' style='background:rgba(40,160,60,.75)'>selected</span>"
        "<span class='t'>not selected</span><span class='t noise'>injected noise</span></p>",
        "<p>Every training run reads the same blocks in the same order for a seed: these are the first selection "
        "unit of step 0, one row per run (the reference trains on its own split: it has no row). Green intensity = "
        "the token's training weight (1 = full; soft selections shade). Hover a token for its weight in that run, "
        + ("its step-0 score (excess loss: the base model's loss, every student's at step 0, minus the "
           "reference's), " if scored else "the reference's loss (where scored), ")
        + "its kind and its id. A run with a self-reference trains every token during its warm-up, so its row "
        "shows all selected.</p>",
    ]
    for g in groups(samples, labels):
        seeds = sorted({labels.get(n, "") for n in g.runs} - {""})
        parts.append(f"<h2>{html.escape(', '.join(seeds) or 'Runs')}: {len(g.runs)} run"
                     f"{'s' * (len(g.runs) != 1)}</h2>")
        for row in g.blocks[:HTML_BLOCKS]:
            first = samples[g.runs[0]]
            b = int(np.flatnonzero(first["rows"] == row)[0])
            ids = [int(t) for t in first["tokens"][b][:HTML_MAX_TOKENS]]
            n = len(ids)
            texts = token_texts(tokenizer, ids)
            block = store is not None and row < store.n_blocks
            noise = np.asarray(store.noise_mask[row][:n]) if block and store.noise_mask is not None else None
            kind_ids = np.asarray(store.noise_kind[row][:n]) if block and store.noise_kind is not None else None
            kinds = [names[k] if k < len(names) else str(k) for k in kind_ids.tolist()] if kind_ids is not None \
                else [None] * n
            nan = np.full(first["tokens"].shape[1], np.nan)
            ref, excess = step0.reference.get(row, nan)[:n], step0.excess.get(row, nan)[:n]
            parts.append(f"<h3>Block {row}</h3>")
            if n < first["tokens"].shape[1]:
                parts.append(f"<p>The first {n} of {first['tokens'].shape[1]} tokens.</p>")
            for name in g.runs:
                s = samples[name]
                weights = s["weights"][int(np.flatnonzero(s["rows"] == row)[0])]
                note = f"{100 * float(np.mean(weights > 0)):.0f} % of the block's tokens selected"
                parts.append(_row(name, note, texts, ids, weights[:n], noise, kinds, ref, excess))
    parts.append("</body></html>")
    return "\n".join(parts)


def page(out: OutDir, samples: Mapping[str, Mapping[str, np.ndarray]], seeds: Mapping[str, Any],
         tokenizer: Any) -> str:
    """`render` with the train store and the step-0 scores of the blocks read from `out` (each optional)."""
    try:
        store: TokenStore | None = out.store("train")
    except UserError:
        store = None
    rows = np.concatenate([s["rows"] for s in samples.values()]) if samples else np.zeros(0, np.int64)
    step0 = read_step0(out, store, rows) if store is not None else Step0()
    labels = {n: f"seed {seeds[n]}" for n in samples if seeds.get(n) is not None}
    return render(samples, labels, tokenizer, store, step0)
