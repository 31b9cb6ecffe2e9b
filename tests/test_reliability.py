"""Kill anywhere: a `slm run` SIGKILL-ed at one point after another resumes to the results.json of an uninterrupted
run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

KILLER = Path(__file__).parent / "helpers" / "killer.py"
SLM = Path(__file__).parent / "helpers" / "slm_proc.py"  # the suite's float switches, as in the killed runs
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# Where each process dies (helpers/killer.py): mid-score, at a training step, with a checkpoint's weights written
# and the rest not, mid-evaluation, with some of the report's plots written.
KILLS = [("score", 3), ("train", 12), ("checkpoint", 5), ("eval", 7), ("report", 2)]
# Three of the smoke grid's runs (CLM and a selecting method with its random control) reach every point: the
# chain's six processes, and the uninterrupted run, spend their time on the points, not on more of the same runs.
GRID = ("grid.methods=[topk, random]", "grid.ratios=[0.5]", "grid.oracle=false")


def _slm_run(out: Path, *prefix: str) -> subprocess.CompletedProcess:
    script = prefix or (str(SLM),)
    cmd = [sys.executable, *script, *(["--"] if prefix else []), "run", "--preset", "smoke", "--out", str(out),
           *GRID]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("straight") / "out"
    proc = _slm_run(out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_killed_run_resumes_to_identical_results(uninterrupted: dict, tmp_path: Path) -> None:
    """Each process resumes what the one before it left at its kill point, and is killed at the next point itself:
    every point's crash is resumed (by the next process, or the last), in six processes rather than a fresh
    killed run and its resume per point (ten, and five whole runs more)."""
    out = tmp_path / "out"
    for point, n in KILLS:
        killed = _slm_run(out, str(KILLER), point, str(n))
        assert killed.returncode == -signal.SIGKILL, f"{point} was never reached: {killed.stderr[-1500:]}"
        assert not (out / "results.json").exists() or point == "report"
    resumed = _slm_run(out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "results.json").read_text()) == uninterrupted
    assert not list(out.rglob("*.tmp")), "a temp file survived the resume"
