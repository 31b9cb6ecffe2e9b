"""`slm report` on a synthetic run directory: files written, numbers and sentences drawn from the inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from selective_lm.data.assets import byte_tokenizer
from selective_lm.report import report, write_report
from selective_lm.training.models import token_texts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPLITS = ("val_clean", "val_noisy")
# (name, method, ratio, seed, val_clean ppl, val_noisy ppl). topk gains on clean but loses on noisy;
# stochastic loses on both; the untrained base model is far above the rest (log axis).
RUNS = [
    ("base", "base", 1.0, 0, 250.0, 260.0),
    ("reference", "reference", 1.0, 0, 8.0, 30.0),
    ("clm", "clm", 1.0, 0, 10.0, 20.0),
    ("oracle", "oracle", 1.0, 0, 9.0, 19.0),
    ("topk-r0.5-s0", "topk", 0.5, 0, 9.5, 20.6),
    ("topk-r0.5-s1", "topk", 0.5, 1, 9.7, 20.8),
    ("random-r0.5-s0", "random", 0.5, 0, 10.1, 20.1),
    ("random-r0.5-s1", "random", 0.5, 1, 10.3, 20.3),
    ("stochastic-r0.5", "stochastic", 0.5, 0, 10.4, 21.0),
]
TEXT = "A <script>alert('x')</script> & café\nsecond line of the block."


def _run_entry(method: str, ratio: float, seed: int, clean: float, noisy: float) -> dict[str, Any]:
    val = {s: {"loss": float(np.log(p)), "ppl": p, "tokens": 4096} for s, p in zip(SPLITS, (clean, noisy), strict=True)}
    return {
        "method": method,
        "ratio": ratio,
        "seed": seed,
        "steps": 0 if method == "reference" else 20,
        "tokens_seen": 40960,
        "tokens_trained": int(40960 * ratio),
        "train_loss_final": 2.0 + ratio,
        "val": val,
    }


def _results() -> dict[str, Any]:
    slm = [n for n, *_ in RUNS if n not in ("base", "reference")]
    return {
        "preset": "synthetic",
        "version": "0.0.test",
        "runs": {n: _run_entry(*rest) for n, *rest in RUNS},
        "buckets": {n: {"H->H": 0.1, "H->L": 0.2, "L->H": 0.05, "L->L": 0.65} for n in slm},
        "buckets_trajectory": {n: {"H->H": 0.15, "H->L": 0.1, "L->H": 0.1, "L->L": 0.65} for n in slm},
        "cosine": {"clm|topk-r0.5-s0": 0.42, "clm|random-r0.5-s0": 0.91, "topk-r0.5-s0|random-r0.5-s0": 0.37},
        "selection": {
            "topk-r0.5-s0": {
                "noise_selected_frac": 0.12,
                "clean_selected_frac": 0.55,
                "ref_loss_selected": 3.2,
                "ref_loss_unselected": 1.1,
            },
            "random-r0.5-s0": {"noise_selected_frac": 0.5, "clean_selected_frac": 0.5},
        },
    }


def _write_runs(out: Path, names: list[str]) -> None:
    """log.jsonl and selection_sample.npz per run: the same blocks, different weights."""
    ids = byte_tokenizer()(TEXT)["input_ids"]
    tokens = np.array([ids, ids[::-1], ids], dtype=np.int64)
    rows = np.array([4, 1, 7])
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        d = out / "runs" / name
        d.mkdir(parents=True)
        lines = [
            {
                "step": s,
                "tokens_seen": 2048 * s,
                "tokens_trained": 1024 * s,
                "loss": 3.0 - 0.05 * s + 0.01 * i,
                "selected_frac": 0.5,
                "lr": 1e-4,
                "grad_norm": 1.0,
                "step_s": 0.1,
                "score_selected": 1.0,
                "score_unselected": 0.5,
            }
            for s in range(1, 21)
        ]
        d.joinpath("log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 21, "lo')
        weights = (rng.random(tokens.shape) < 0.5).astype(np.float32)
        weights[:, 0] = 0.0
        np.savez(d / "selection_sample.npz", rows=rows, tokens=tokens, weights=weights)
    noise = np.zeros((8, tokens.shape[1]), dtype=bool)
    noise[4, 2:10] = True
    (out / "data" / "train").mkdir(parents=True)
    np.save(out / "data" / "train" / "noise_mask.npy", noise)


@pytest.fixture
def full_out(tmp_path: Path) -> Path:
    results = _results()
    (tmp_path / "results.json").write_text(json.dumps(results))
    _write_runs(tmp_path, ["clm", "topk-r0.5-s0", "random-r0.5-s0"])
    return tmp_path


def _pct(name_a: list[str], name_b: list[str], split: int) -> float:
    ppl = {n: v for n, *_, c, y in RUNS for v in [(c, y)]}
    a = np.mean([ppl[n][split] for n in name_a])
    b = np.mean([ppl[n][split] for n in name_b])
    return 100 * (a - b) / b


def test_full_report(full_out: Path, smoke_cfg) -> None:
    written = report(smoke_cfg, full_out)

    assert set(written["plots"]) == {"loss_curves", "val_ppl", "buckets", "cosine", "selection"}
    for path in written["plots"].values():
        data = Path(path).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000
    assert not list((full_out / "plots").glob("*.tmp"))

    md = (full_out / "report.md").read_text()
    assert "synthetic" in md and "0.0.test" in md
    for name, *_, clean, noisy in RUNS:
        assert f"`{name}`" in md
        assert f"{clean:.2f}" in md and f"{noisy:.2f}" in md
    for group in ("topk-r0.5", "random-r0.5"):
        for split in (0, 1):
            vals = [r[4 + split] for r in RUNS if r[0].startswith(group)]
            assert f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}" in md

    topk, clm = ["topk-r0.5-s0", "topk-r0.5-s1"], ["clm"]
    clean_pct, noisy_pct = _pct(topk, clm, 0), _pct(topk, clm, 1)
    assert clean_pct < 0 < noisy_pct  # the fixture's premise
    assert f"{-clean_pct:.1f} % better than CLM on val_clean but {noisy_pct:.1f} % worse on val_noisy" in md
    assert "gain on val_clean comes with a loss on val_noisy" in md
    assert "beats `random-r0.5` on val_clean but not on val_noisy" in md
    assert f"{clean_pct:+.1f} %" in md
    assert "**No gain here:** `stochastic-r0.5`" in md
    stochastic = md.split("### `stochastic-r0.5`")[1].split("###")[0]
    assert "does not beat `random-r0.5` on any split" in stochastic

    assert "filters noise" in md and "no preference" in md
    assert "12.0" in md and "55.0" in md
    assert "0.420" in md and "0.910" in md
    assert "Quantile method" in md and "Trajectory method" in md
    assert "(plots/loss_curves.png)" in md and "(selection.html)" in md

    page = (full_out / "selection.html").read_text()
    assert written["html"] == str(full_out / "selection.html")
    assert "<script" not in page and "&lt;" in page and "&amp;" in page
    assert page.count("<h3>Block") == 3 and "<h2>seed 0: 3 runs</h2>" in page
    assert "class='t sel'" in page and "noise" in page and "background:rgba(40,160,60" in page
    assert "é" in page  # the two byte tokens of é decode to the character, not to two '�'


def test_only_runs_section(tmp_path: Path) -> None:
    results = _results()
    (tmp_path / "results.json").write_text(json.dumps({"runs": results["runs"]}))
    written = write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert set(written["plots"]) == {"val_ppl"}
    assert written["html"] is None
    assert "No bucket analysis" in md and "No cosine" in md and "No selection diagnostics" in md
    assert "loss_curves: not drawn" in md


def test_empty_results(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text("{}")
    written = write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert written["plots"] == {}
    assert "no runs yet" in md and "nothing to compare" in md


def test_html_escapes_whole_token_and_ids_without_tokenizer(tmp_path: Path) -> None:
    class Stub:
        def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
            return ["<script>" if i == 1 else "ok" for i in ids]

        def convert_tokens_to_string(self, tokens: list[str]) -> str:
            return "".join(tokens)

    (tmp_path / "results.json").write_text(json.dumps({"runs": {"clm": {"method": "clm"}}}))
    d = tmp_path / "runs" / "clm"
    d.mkdir(parents=True)
    np.savez(
        d / "selection_sample.npz",
        rows=np.array([0]),
        tokens=np.array([[0, 1, 2]]),
        weights=np.array([[0.0, 0.3, 0.9]]),
    )
    write_report(tmp_path, Stub())
    page = (tmp_path / "selection.html").read_text()
    assert "&lt;script&gt;" in page and "<script" not in page
    write_report(tmp_path)
    assert ">1 </span>" in (tmp_path / "selection.html").read_text()


def test_token_texts_byte_level() -> None:
    tok = byte_tokenizer()
    ids = tok("é a\n")["input_ids"]
    assert "".join(token_texts(tok, ids)) == "é a\n"


def test_task_table_beside_perplexity(tmp_path: Path) -> None:
    results = _results()
    (tmp_path / "results.json").write_text(json.dumps(results))
    write_report(tmp_path)
    assert "No task results (`eval.tasks`" in (tmp_path / "report.md").read_text()

    for name, (acc, se) in {"clm": (0.10, 0.05), "topk-r0.5-s0": (0.16, 0.06), "base": (0.05, None)}.items():
        results["runs"][name]["tasks"] = {"champ_answer": {"acc": acc, "acc_stderr": se}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    write_report(tmp_path)
    section = (tmp_path / "report.md").read_text().split("## Downstream tasks")[1].split("\n## ")[0]
    assert "### `champ_answer`" in section and "| run | acc | Δ acc vs CLM |" in section
    assert "| `base` | 0.050 | -0.050 |" in section  # no stderr: none combined
    assert "| `clm` | 0.100 ± 0.050 | — |" in section
    assert "| `topk-r0.5-s0` | 0.160 ± 0.060 | +0.060 ± 0.078 |" in section  # √(0.06² + 0.05²)
    assert "`oracle`" not in section  # no task results: no row


def _entry(method: str, ratio: float, clean: float, noisy: float, deltas: dict | None = None) -> dict[str, Any]:
    return {**_run_entry(method, ratio, 0, clean, noisy), "delta_vs_clm": deltas or {}}


def test_within_noise_reads_the_same_everywhere_and_controls_and_kinds_show_intervals(tmp_path: Path) -> None:
    """A +0.6 % on val_noisy whose interval covers 0 is 'within noise' in every sentence (not 'worse' in one and
    ignored in the next); per-kind ratios carry their interval and token count, small kinds are marked; the
    controls and the wrong-step comparison are stated with their intervals."""
    runs = {
        "clm": _entry("clm", 1.0, 10.0, 20.0),
        "topk-r0.5": _entry("topk", 0.5, 9.7, 20.12, {"val_clean": {"pct": -3.0, "lo": -3.6, "hi": -2.4},
                                                      "val_noisy": {"pct": 0.6, "lo": -0.3, "hi": 1.5}}),
        "random-r0.5": _entry("random", 0.5, 10.1, 20.1),
        "distill": _entry("distill", 1.0, 9.9, 20.0),
        "bottomk-r0.5": _entry("bottomk", 0.5, 10.6, 21.0),
    }
    runs["topk-r0.5"]["val_by_kind"] = {"val_noisy": {
        "after_wrong_step": {"ppl": 30.0, "tokens": 900, "delta_vs_clm": {"pct": -1.0, "lo": -2.5, "hi": 0.4}},
        "before_wrong_step": {"ppl": 12.0, "tokens": 400, "delta_vs_clm": {"pct": -2.0, "lo": -3.0, "hi": -1.0}}}}
    selection = {"topk-r0.5": {
        "noise_selected_frac": 0.4, "clean_selected_frac": 0.52,
        "by_kind": {"clean": 0.5, "web": 0.38, "numbers": 0.3, "after_wrong_step": 0.45},
        "by_kind_interval": {"web": {"ratio": 0.76, "lo": 0.61, "hi": 0.93, "units": 40, "tokens": 4210},
                             "numbers": {"ratio": 0.6, "lo": 0.2, "hi": 1.4, "units": 12, "tokens": 59},
                             "after_wrong_step": {"ratio": 0.9, "lo": 0.8, "hi": 1.0, "units": 30, "tokens": 2100}},
        "wrong_step": {"after_wrong_step_share": 0.45, "before_wrong_step_share": 0.55, "ratio": 0.82, "lo": 0.7,
                       "hi": 0.95, "units": 21, "documents": 21, "after_wrong_step_tokens": 2100,
                       "before_wrong_step_tokens": 900}}}
    comparisons = {"topk-r0.5|distill": {"val_clean": {"pct": -2.0, "lo": -2.9, "hi": -1.1},
                                         "val_noisy": {"pct": 0.1, "lo": -0.8, "hi": 1.0}},
                   "bottomk-r0.5|random-r0.5": {"val_clean": {"pct": 5.0, "lo": 4.0, "hi": 6.0},
                                                "val_noisy": {"pct": 4.0, "lo": 3.1, "hi": 5.2}}}
    (tmp_path / "results.json").write_text(json.dumps({"runs": runs, "selection": selection,
                                                       "comparisons": comparisons}))
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    verdict = next(line for line in md.splitlines() if line.startswith("`topk-r0.5` is"))
    assert "3.0 % better than CLM on val_clean but within noise (+0.6 %) on val_noisy" in verdict
    assert "% worse" not in verdict
    assert "improves on CLM without losing on any split (val_noisy within noise)" in verdict
    assert "0.76 [0.61, 0.93] · 4,210" in md and "*0.60 [0.20, 1.40] · 59 few*" in md
    assert "0.82 [0.70, 0.95]" in md and "| 21 |" in md and "2,100 / 900" in md
    assert "-1.0 % [-2.5, +0.4]" in md and "`after_wrong_step` 900" in md
    assert "-2.0 % [-2.9, -1.1]" in md
    assert "`topk-r0.5` beats `distill` on val_clean; is within noise of `distill` on val_noisy." in md
    # the same outcome on every split gets the control's conclusion (registry.Method.conclusions); a mixed one none
    assert ("`bottomk-r0.5` loses to `random-r0.5` on val_clean; loses to `random-r0.5` on val_noisy: the score "
            "carries signal there, in the direction the method assumes.") in md
    # each control's question (its registry entry's) is asked above the readings
    assert "Selection or transfer?" in md and "The score's sign: if the score carries signal" in md
    # the controls are compared in their own section, not as SLM settings beside CLM
    assert "### `distill`" not in md and "### `bottomk-r0.5`" not in md


def test_one_document_kind_claims_no_interval() -> None:
    """Perplexity by kind on tokens that lie in one document: the point Δ, and no interval (a bootstrap over one
    document gives it back every time); the header says how many documents hold each kind."""
    from selective_lm.report.selection import wrong_step_section

    def entry(pct: float, lo: float | None, hi: float | None, documents: int) -> dict[str, Any]:
        return {"ppl": 3.0, "tokens": 200, "documents": documents, "delta_vs_clm": {"pct": pct, "lo": lo, "hi": hi}}

    runs = {"topk-r0.5": {"val_by_kind": {"val_noisy": {"after_wrong_step": entry(-0.6, -1.0, -0.1, 8),
                                                        "before_wrong_step": entry(-1.2, None, None, 1)}}}}
    md = wrong_step_section({"topk-r0.5": {}}, [], runs, ["topk-r0.5"])
    assert "-0.6 % [-1.0, -0.1]" in md and "-1.2 % (one document: no interval)" in md
    assert "`after_wrong_step` 200 in 8 documents" in md and "`before_wrong_step` 200 in 1 document" in md


@pytest.mark.parametrize(("steps", "averaged"), [(6, False), (40, True)])
def test_loss_plot_title_says_whether_it_draws_a_moving_average(tmp_path: Path, steps: int, averaged: bool) -> None:
    """The smoke preset's 6 steps have nothing to average: one line per run, and a title that says so."""
    from selective_lm.report import plots

    logs = {"clm": [(s, 5.0 - 0.01 * s + 0.1 * (s % 2)) for s in range(1, steps + 1)]}
    fig = plots.loss_curves(logs, tmp_path / "loss.png")
    ax = fig.axes[0]
    assert (tmp_path / "loss.png").is_file()
    assert ("moving average over 4 steps" in ax.get_title()) is averaged
    assert ("per optimizer step" in ax.get_title()) is not averaged
    assert len(ax.get_lines()) == (2 if averaged else 1)
    bold = np.asarray(ax.get_lines()[-1].get_ydata())
    assert np.array_equal(bold, [p[1] for p in logs["clm"]]) is not averaged
