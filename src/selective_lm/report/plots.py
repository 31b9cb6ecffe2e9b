"""The visual outputs of `slm report`: one function per PNG, and the selected-token HTML page.

Each function takes plain data (already read from the run directory by `report.py`). PNGs are
written atomically, so that a report killed half-way never leaves a truncated image that looks
complete; figures are built with matplotlib's object API (no pyplot), so
no display and no global backend state are involved. The HTML page is
returned as a string, self-contained (inline CSS, no external assets).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from ..analysis.buckets import BUCKETS
from ..files import atomic_path
from ..training.models import token_texts

DPI = 120
HTML_BLOCKS = 3
HTML_MAX_TOKENS = 400


def _save(fig: Figure, path: Path) -> None:
    """savefig to a temporary sibling, then rename: the format is explicit since the temp name ends in .tmp."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def smoothing_window(n: int) -> int:
    """Points per moving-average window for a curve of `n` points: ~10 %, 1 (no smoothing) under 20 points."""
    return max(1, n // 10)


def _smooth(y: np.ndarray) -> np.ndarray:
    """A centred moving average over ~10 % of the points: per-step SLM losses are noisy."""
    window = smoothing_window(len(y))
    if window == 1:
        return y
    kernel = np.ones(window) / window
    return np.convolve(np.pad(y, (window // 2, window - 1 - window // 2), mode="edge"), kernel, mode="valid")


def _grouped_bars(
    ax, labels: Sequence[str], series: Mapping[str, Sequence[float]], fmt: str, colors: Sequence[str] | None = None
) -> None:
    """Bars of several series side by side per label, each annotated; the legend sits in headroom above them."""
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        color = colors[i] if colors else None
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name, color=color)
        ax.bar_label(bars, labels=[fmt.format(v) if np.isfinite(v) else "" for v in values], fontsize=7, padding=1)
    finite = [v for values in series.values() for v in values if np.isfinite(v)]
    if finite and max(finite) > 0:
        ax.set_ylim(0, 1.25 * max(finite))
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.legend(fontsize=8, ncol=len(series), loc="upper center")
    ax.grid(axis="y", alpha=0.3)


def loss_curves(logs: Mapping[str, Sequence[tuple[int, float]]], path: Path) -> Figure:
    """Training loss vs optimizer step, one line per run; `logs` maps run → [(step, loss)].

    A run of 20 steps or more gets its per-step loss faint and a moving average bold; a shorter one
    (the smoke preset's) has nothing to average, so it is drawn per step only and the title says so.
    """
    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    colors = matplotlib.colormaps["tab20" if len(logs) > 10 else "tab10"]
    windows = set()
    for i, (name, points) in enumerate(logs.items()):
        steps = np.array([p[0] for p in points], dtype=float)
        loss = np.array([p[1] for p in points], dtype=float)
        color = colors(i % colors.N)
        window = smoothing_window(len(loss))
        windows.add(window)
        if window > 1:
            ax.plot(steps, loss, color=color, lw=0.7, alpha=0.3)
        ax.plot(steps, _smooth(loss), color=color, lw=1.6, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats, mean over trained tokens)")
    smoothed = sorted(w for w in windows if w > 1)
    if not smoothed:
        how = "per optimizer step (too few steps for a moving average)"
    else:
        span = f"{smoothed[0]}" if len(smoothed) == 1 else f"{smoothed[0]}–{smoothed[-1]}"
        how = f"faint: per step; bold: centred moving average over {span} steps (~10 % of a run)"
        if 1 in windows:
            how += "; runs under 20 steps: per step only"
    ax.set_title(f"Training loss — mean over the tokens each run trains on\n({how})")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    _save(fig, path)
    return fig


def learning_curves(curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], path: Path) -> None:
    """Validation perplexity vs training tokens seen, one panel per split; `curves` maps run → split → points."""
    splits = list(dict.fromkeys(s for by_split in curves.values() for s in by_split))
    fig = Figure(figsize=(6.5 * len(splits), 4.8))
    axes = fig.subplots(1, len(splits), squeeze=False)[0]
    colors = matplotlib.colormaps["tab20" if len(curves) > 10 else "tab10"]
    for ax, split in zip(axes, splits, strict=True):
        for i, (name, by_split) in enumerate(curves.items()):
            if split in by_split:
                tokens, loss = zip(*by_split[split], strict=True)
                ax.plot(tokens, np.exp(loss), color=colors(i % colors.N), marker="o", ms=3, lw=1.4, label=name)
        ax.set_xlabel("training tokens seen")
        ax.set_ylabel("validation perplexity (fixed subset)")
        ax.set_title(split)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("Learning curves: validation perplexity during training")
    _save(fig, path)


def val_ppl(runs: Sequence[str], ppl: Mapping[str, Sequence[float]], path: Path) -> None:
    """Grouped bars of validation perplexity; `ppl` maps split → one value per run (NaN = missing)."""
    fig = Figure(figsize=(max(7, 0.9 * len(runs) + 3), 5))
    ax = fig.subplots()
    _grouped_bars(ax, runs, ppl, "{:.2f}")
    finite = [v for values in ppl.values() for v in values if np.isfinite(v) and v > 0]
    # An untrained base model sits orders of magnitude above the trained runs: a log axis keeps both readable.
    if finite and max(finite) / min(finite) > 10:
        ax.set_yscale("log")
        ax.set_ylim(0.7 * min(finite), 4 * max(finite))
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("Validation perplexity per run and split")
    _save(fig, path)


def buckets(panels: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path) -> None:
    """Token-bucket transitions: one panel per method, `panels` maps method title → run → {transition: frac}."""
    fig = Figure(figsize=(6.5 * len(panels), 4.8))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, table) in zip(axes[0], panels.items(), strict=True):
        runs = list(table)
        series = {t: [100 * table[r].get(t, np.nan) for r in runs] for t in BUCKETS}
        _grouped_bars(ax, runs, series, "{:.0f}", colors=["#7f7f7f", "#2ca02c", "#d62728", "#1f77b4"])
        ax.set_ylabel("share of tokens (%)")
        ax.set_title(title)
    fig.suptitle("Token-bucket transitions (H = high loss, L = low loss; start -> end)")
    _save(fig, path)


def cosine(names: Sequence[str], matrix: np.ndarray, path: Path) -> None:
    """Heat map of cosine similarities between runs' parameter updates, values written in the cells."""
    n = len(names)
    fig = Figure(figsize=(max(5, 0.8 * n + 2.5), max(4, 0.7 * n + 1.5)))
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap="RdBu_r", vmin=-1, vmax=1)
    for i in range(n):
        for j in range(n):
            if np.isfinite(matrix[i, j]):
                color = "white" if abs(matrix[i, j]) > 0.6 else "black"
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(n), names, rotation=30, ha="right")
    ax.set_yticks(range(n), names)
    fig.colorbar(im, ax=ax, label="cosine similarity")
    ax.set_title("Cosine similarity of parameter updates")
    _save(fig, path)


