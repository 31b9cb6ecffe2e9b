"""End to end through the real CLI: `slm run --preset smoke` and what results.json promises."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from selective_lm.cli import main
from selective_lm.config import load_config

RUN_KEYS = {"method", "ratio", "seed", "steps", "tokens_seen", "tokens_trained", "train_loss_final", "val",
            "delta_vs_clm", "tokens_to_clm_final"}
BUCKETS = {"H->H", "H->L", "L->H", "L->L"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["run", "--preset", "smoke", "--out", str(out)]) == 0
    return out


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_results_json_has_every_design_key_and_sane_values(smoke_run: Path) -> None:
    r = _results(smoke_run)
    assert {"preset", "version", "runs", "buckets", "buckets_trajectory", "cosine", "selection"} <= set(r)
    assert r["preset"] == "smoke"
    expected = {"clm", "oracle", "reference", "base"} | {f"{m}-r{q:g}" for m in ("topk", "random", "stochastic")
                                                          for q in (0.5, 0.3)}
    assert expected <= set(r["runs"])
    block_len = load_config("smoke").data.block_len
    for name, run in r["runs"].items():
        assert RUN_KEYS <= set(run), name
        for split in ("val_clean", "val_noisy"):
            v = run["val"][split]
            assert math.isfinite(v["ppl"]) and v["ppl"] > 1 and v["tokens"] > 0
            assert v["ppl"] == pytest.approx(math.exp(v["loss"]))
        if run["method"] in ("topk", "random", "stochastic", "clm", "oracle"):
            valid = run["tokens_seen"] * (block_len - 1) / block_len
            if run["method"] != "oracle":
                assert run["tokens_trained"] / valid == pytest.approx(run["ratio"], rel=0.01), name
    assert r["runs"]["reference"]["method"] == "reference"
    for table in ("buckets", "buckets_trajectory"):
        assert r[table], table
        for name, fractions in r[table].items():
            assert set(fractions) == BUCKETS and sum(fractions.values()) == pytest.approx(1.0), (table, name)
    assert "clm" not in r["buckets"]  # the baseline is not compared with itself
    assert len(r["cosine"]) == math.comb(8, 2)
    assert all(-1 <= c <= 1 for c in r["cosine"].values())
    sel = r["selection"]
    assert sel["clm"]["noise_selected_frac"] == 1.0 and sel["clm"]["clean_selected_frac"] == 1.0
    assert sel["oracle"]["noise_selected_frac"] == 0.0 and sel["oracle"]["clean_selected_frac"] == 1.0
    for name in ("topk-r0.5", "random-r0.3"):
        assert 0 <= sel[name]["noise_selected_frac"] <= 1 and sel[name]["ref_loss_selected"] is not None
    oracle = sel["oracle"]["by_kind"]  # the oracle drops exactly the noise kinds
    assert all(oracle[k] in (0.0, None) for k in ("web", "numbers", "foreign_step", "truncate"))
    assert oracle["clean"] == oracle["header"] == 1.0
    assert set(r["separation_step0"]) <= set(sel["topk-r0.5"]["by_kind"])
    for name, run in r["runs"].items():  # a paired interval around every Δ vs CLM
        for d in run["delta_vs_clm"].values():
            assert d["lo"] <= d["pct"] <= d["hi"], name
    assert r["runs"]["clm"]["delta_vs_clm"] == {} and "val_clean" in r["runs"]["topk-r0.5"]["delta_vs_clm"]
    assert r["other_runs"] == []


@pytest.mark.slow
def test_report_plots_and_page_exist(smoke_run: Path) -> None:
    text = (smoke_run / "report.md").read_text()
    assert "topk-r0.5" in text and "oracle" in text and "val_noisy" in text
    for plot in ("loss_curves", "val_ppl", "buckets", "cosine", "selection", "learning_curves", "selection_by_kind",
                 "selection_over_training"):
        data = (smoke_run / "plots" / f"{plot}.png").read_bytes()
        assert data.startswith(b"\x89PNG"), plot
    assert "<html" in (smoke_run / "selection.html").read_text().lower()


@pytest.mark.slow
def test_second_run_does_nothing_and_a_new_ratio_runs_only_its_runs(smoke_run: Path, monkeypatch) -> None:
    before = {p: p.stat().st_mtime_ns for p in smoke_run.rglob("*") if p.is_file()}
    with monkeypatch.context() as m:  # nor loads a model: the finished runs and evaluations are read back
        for module, name in (("training.trainer", "student_model"), ("evaluate", "load_model"),
                             ("evaluate", "load_trained"), ("evaluate", "load_reference_model")):
            m.setattr(f"selective_lm.{module}.{name}", lambda *a, **k: pytest.fail("a model was loaded"))
        assert main(["run", "--preset", "smoke", "--out", str(smoke_run)]) == 0
    after = {p: p.stat().st_mtime_ns for p in smoke_run.rglob("*") if p.is_file()}
    changed = sorted(str(p.relative_to(smoke_run)) for p in before if after.get(p) != before[p])
    assert changed == []

    trained_before = {n: (smoke_run / "runs" / n / "train.json").stat().st_mtime_ns
                      for n in ("clm", "topk-r0.5")}
    assert main(["run", "--preset", "smoke", "--out", str(smoke_run), "grid.ratios=[0.5, 0.4]",
                 "grid.methods=[topk]"]) == 0
    r = _results(smoke_run)
    assert "topk-r0.4" in r["runs"] and "random-r0.3" not in r["runs"]
    # The earlier grid's runs stay on disk but out of every table: listed as not in this grid.
    assert "random-r0.3" in r["other_runs"] and "random-r0.3" not in r["selection"]
    assert not any("random-r0.3" in pair for pair in r["cosine"])
    assert "Not in this grid" in (smoke_run / "report.md").read_text()
    for n, mtime in trained_before.items():
        assert (smoke_run / "runs" / n / "train.json").stat().st_mtime_ns == mtime, n


def test_grid_names_with_seeds() -> None:
    cfg = load_config("smoke", overrides=["grid.seeds=2", "grid.methods=[topk]", "grid.ratios=[0.5]"])
    names = list(cfg.grid_runs(has_noise=True))
    assert names == ["clm-s0", "oracle-s0", "topk-r0.5-s0", "clm-s1", "oracle-s1", "topk-r0.5-s1"]
    assert list(cfg.model_copy(update={"grid": cfg.grid.model_copy(update={"seeds": 1})}).grid_runs(
                             has_noise=False)) == ["clm", "topk-r0.5"]


def test_second_writer_is_refused_and_stale_lock_taken_over(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".slm.lock").write_text(str(os.getppid()))  # a live process holds it
    assert main(["run", "--preset", "smoke", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"pid {os.getppid()}" in err and len(err.strip().splitlines()) == 1
    from selective_lm.files import run_lock

    (out / ".slm.lock").write_text("999999999")  # dead holder
    with run_lock(out / ".slm.lock"):
        assert (out / ".slm.lock").read_text() == str(os.getpid())
    assert not (out / ".slm.lock").exists()


def _launch_run(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`accelerate launch ... -m selective_lm.cli run --preset smoke` on 2 CPU processes (gloo)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "selective_lm.cli", "run", "--preset", "smoke", "--out", str(out), *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "TQDM_DISABLE": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_run_the_pipeline(tmp_path: Path) -> None:
    """Every rank runs `slm run`: the lock and the single-process stages on rank 0, the others wait."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".slm.lock").write_text(str(os.getpid()))  # held by a live process: every rank stops, none hangs
    held = _launch_run(out)
    assert held.returncode != 0 and f"in use by another slm process (pid {os.getpid()})" in held.stderr
    (out / ".slm.lock").unlink()

    short = ("grid.methods=[topk]", "grid.ratios=[0.5]", "grid.oracle=false", "train.steps=2", "reference.steps=2")
    done = _launch_run(out, *short)
    assert done.returncode == 0, done.stderr[-3000:]
    results = _results(out)
    assert set(results["runs"]) == {"clm", "topk-r0.5", "reference", "base"}
    assert json.loads((out / "scores" / "train" / "meta.json").read_text())["processes"] == 2
    assert done.stdout.count('"report"') == 1  # the main rank alone prints the summary
    assert not (out / ".slm.lock").exists()
