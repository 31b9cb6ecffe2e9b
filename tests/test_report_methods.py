"""The report's "Methods side by side" on a constructed out dir: each cell recomputed by hand from the inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from selective_lm.report import write_report
from selective_lm.report.methods import reads_offline_scores

SPLITS = ("val_clean", "val_noisy")
TOKENS_PER_STEP = 512
SCORER_TOKENS_PER_S = 256.0  # offline scoring: 2 s per step of 512 tokens
# name -> (method, score, seed, step seconds, val_clean ppl, val_noisy ppl, each split's tokens to CLM (point, lo, hi))
RUNS: dict[str, tuple[Any, ...]] = {
    "clm-s0": ("clm", "none", 0, 1.0, 10.0, 20.0, None),
    "clm-s1": ("clm", "none", 1, 1.0, 10.2, 20.2, None),
    "topk-r0.5-s0": ("topk", "excess", 0, 1.5, 9.0, 19.0, (100.0, 80.0, 150.0)),
    "topk-r0.5-s1": ("topk", "excess", 1, 1.5, 9.4, 19.4, (300.0, 250.0, None)),
    "eslm-r0.5-s0": ("eslm", "entropy", 0, 3.0, 11.0, 21.0, (None, 400.0, None)),
    "eslm-r0.5-s1": ("eslm", "entropy", 1, 3.0, 11.2, 21.2, (500.0, 450.0, None)),
    "dft-s0": ("dft", "none", 0, 1.2, 10.0, 20.0, None),
    "dft-s1": ("dft", "none", 1, 1.2, 10.2, 20.2, None),
}
BY_KIND = {"clean": 0.5, "web": 0.25, "header": 0.75}


def _entry(name: str) -> dict[str, Any]:
    method, score, seed, _, clean, noisy, reach = RUNS[name]
    clm = RUNS[f"clm-s{seed}"]
    entry: dict[str, Any] = {
        "method": method, "score": score, "ratio": 0.5 if "-r0.5" in name else 1.0, "seed": seed, "steps": 4,
        "tokens_seen": 4 * TOKENS_PER_STEP, "tokens_trained": 1024 if "-r0.5" in name else 2048,
        "val": {s: {"ppl": p} for s, p in zip(SPLITS, (clean, noisy), strict=True)},
        "delta_vs_clm": {s: {"pct": 100 * (p - c) / c, "lo": 100 * (p - c) / c - 1, "hi": 100 * (p - c) / c + 1}
                         for s, p, c in zip(SPLITS, (clean, noisy), clm[4:6], strict=True)},
    }
    if reach is not None:
        entry["tokens_to_clm_final_interval"] = {s: dict(zip(("tokens", "lo", "hi"), reach, strict=True))
                                                 for s in SPLITS}
    return entry


def _out(tmp_path: Path, scoring_mode: str) -> Path:
    runs = {n: _entry(n) for n in RUNS}
    selection = {n: {"by_kind": BY_KIND} for n in RUNS if RUNS[n][0] == "topk"}
    (tmp_path / "results.json").write_text(json.dumps({"preset": "t", "runs": runs, "selection": selection}))
    for name, (*_, step_s, _c, _n, _r) in RUNS.items():
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        # The first step is slow (warm-up): the median ignores it.
        steps = [step_s * 5] + [step_s] * 3
        d.joinpath("log.jsonl").write_text("".join(json.dumps({"step": i + 1, "step_s": t}) + "\n"
                                                   for i, t in enumerate(steps)))
        d.joinpath("config.yaml").write_text(yaml.safe_dump({"scoring": {"mode": scoring_mode}}))
    ref = tmp_path / "reference"
    ref.mkdir()
    ref.joinpath("log.jsonl").write_text("".join(json.dumps({"step": i + 1, "step_s": 3.0}) + "\n" for i in range(20)))
    scores = tmp_path / "scores" / "train"
    scores.mkdir(parents=True)
    scores.joinpath("meta.json").write_text(json.dumps({"tokens_per_s": SCORER_TOKENS_PER_S}))
    return tmp_path


def _rows(md: str, marker: str) -> dict[str, list[str]]:
    """The table after `marker` in the methods section: label -> its cells."""
    section = md.split("## Methods side by side")[1].split("\n## ")[0]
    table = section.split(marker)[1].split("\n\n")[1]
    return {cells[0].strip("` "): [c.strip() for c in cells[1:]]
            for line in table.splitlines()[2:] for cells in [line.strip("|").split("|")]}


def test_methods_table_is_recomputed_from_the_runs(tmp_path: Path) -> None:
    write_report(_out(tmp_path, "offline"))
    md = (tmp_path / "report.md").read_text()
    gain = _rows(md, "Every method of the grid in one row")
    assert list(gain) == ["clm", "dft", "eslm-r0.5", "topk-r0.5"]
    # Δ of the seeds' mean perplexity vs CLM's mean; the envelope of the seeds' intervals; each seed's own Δ.
    topk_clean = 100 * (9.2 - 10.1) / 10.1
    lo, hi = 100 * (9.0 - 10.0) / 10.0 - 1, 100 * (9.4 - 10.2) / 10.2 + 1
    assert gain["topk-r0.5"][:4] == ["method", "2", f"{topk_clean:+.1f} % [{lo:+.1f}, {hi:+.1f}]",
                                     f"{-10.0:+.1f} / {100 * (9.4 - 10.2) / 10.2:+.1f}"]
    # Tokens to CLM: median of the points, envelope of the bounds; a seed's "never" is infinite.
    assert gain["topk-r0.5"][-2:] == ["200 [80, never]"] * 2
    assert gain["eslm-r0.5"][-1] == "never [400, never]"
    assert gain["clm"][-1] == "2,048 (its end)"
    assert gain["dft"][-1] == "—"  # no curve: nothing to read

    spend = _rows(md, "What each cost and trained")
    scoring = TOKENS_PER_STEP / SCORER_TOKENS_PER_S
    # top-k reads the offline scores: their cost per step counts; ESLM (entropy) and DFT read none.
    assert spend["topk-r0.5"][1:4] == ["1.50", f"{scoring:.2f}", f"{1.5 + scoring:.2f} (1.50)"]
    assert spend["eslm-r0.5"][1:4] == ["3.00", "0.00", "3.00 (3.00)"]
    assert spend["dft"][1:4] == ["1.20", "0.00", "1.20 (1.20)"]
    assert spend["topk-r0.5"][4:6] == ["0.50", "1.50"]  # web, header ÷ clean
    assert "20 steps, 1.0 min here" in md


def test_online_scoring_is_inside_the_step(tmp_path: Path) -> None:
    write_report(_out(tmp_path, "online"))
    spend = _rows((tmp_path / "report.md").read_text(), "What each cost and trained")
    assert spend["topk-r0.5"][1:4] == ["1.50", "0.00", "1.50 (1.50)"]


@pytest.mark.parametrize(("method", "score", "reads"), [
    ("topk", "excess", True), ("random", "excess", False), ("eslm", "entropy", False), ("clm", "none", False),
    ("weighted", "none", True), ("topk_distill", "excess", True), ("distill", "none", False),
])
def test_which_runs_read_the_score_store(method: str, score: str, reads: bool) -> None:
    assert reads_offline_scores({"method": method, "score": score}, "offline") is reads
    assert not reads_offline_scores({"method": method, "score": score}, "online")
    for self_reference in ("ema", "checkpoint"):  # the student's history scores inside the step
        assert not reads_offline_scores({"method": method, "score": score}, "offline", self_reference)


def test_weighting_methods_get_no_random_control_sentence(tmp_path: Path) -> None:
    write_report(_out(tmp_path, "offline"))
    md = (tmp_path / "report.md").read_text()
    dft = md.split("### `dft`")[1].split("###")[0]
    assert "trains every token (a weighting, not a selection): no random control applies" in dft
    assert "There is no random-selection control" not in dft
    assert "**No gain here:** `eslm-r0.5`" in md