def selection(runs: Sequence[str], noise: Sequence[float | None], clean: Sequence[float | None], path: Path) -> None:
    """Share of noise vs clean tokens each run selected (fractions in, percent shown; None, e.g. the noise share
    of a noise-free store such as supervised fine-tuning data, is no bar)."""
    fig = Figure(figsize=(max(6, 0.9 * len(runs) + 3), 4.8))
    ax = fig.subplots()
    series = {
        "noise tokens selected": [np.nan if v is None else 100 * v for v in noise],
        "clean tokens selected": [np.nan if v is None else 100 * v for v in clean],
    }
    _grouped_bars(ax, runs, series, "{:.0f}", colors=["#d62728", "#2ca02c"])
    ax.set_ylabel("selected (%)")
    ax.set_title("Share of noise vs clean tokens selected\n(a selection that filters noise keeps red well below green)")
    _save(fig, path)


def selection_by_kind(runs: Sequence[str], shares: Mapping[str, Sequence[float]], path: Path) -> None:
    """Share of each token kind trained per run, relative to the clean share (1 = no preference; below 1 =
    the selection drops that kind); `shares` maps kind → one ratio per run."""
    fig = Figure(figsize=(max(7, 1.1 * len(runs) + 3), 4.8))
    ax = fig.subplots()
    _grouped_bars(ax, runs, shares, "{:.2f}")
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_ylabel("share trained / clean share trained")
    ax.set_title("Selection by token kind (below the dashed line: the run trains less on that kind than on clean text)")
    _save(fig, path)


