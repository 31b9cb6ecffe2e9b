"""The report's tables and its sections on what selection selects: selection diagnostics, token kinds (with
token counts and intervals), CHAMP's natural wrong reasoning, and the controls (each registered control's
question, `registry.Method.compare`). Pure formatting of results.json's numbers; `report/__init__.py` assembles
the page.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..method.registry import METHODS

NA = "—"
# A kind with fewer target tokens over a run than this is shown in italics, marked "few": its share then rests
# on a handful of lines or documents (the default study's `numbers` had 59), too few to read a ratio from.
MIN_KIND_TOKENS = 200
WRONG_STEP = ("after_wrong_step", "before_wrong_step")


def fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return NA
    return format(value, spec)


def tokens_or_never(value: float | None) -> str:
    """A count of training tokens to a target loss, or "never" (None or infinite: not reached within the run)."""
    return "never" if value is None or np.isinf(value) else fmt(value, ",.0f")


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def selection_section(selection: dict[str, dict[str, float]], order: list[str]) -> str:
    title = "## Selection diagnostics"
    if not selection:
        return f"{title}\n\nNo selection diagnostics in results.json."
    extra = [k for k in ("ref_loss_selected", "ref_loss_unselected") if any(k in selection[n] for n in order)]
    rows = []
    for n in order:
        d = selection[n]
        # None: nothing to measure (a noise-free store, e.g. supervised fine-tuning data, has no noise share)
        noise, clean = (np.nan if d.get(k) is None else d[k] for k in ("noise_selected_frac", "clean_selected_frac"))
        rows.append(
            [f"`{n}`", fmt(100 * noise, ".1f"), fmt(100 * clean, ".1f"), _selection_word(noise, clean)]
            + [fmt(d.get(k, np.nan), ".3f") for k in extra]
        )
    return (
        f"{title}\n\nShare of the injected noise tokens and of the clean tokens that each run trained on. "
        "A selection that filters noise has noise % well below clean % (here: below 0.8 × clean %).\n\n"
        + md_table(
            ["run", "noise selected %", "clean selected %", "reading"] + [k.replace("_", " ") for k in extra], rows
        )
    )


def relative(by_kind: dict[str, float | None], kind: str) -> float:
    """Share of `kind` trained / share of clean tokens trained (NaN when either is unknown)."""
    share, clean = by_kind.get(kind), by_kind.get("clean")
    return share / clean if share is not None and clean else np.nan


def kinds_section(selection: dict[str, Any], kind_runs: list[str], kinds: list[str],
                   step0: dict[str, dict[str, Any]]) -> str:
    title = "## Selection by token kind"
    if not kind_runs:
        return f"{title}\n\nNo per-kind selection (the train split has no noise_kind.npy)."
    noise = "`web`, `numbers`, `foreign_step`, `truncate`"
    text = [title, f"Share of each kind's target tokens trained, divided by the share of clean tokens trained "
            f"(1.00 = no preference, below 1 = the run drops that kind), with its 95 % bootstrap interval over the "
            "optimizer steps in brackets (the spread over this run's blocks: a run of another seed reads other "
            "blocks, and its ratio may fall outside) and, after the dot, the kind's target tokens over the run. In "
            f"italics and marked *few*: under {MIN_KIND_TOKENS} tokens, too few to read. Noise (the oracle removes "
            f"it): {noise}; "
            "`header` (the problem statement) and `numbers_context` (unchanged text after an altered number) "
            "are not noise, nor are `after_wrong_step` / `before_wrong_step` (CHAMP's annotated first wrong step: "
            "natural wrong reasoning, labelled, not injected; the oracle trains them).",
            md_table(["run"] + [f"`{k}`" for k in kinds],
                   [[f"`{n}`"] + [_kind_cell(selection[n], k) for k in kinds] for n in kind_runs])]
    if step0:
        text += ["Step 0 (the base model as student): excess loss (base − reference) by kind on scored train "
                 "blocks, and the probability that a clean token's excess outranks a token of the kind (0.5 = "
                 "the score cannot tell them apart; top-k drops a kind only where this is well above 0.5).",
                 md_table(["kind", "tokens", "mean excess", "P(clean outranks)"],
                        [[f"`{k}`", fmt(v["tokens"], ","), fmt(v["mean_excess"], "+.3f"),
                          fmt(v["p_clean_outranks"], ".2f")] for k, v in step0.items()])]
    return "\n\n".join(text)


def _kind_cell(sel: dict[str, Any], kind: str) -> str:
    """'0.76 [0.61, 0.93] · 4,210', or in italics with 'few' under MIN_KIND_TOKENS tokens."""
    ratio = relative(sel["by_kind"], kind)
    iv = (sel.get("by_kind_interval") or {}).get(kind) or {}
    if not np.isfinite(ratio):
        return NA
    text = f"{ratio:.2f}" + (f" [{iv['lo']:.2f}, {iv['hi']:.2f}]" if np.isfinite(iv.get("lo", np.nan)) else "")
    if "tokens" not in iv:
        return text
    text += f" · {iv['tokens']:,}"
    return f"*{text} few*" if iv["tokens"] < MIN_KIND_TOKENS else text


def _interval(d: dict[str, float | None] | None) -> str:
    if not d:
        return NA
    if d["lo"] is None:
        return f"{d['pct']:+.1f} % (one document: no interval)"
    return f"{d['pct']:+.1f} % [{d['lo']:+.1f}, {d['hi']:+.1f}]"


def _outcome(d: dict[str, float]) -> str:
    """'beats', 'loses to', or 'is within noise of' (the interval covers 0)."""
    return "beats" if d["hi"] < 0 else "loses to" if d["lo"] > 0 else "is within noise of"


def controls_section(comparisons: dict[str, dict[str, dict[str, float]]], splits: list[str],
                     runs: dict[str, dict[str, Any]]) -> str:
    """Each control's question (`registry.Method.compare`: selection or transfer, the sign of the score, a plugin's
    own), answered by the paired intervals of its runs."""
    title = "## Controls: what could refute the method"
    paired = [m for m in METHODS.values() if m.compare is not None]
    if not comparisons:
        asks = ", ".join(f"`{a}` beside `{b}`" for a, b in (m.compare for m in paired if m.compare))
        return f"{title}\n\nNo control runs (`grid.methods` with {asks})."
    rows, lines, asked = [], [], {}
    for key, by_split in comparisons.items():
        a, b = key.split("|", 1)
        pair = (runs.get(a, {}).get("method"), runs.get(b, {}).get("method"))
        control = next((m for m in paired if m.compare == pair), None)
        if control is not None:
            asked[control.question] = None
        rows.append([f"`{a}` vs `{b}`"] + [_interval(by_split.get(s)) for s in splits])
        outcomes = {s: _outcome(by_split[s]) for s in splits if s in by_split}
        said = "; ".join(f"{word} `{b}` on {s}" for s, word in outcomes.items())
        same = set(outcomes.values())
        concluded = control.conclusions.get(same.pop()) if control is not None and len(same) == 1 else None
        lines.append(f"`{a}` {said}" + (f": {concluded}." if concluded else "."))
    about = ("Δ perplexity of the first run vs the second (negative = the first is better), with the paired "
             "bootstrap 95 % interval over validation documents; an interval covering 0 reads within noise. "
             + " ".join(f"{q}." if not q.endswith(".") else q for q in asked))
    return "\n\n".join([title, about, md_table(["comparison"] + [f"Δ {s}" for s in splits], rows), " ".join(lines)])


def wrong_step_section(selection: dict[str, Any], sel_runs: list[str], runs: dict[str, dict[str, Any]],
                        order: list[str]) -> str:
    """CHAMP's natural wrong reasoning: selection after vs before the first wrong step, and perplexity on it."""
    title = "## Natural wrong reasoning (CHAMP's annotated first wrong step)"
    with_docs = [n for n in sel_runs if selection[n].get("wrong_step")]
    by_kind = {n: (runs[n].get("val_by_kind") or {}) for n in order if runs[n].get("val_by_kind")}
    if not with_docs and not by_kind:
        return f"{title}\n\nNo wrong-step labels read (a corpus without CHAMP's annotations, or no run read them)."
    text = [title, "CHAMP's experts marked the first wrong step of some model-written solutions; their text from "
            "that step to the solution's end is `after_wrong_step`, the text before it `before_wrong_step` (labels: "
            "not injected, not noise, trained by the oracle). *After ÷ before*: the share of after-tokens trained "
            "divided by the share of before-tokens trained (below 1 = the run avoids wrong reasoning), with a paired "
            "bootstrap 95 % interval over the labelled documents the run read."]
    if with_docs:
        rows = []
        for n in with_docs:
            w = selection[n]["wrong_step"]
            ci = f" [{w['lo']:.2f}, {w['hi']:.2f}]" if np.isfinite(w.get("lo", np.nan)) else ""
            rows.append([f"`{n}`", fmt(w.get("after_wrong_step_share"), ".3f"),
                         fmt(w.get("before_wrong_step_share"), ".3f"),
                         fmt(w.get("ratio"), ".2f") + ci if "ratio" in w else NA, fmt(w["documents"], "d"),
                         f"{w.get('after_wrong_step_tokens', 0):,} / {w.get('before_wrong_step_tokens', 0):,}"])
        text.append(md_table(["run", "after share", "before share", "after ÷ before", "documents",
                            "tokens after / before"], rows))
    for split in dict.fromkeys(s for v in by_kind.values() for s in v):
        kinds = [k for k in (*WRONG_STEP, "clean") if any(k in v.get(split, {}) for v in by_kind.values())]
        rows = [[f"`{n}`"] + [c for k in kinds for c in (
            fmt((v.get(split, {}).get(k) or {}).get("ppl"), ".2f"),
            _interval((v.get(split, {}).get(k) or {}).get("delta_vs_clm")))] for n, v in by_kind.items()]
        first = {k: next((v[split][k] for v in by_kind.values() if k in v.get(split, {})), {}) for k in kinds}
        counts = ", ".join(f"`{k}` {e.get('tokens', 0):,}" + _in_documents(e) for k, e in first.items())
        text += [f"Perplexity on {split}'s tokens of each kind ({counts} evaluated), and its Δ vs CLM with the "
                 "paired bootstrap interval over documents:",
                 md_table(["run"] + [c for k in kinds for c in (f"`{k}` ppl", "Δ vs CLM")], rows)]
    return "\n\n".join(text)


def _in_documents(entry: dict[str, Any]) -> str:
    n = entry.get("documents")
    return "" if n is None else f" in {n} document" + "s" * (n != 1)


def _selection_word(noise: float, clean: float) -> str:
    if not (np.isfinite(noise) and np.isfinite(clean)) or clean <= 0:
        return NA
    if noise < 0.8 * clean:
        return "filters noise"
    return "prefers noise" if noise > 1.25 * clean else "no preference"
