"""Kill anywhere: a SIGKILL-ed `slm run` resumes to the same results.json as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

KILLER = Path(__file__).parent / "helpers" / "killer.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# Under pytest-xdist (`make test`) this module's tests run on one worker: the module fixture's `slm run` once.
pytestmark = pytest.mark.xdist_group("test_reliability")


def _slm_run(out: Path, *prefix: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *prefix, "--", "run", "--preset", "smoke", "--out", str(out)] if prefix else \
        [sys.executable, "-m", "selective_lm.cli", "run", "--preset", "smoke", "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("straight") / "out"
    proc = _slm_run(out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "n"),
    [("score", 3), ("train", 12), ("checkpoint", 5), ("eval", 7), ("report", 2)],
)
def test_killed_run_resumes_to_identical_results(point: str, n: int, uninterrupted: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    killed = _slm_run(out, str(KILLER), point, str(n))
    assert killed.returncode == -signal.SIGKILL, f"{point} was never reached: {killed.stderr[-1500:]}"
    assert not (out / "results.json").exists() or point == "report"
    resumed = _slm_run(out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "results.json").read_text()) == uninterrupted
    assert not list(out.rglob("*.tmp")), "a temp file survived the resume"