def selection_over_training(curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], path: Path) -> None:
    """Per-step share of each kind trained, one panel per run; `curves` maps run → kind → (step, share)."""
    fig = Figure(figsize=(5 * len(curves), 4))
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (name, kinds) in zip(axes, curves.items(), strict=True):
        for kind, points in kinds.items():
            steps, share = zip(*points, strict=True)
            ax.plot(steps, _smooth(np.array(share)), lw=1.4, label=kind)
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of the kind's tokens trained (moving average)")
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)


# ---------------------------------------------------------------- selection.html


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:80em;color:#222}
.row{display:grid;grid-template-columns:12em 1fr;gap:1em;border-top:1px solid #ddd;padding:.5em 0}
.name{font-family:monospace;font-weight:bold}.name small{display:block;font-weight:normal;color:#666}
.toks{font-family:monospace;white-space:pre-wrap;line-height:1.7}
.t{color:#999;padding:0 1px}.sel{color:#111}
.noise{text-decoration:underline wavy #d00;text-decoration-thickness:1px;box-shadow:inset 0 -3px 0 #f3b0b0}
.legend span{margin-right:1.5em;padding:.1em .4em}"""


def selection_html(samples: Mapping[str, Mapping[str, np.ndarray]], noise: np.ndarray | None, tokenizer: Any) -> str:
    """One section per sampled block, one row per run.

    samples: run → {"rows" [B], "tokens" [B, T], "weights" [B, T]}, the same blocks in every run;
    noise: the train split's noise mask [n_blocks, T] (indexed by `rows`), or None.
    """
    first = next(iter(samples.values()))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Selected tokens</title>",
        f"<style>{_CSS}</style></head><body><h1>Selected tokens per run</h1>",
        "<p class='legend'><span class='t sel' style='background:rgba(40,160,60,.55)'>selected</span>"
        "<span class='t'>not selected</span><span class='t noise'>injected noise</span>"
        "Green intensity = the token's training weight (soft selection) relative to the run's largest weight"
        " in the block. Hover a token for its id and weight.</p>",
    ]
    for b, row in enumerate(first["rows"][:HTML_BLOCKS]):
        ids = [int(t) for t in first["tokens"][b][:HTML_MAX_TOKENS]]
        texts = token_texts(tokenizer, ids)
        mask = noise[int(row)] if noise is not None and int(row) < len(noise) else None
        parts.append(f"<h2>Block {int(row)}</h2>")
        if len(ids) < first["tokens"].shape[1]:
            parts.append(f"<p>The first {len(ids)} of {first['tokens'].shape[1]} tokens.</p>")
        for n, s in samples.items():
            where = np.flatnonzero(s["rows"] == row)
            if where.size:
                parts.append(_html_row(n, texts, ids, s["weights"][where[0]][: len(ids)], mask))
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_row(name: str, texts: list[str], ids: list[int], weights: np.ndarray, noise: Any) -> str:
    top = float(weights.max()) if weights.size and weights.max() > 0 else 1.0
    spans = []
    for t, (text, tid, w) in enumerate(zip(texts, ids, weights, strict=False)):
        cls = "t sel" if w > 0 else "t"
        if noise is not None and t < len(noise) and noise[t]:
            cls += " noise"
        style = f" style='background:rgba(40,160,60,{0.15 + 0.6 * min(w / top, 1.0):.2f})'" if w > 0 else ""
        body = html.escape(text.replace("\n", "↵\n"))
        spans.append(f"<span class='{cls}'{style} title='id {tid}, weight {w:.3g}'>{body}</span>")
    frac = f"{100 * float(np.mean(weights > 0)):.0f} % selected"
    return (
        f"<div class='row'><div class='name'>{html.escape(name)}<small>{frac}</small></div>"
        f"<div class='toks'>{''.join(spans)}</div></div>"
    )
