"""`slm analyze` and `slm report` after the stages were run one by one through the CLI.

`analyze` writes results.json for the current grid (its finished runs, the reference and the
base model when they were evaluated); `report` reads only that and the run directories, so
the stages need not run through `slm run`. Run directories outside the grid stay out of it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import private_copy
from helpers.cli import slm

STEPS = ("train.steps=2",)
CLM = (*STEPS, "train.method=clm")
TOPK = (*STEPS, "train.method=topk", "train.ratio=0.5")
RUNS = ("clm", "topk-r0.5")
SPLITS = ("val_clean", "val_noisy")


pytestmark = pytest.mark.usefixtures("one_thread")



def _results(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A fresh out dir through prepare, reference, score, two trainings, their evals and the
    reference's and base model's evals, one command at a time; then `report` (refused: no
    results.json yet), `analyze` and `report` again. Exit codes and stderr are kept."""
    out = tmp_path_factory.mktemp("staged") / "out"
    codes: dict[str, int] = {}
    for key, command, overrides in (
        ("prepare", "prepare", ()),
        ("reference", "reference", ()),
        ("score", "score", ()),
        ("train clm", "train", CLM),
        ("train topk", "train", TOPK),
        ("eval clm", "eval", CLM),
        ("eval topk", "eval", TOPK),
        ("eval reference", "eval", ("train.name=reference",)),
        ("eval base", "eval", ("train.name=base",)),
    ):
        codes[key] = slm(command, out, *overrides)
    return {"out": out, "codes": codes}


@pytest.fixture(scope="module")
def analyzed(staged: dict[str, Any]) -> dict[str, Any]:
    out = staged["out"]
    staged["report before analyze"] = slm("report", out)
    staged["codes"]["analyze"] = slm("analyze", out)
    staged["codes"]["report"] = slm("report", out)
    return staged


@pytest.mark.slow
def test_report_before_analyze_exits_2_with_one_line(staged: dict[str, Any], tmp_path: Path, capsys) -> None:
    assert all(code == 0 for code in staged["codes"].values()), staged["codes"]
    out = private_copy(staged["out"], tmp_path)
    for name in ("results.json", "analysis.json", "report.md"):  # in case `analyzed` ran first
        (out / name).unlink(missing_ok=True)
    capsys.readouterr()
    assert slm("report", out) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slm: error: ") and "slm analyze" in lines[0], err
    assert not (out / "report.md").exists()


@pytest.mark.slow
def test_report_works_after_the_stages_were_run_one_by_one(analyzed: dict[str, Any]) -> None:
    out = analyzed["out"]
    assert analyzed["report before analyze"] == 2
    assert all(code == 0 for code in analyzed["codes"].values()), analyzed["codes"]
    results = _results(out)
    assert results["preset"] == "smoke"
    assert set(results["runs"]) == {*RUNS, "reference", "base"}
    for name, method in (("clm", "clm"), ("topk-r0.5", "topk"), ("reference", "reference"), ("base", "base")):
        entry = results["runs"][name]
        assert entry["method"] == method
        assert set(entry["val"]) == set(SPLITS)
        for split in SPLITS:
            assert entry["val"][split]["tokens"] > 0 and entry["val"][split]["ppl"] > 1.0
    assert results["runs"]["topk-r0.5"]["ratio"] == 0.5 and results["runs"]["clm"]["ratio"] == 1.0
    assert all(results["runs"][n]["steps"] == 2 for n in RUNS)
    assert results["other_runs"] == []
    assert set(results["cosine"]) == {"clm|topk-r0.5"}
    assert set(results["buckets"]) == {"topk-r0.5"}  # every run but the CLM baseline it is compared with
    assert set(results["selection"]) <= set(RUNS) and "topk-r0.5" in results["selection"]
    assert (out / "analysis.json").is_file()
    report = (out / "report.md").read_text()
    for name in RUNS:
        assert name in report


