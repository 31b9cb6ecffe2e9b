"""The figures of `slm report`: one function per PNG (the selected-token page is `page.py`).

Each function takes plain data (already read from the run directory by `report/__init__.py`). PNGs are
written atomically, so that a report killed half-way never leaves a truncated image that looks
complete; figures are built with matplotlib's object API (no pyplot), so
no display and no global backend state are involved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from ..analysis.buckets import BUCKETS
from ..files import atomic_path

DPI = 120


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
