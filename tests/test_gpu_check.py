"""scripts/gpu_check.py's dry run (`--cpu`): every section runs through at toy sizes before device time is spent."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_runs_each_section_and_writes_every_figure(gpu_check, tmp_path: Path, capsys) -> None:
    only = "bench_gpu_eager,bench_small,study_stand_in,default_study,gpu_preset,pytest_gpu"  # not the compiled bench
    assert gpu_check.main([str(tmp_path), "--cpu", "--only", only]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert json.loads(capsys.readouterr().out) == report
    sections = report["sections"]
    assert list(sections) == only.split(",") and not [s for s in sections.values() if "error" in s], sections
    assert sections["default_study"]["skipped"] == sections["pytest_gpu"]["skipped"] == "dry run (--cpu)"
    assert sections["gpu_preset"]["runs"] == 3  # CLM, the oracle and top-k: the dry run's part of the grid
    assert sections["bench_small"]["clm"]["profile"]["top_host_ops"]  # profiled (on the CPU: host ops only)
    figures = report["figures"]
    # The gpu bench figures come from the compiled section only (not run here: inductor on the CPU is slow).
    assert set(figures) == {"default_study_s", "train_tokens_per_s", "scoring_tokens_per_s", "gpu_preset_s"}
    study = sections["study_stand_in"]
    assert figures["default_study_s"]["value"] == study["seconds"]
    assert figures["train_tokens_per_s"]["value"] == pytest.approx(study["tokens_per_step"] / study["step_s"])
    assert figures["default_study_s"]["note"].startswith("random:tiny-llama")
    for f in figures.values():
        assert f["pass"] == (f["value"] <= float(f["target"][3:]) if f["target"].startswith("<=")
                             else f["value"] >= float(f["target"][3:]))


def test_gpu_bench_figures_come_from_the_compiled_section(gpu_check) -> None:
    entry = {"step_s": 2.0, "tokens_per_s": 1.0, "mfu": 0.5}
    compiled = {"clm": entry, "slm": {**entry, "step_s": 2.1}, "score": {"tokens_per_s": 9.0},
                "forward": {"tokens_per_s": 10.0}}
    figures = gpu_check.figures({"bench_gpu_compiled": compiled, "pytest_gpu": {"exit": 1}})
    assert figures["gpu_clm_mfu"] == {"value": 0.5, "target": ">= 0.45", "pass": True}
    ratio, score = figures["gpu_slm_step_vs_clm"], figures["gpu_score_vs_forward"]
    assert ratio["value"] == pytest.approx(1.05) and not ratio["pass"]
    assert score["value"] == pytest.approx(0.9) and not score["pass"]
    assert figures["pytest_gpu_failed"] == {"value": 1, "target": "<= 0", "pass": False}


def test_without_cuda_the_check_exits_2_unless_a_dry_run(gpu_check, tmp_path: Path, capsys) -> None:
    assert gpu_check.main([str(tmp_path / "out")]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_rerun_into_the_same_out_does_not_time_the_finished_study(gpu_check, tmp_path: Path) -> None:
    (tmp_path / "stand-in").mkdir()
    assert gpu_check.main([str(tmp_path), "--cpu", "--only", "study_stand_in"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "needs a fresh OUT" in report["sections"]["study_stand_in"]["skipped"] and report["figures"] == {}