@pytest.mark.slow
def test_analyze_takes_only_the_current_grids_runs(analyzed: dict[str, Any], tmp_path: Path) -> None:
    out = private_copy(analyzed["out"], tmp_path)
    extra = (*STEPS, "train.name=extra", "train.method=random", "train.ratio=0.5")
    assert slm("train", out, *extra) == 0
    assert slm("eval", out, *extra) == 0
    assert (out / "runs" / "extra" / "eval.json").is_file()
    assert slm("analyze", out) == 0
    results = _results(out)
    assert set(results["runs"]) == {*RUNS, "reference", "base"}
    assert results["other_runs"] == ["extra"]  # listed, so that a reader knows why it is missing
    for table in ("selection", "buckets", "buckets_trajectory"):
        assert "extra" not in results[table], table
    assert not [pair for pair in results["cosine"] if "extra" in pair.split("|")]
    assert "extra" not in json.dumps(json.loads((out / "analysis.json").read_text()))
    assert slm("report", out) == 0


@pytest.mark.slow
def test_analyze_keeps_a_grid_run_that_is_not_finished_out(analyzed: dict[str, Any], tmp_path: Path) -> None:
    """A grid run killed before its end (checkpoints, no train.json) is not analysed."""
    out = private_copy(analyzed["out"], tmp_path)
    shutil.copytree(out / "runs" / "topk-r0.5", out / "runs" / "random-r0.5")
    (out / "runs" / "random-r0.5" / "train.json").unlink()
    assert slm("analyze", out) == 0
    results = _results(out)
    assert set(results["runs"]) == {*RUNS, "reference", "base"} and results["other_runs"] == []


@pytest.mark.slow
def test_controls_and_wrong_step_figures_reach_results_and_report(analyzed: dict[str, Any], tmp_path: Path) -> None:
    """distill, bottomk and random beside top-k: the paired comparisons of the controls, per-kind intervals with
    token counts, and perplexity by token kind on val_noisy (its wrong-step labels), with Δ vs CLM."""
    out = private_copy(analyzed["out"], tmp_path)
    grid = ("grid.methods=[topk,random,bottomk,distill]", "grid.ratios=[0.5]")
    for run in (("train.method=distill",), ("train.method=bottomk", "train.ratio=0.5"),
                ("train.method=random", "train.ratio=0.5")):
        assert slm("train", out, *STEPS, *run, *grid) == 0
        assert slm("eval", out, *STEPS, *run, *grid) == 0
    assert slm("analyze", out, *grid) == 0
    results = _results(out)
    assert {"distill", "bottomk-r0.5", "random-r0.5"} <= set(results["runs"])
    comparisons = results["comparisons"]
    assert set(comparisons) == {"topk-r0.5|distill", "bottomk-r0.5|random-r0.5"}
    for by_split in comparisons.values():
        assert set(by_split) == set(SPLITS)
        assert all(d["lo"] <= d["pct"] <= d["hi"] for d in by_split.values())
    sel = results["selection"]["topk-r0.5"]
    for kind, iv in sel["by_kind_interval"].items():
        assert iv["tokens"] == sel["kind_tokens"][kind]
        if "ratio" in iv:
            assert iv["ratio"] == pytest.approx(sel["by_kind"][kind] / sel["by_kind"]["clean"])
    labelled = json.loads((out / "data" / "val_noisy" / "meta.json").read_text())["wrong_step"]["tokens"]
    by_kind = results["runs"]["topk-r0.5"]["val_by_kind"]["val_noisy"]
    for kind in ("after_wrong_step", "before_wrong_step"):
        assert 0 < by_kind[kind]["tokens"] <= labelled[kind] and by_kind[kind]["documents"] >= 1
        d = by_kind[kind]["delta_vs_clm"]
        if by_kind[kind]["documents"] > 1:
            assert d["lo"] <= d["pct"] <= d["hi"]
        else:  # one document: every bootstrap draw gives it back, so no interval is claimed
            assert d["lo"] is None and d["hi"] is None
    assert "val_by_kind" in results["runs"]["clm"] and results["runs"]["clm"]["val_by_kind"]["val_noisy"][
        "after_wrong_step"]["delta_vs_clm"] is None
    assert slm("report", out, *grid) == 0
    md = (out / "report.md").read_text()
    assert "## Controls: what could refute the method" in md and "Selection or transfer?" in md
    assert "`topk-r0.5` vs `distill`" in md
    assert "## Natural wrong reasoning" in md and "Perplexity on val_noisy's tokens of each kind" in md
