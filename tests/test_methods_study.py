"""The field's methods in a study: the preset `champ-smollm2-methods`, the grid's runs, the mistakes refused
before any work (exit 2, one line), and a smoke-size `slm run` of every new method through results.json and
`slm report`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from selective_lm.cli import main
from selective_lm.config import load_config
from selective_lm.method.registry import METHODS

NEW = ["topk_distill", "bottomk_distill", "eslm", "eslm_loss", "entropy_topk", "dft", "weighted"]
# The run each method makes in a grid at ratio 0.5: the 80/20 rule at its own 0.2, the weightings once.
RUN_NAMES = {"topk_distill": "topk_distill-r0.5", "bottomk_distill": "bottomk_distill-r0.5", "eslm": "eslm-r0.5",
             "eslm_loss": "eslm_loss-r0.5", "entropy_topk": "entropy_topk-r0.2", "dft": "dft", "weighted": "weighted"}


def test_the_preset_is_the_default_study_with_every_method_three_seeds_and_nine_curve_points() -> None:
    study, default = load_config("champ-smollm2-methods"), load_config("champ-smollm2")
    assert (study.data, study.model, study.reference, study.scoring) == \
        (default.data, default.model, default.reference, default.scoring)
    assert study.train == default.train and study.eval.max_tokens == default.eval.max_tokens
    assert {"topk", "random", "distill", *NEW} <= set(study.grid.methods) and study.grid.ratios == [0.5]
    assert study.grid.seeds == 3
    # The learning curve: step 0, every eval.every steps, the end.
    for cfg in (study, default):  # the default study's curves too (issue 30)
        points = len({0, *range(cfg.eval.every, cfg.train.steps, cfg.eval.every), cfg.train.steps})
        assert points >= 9, cfg.preset
    names = {n.rsplit("-s", 1)[0] for n in study.grid_runs(has_noise=True)}
    assert names == {"clm", "topk-r0.5", "random-r0.5", "random-r0.2", "distill", *RUN_NAMES.values()}
    assert len(study.grid_runs(has_noise=True)) == 3 * len(names)


def test_a_fixed_ratio_method_runs_once_at_its_ratio() -> None:
    cfg = load_config("smoke", overrides=["grid.methods=[entropy_topk, eslm, dft]", "grid.ratios=[0.5, 0.3]"])
    runs = cfg.grid_runs(has_noise=True)
    assert set(runs) == {"clm", "oracle", "dft", "entropy_topk-r0.2", "eslm-r0.5", "eslm-r0.3"}
    assert runs["entropy_topk-r0.2"].train.ratio == 0.2
    # `slm train` names and hashes the run as the grid does, whatever train.ratio's default.
    assert load_config("smoke", overrides=["train.method=entropy_topk"]).train == runs["entropy_topk-r0.2"].train


def _one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("overrides", "needle"), [  # (the mistake, what its one line must say)
    (["train.method=dft", "train.ratio=0.5"], "train.ratio=0.5 has no effect with train.method=dft"),
    (["train.method=weighted", "train.ratio=0.3"], "train.ratio=0.3 has no effect with train.method=weighted"),
    (["train.method=entropy_topk", "train.ratio=0.5"], "always selects its paper's share, 0.2"),
    (["train.method=eslm", "train.score=loss"], "always selects by score kind entropy"),
    (["train.method=eslm_loss", "train.score=entropy"], "always selects by score kind loss"),
    (["train.method=topk_distill", "train.ratio=0.5", "reference.mode=ema", "reference.start_step=2"],
     "needs a reference model's next-token distribution"),
    (["train.method=weighted", "objectives.weighted.sparsification=1.5"], "sparsification"),
    (["train.method=topk", "train.ratio=0.5", "objectives.weighted.interpolation=0.5"], "no effect"),
])
def test_config_mistakes_exit_2_before_any_work(overrides: list[str], needle: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Refused by the config itself: nothing is created under --out."""
    out = tmp_path / "out"
    err = _one_line_exit_2(["train", "--preset", "smoke", "--out", str(out), *overrides], capsys)
    assert needle in err, err
    assert not out.exists()


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file()}


@pytest.mark.parametrize(("method", "missing", "needle"), [
    ("weighted", "scores", "slm score"),  # its weights are excess losses: the reference's scores
    ("topk_distill", "reference", "slm reference"),  # the reference's distribution, online
])
def test_a_run_whose_needs_the_out_dir_cannot_meet_exits_2_and_changes_nothing(
        method: str, missing: str, needle: str, smoke_out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(smoke_out / missing)
    before = _snapshot(smoke_out)
    err = _one_line_exit_2(["train", "--preset", "smoke", "--out", str(smoke_out), f"train.method={method}",
                            "train.ratio=0.5" if METHODS[method].selects else "train.steps=1"], capsys)
    assert needle in err, err
    assert _snapshot(smoke_out) == before


def test_online_methods_need_no_reference(smoke_out: Path) -> None:
    """ESLM and the 80/20 rule score with the student alone: they train with neither reference nor scores."""
    shutil.rmtree(smoke_out / "scores")
    shutil.rmtree(smoke_out / "reference")
    for method in ("eslm", "entropy_topk"):
        assert main(["train", "--preset", "smoke", "--out", str(smoke_out), f"train.method={method}",
                     "train.steps=1"]) == 0, method


@pytest.fixture(scope="module")
def methods_run(_smoke_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`slm run --preset smoke` with every new method (on the session's prepared, referenced and scored out dir)."""
    out = tmp_path_factory.mktemp("methods") / "out"
    shutil.copytree(_smoke_template, out)
    assert main(["run", "--preset", "smoke", "--out", str(out), f"grid.methods=[{', '.join(NEW)}]",
                 "grid.ratios=[0.5]"]) == 0
    return out


@pytest.mark.slow
def test_every_new_method_runs_in_the_smoke_grid_and_the_report_names_it(methods_run: Path) -> None:
    runs = json.loads((methods_run / "results.json").read_text())["runs"]
    assert set(RUN_NAMES.values()) <= set(runs)
    valid = runs["clm"]["tokens_trained"]  # CLM trains every valid token
    for name in ("dft", "weighted"):  # weightings train every token: the sum of their weights is the count
        assert runs[name]["tokens_trained"] == valid, name
    for name in ("topk_distill-r0.5", "bottomk_distill-r0.5", "eslm-r0.5", "eslm_loss-r0.5"):
        assert abs(runs[name]["tokens_trained"] - 0.5 * valid) <= runs[name]["steps"], name  # a unit per step
    # The count rounds per selection unit (one per step here): at most one token per step from ratio x valid.
    assert abs(runs["entropy_topk-r0.2"]["tokens_trained"] - 0.2 * valid) <= runs["entropy_topk-r0.2"]["steps"]
    report = methods_run / "report.md"
    report.unlink()
    assert main(["report", "--preset", "smoke", "--out", str(methods_run)]) == 0
    text = report.read_text()
    for name in RUN_NAMES.values():
        assert f"`{name}`" in text, name
    assert "`bottomk_distill-r0.5` vs `topk_distill-r0.5`" in text  # the reverse control's paired Δ
