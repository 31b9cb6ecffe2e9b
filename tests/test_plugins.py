"""Methods from outside the package: the registries' contracts, plugins from a file, and their bad input.

The example plugin (examples/my_method.py) is run exactly as its docstring says, from a copy outside the
checkout, in a fresh process; the other cases load plugins into this process, with the registries restored
after each test (a plugin's entries would otherwise leak into the tests that enumerate them).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from selective_lm.cli import main
from selective_lm.method import registry as reg
from selective_lm.method.registry import Method, ScoreKind, Strategy

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "my_method.py"


@pytest.fixture
def registries() -> Iterator[None]:
    """Every registry as it was before the test."""
    saved = [(r, dict(r), dict(r.origins)) for r in (reg.SCORE_KINDS, reg.STRATEGIES, reg.OBJECTIVES, reg.METHODS)]
    yield
    for r, entries, origins in saved:
        r.clear()
        r.update(entries)
        r.origins.clear()
        r.origins.update(origins)


def _docstring_command(path: Path) -> list[str]:
    """The one `slm run ...` line of the example's docstring."""
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip().startswith("slm run ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


def test_example_plugin_trains_in_the_smoke_grid_from_outside_the_checkout(tmp_path: Path) -> None:
    """The docstring's command, run from a directory that holds only a copy of the file: the plugin's method
    trains in the grid and results.json, report.md and the curves show it."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy(EXAMPLE, work / "my_method.py")
    argv = [a.replace("examples/my_method.py", "my_method.py") for a in _docstring_command(EXAMPLE)]
    assert argv[:2] == ["slm", "run"] and "my_method.py" in argv
    env = {**os.environ, "PYTHONPATH": ""}  # the package as installed; the plugin only by its path
    slm = Path(sys.executable).with_name("slm")
    proc = subprocess.run([str(slm), *argv[1:]], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = work / argv[argv.index("--out") + 1]
    results = json.loads((out / "results.json").read_text())
    mine = [n for n, r in results["runs"].items() if r.get("method") == "my_focal"]
    assert mine, list(results["runs"])
    for name in mine:
        run = results["runs"][name]
        assert 0 < run["selected_share"] < 1  # it selects: the plugin's strategy at the grid's ratio
        assert (out / "runs" / name / "curve.jsonl").is_file()
    report = (out / "report.md").read_text()
    assert all(f"`{n}`" in report for n in mine)
    config = (out / "config.yaml").read_text()
    assert str((work / "my_method.py").resolve()) in config  # later commands on the out dir load it again


def test_a_later_command_on_the_out_dir_loads_its_plugins(tmp_path: Path, registries: None) -> None:
    """The out dir's stored config names the plugin by its absolute path: a command on that out dir alone (as
    in a fresh process, where nothing is registered yet) loads it again."""
    from selective_lm.store.outconfig import remember, resolve

    plugin = tmp_path / "kinds.py"
    plugin.write_text(_PLUGIN_KIND.format(name="later_kind", needs="student_logits"))
    out = tmp_path / "out"
    out.mkdir()
    remember(*resolve("smoke", None, [f"plugins=[{plugin}]", "train.score=later_kind"], out))
    reg.SCORE_KINDS.pop("later_kind")
    with pytest.MonkeyPatch.context() as m:
        m.setattr("selective_lm.config.plugins._LOADED", {})
        cfg, _ = resolve(None, None, [], out)
    assert cfg.train.score == "later_kind" and cfg.plugins == [str(plugin.resolve())]
    assert "later_kind" in reg.SCORE_KINDS


_PLUGIN_KIND = """
import torch
from selective_lm.method import ScoreKind, register_score
register_score("{name}", ScoreKind(lambda v: torch.zeros_like(v.loss), frozenset({{"{needs}"}})))
"""


@pytest.mark.parametrize("case", ["missing", "raises", "collides", "needs", "unknown_need"])
def test_bad_plugins_exit_2_with_one_line_naming_the_plugin(case: str, tmp_path: Path, registries: None,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    plugin = tmp_path / f"{case}_plugin.py"
    overrides: list[str] = []
    expect = {"missing": "no such file", "raises": "RuntimeError when loaded: broken on purpose",
              "collides": "'topk' is already registered by selective_lm (built-in)",
              "needs": "needs the reference's next-token distribution", "unknown_need": "not one of"}[case]
    if case == "raises":
        plugin.write_text("raise RuntimeError('broken on purpose')\n")
    elif case == "collides":
        plugin.write_text("from selective_lm.method import Method, register_method\n"
                          "register_method('topk', Method(strategy='topk'))\n")
    elif case == "needs":  # a score kind that needs the reference's distribution, with offline (stored) scores
        plugin.write_text(_PLUGIN_KIND.format(name="needs_ref_dist", needs="reference_logits"))
        overrides = ["train.score=needs_ref_dist", "scoring.mode=offline"]
    elif case == "unknown_need":
        plugin.write_text(_PLUGIN_KIND.format(name="odd_kind", needs="telepathy"))
    out = tmp_path / "out"
    code = main(["run", "--preset", "smoke", "--out", str(out), "--plugins", str(plugin), *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert expect in err and f"plugin {plugin}" in err, err
    assert not out.exists()  # before any work


def test_registries_refuse_collisions_and_suggest_names(registries: None) -> None:
    with pytest.raises(ValueError, match="already registered by selective_lm"):
        reg.register_score("excess", ScoreKind(lambda v: v.loss))
    with pytest.raises(ValueError, match="must be an identifier"):
        reg.register_score("two words", ScoreKind(lambda v: v.loss))
    with pytest.raises(ValueError, match="did you mean 'excess'"):
        reg.lookup("score kind", "exces", reg.SCORE_KINDS)
    with pytest.raises(ValueError, match="only a control"):
        Method(strategy="topk", compare=("topk", "random"))
    with pytest.raises(ValueError, match="selects by no score"):
        Method(strategy=None, score="loss")
    with pytest.raises(ValueError, match="conclusions: a control's outcomes"):
        Method(strategy="topk", role="control", compare=("topk", "random"), conclusions={"wins": "?"})
    with pytest.raises(ValueError, match="conclusions: a control's outcomes"):
        Method(strategy="topk", conclusions={"beats": "no pair to beat"})
    with pytest.raises(ValueError, match="unknown objective"):
        reg.register_method("no_objective", Method(strategy="topk", objective="nope"))
    assert "no_objective" not in reg.METHODS  # a refused registration leaves nothing behind


def test_registering_a_strategy_registers_its_method(registries: None) -> None:
    reg.register_strategy("lowest_first", Strategy(lambda s, noise, t: (-s,), lambda s, t: -s / t))
    method = reg.METHODS["lowest_first"]
    assert method.strategy == "lowest_first" and method.objective == "ce" and method.selects


def test_example_score_and_strategy_in_the_python_api(registries: None) -> None:
    """The example's strategy and score kind through `selective_loss` (the HF Trainer's path): the kept tokens
    are those of largest |loss - entropy|, computed here by hand from the logits."""
    import importlib.util

    from selective_lm import Selection, selective_loss

    spec = importlib.util.spec_from_file_location("my_method_api_test", EXAMPLE)
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 11, generator=g) * 3
    labels = torch.randint(0, 11, (2, 9), generator=g)
    labels[0, 7:] = -100
    out = selective_loss(logits, labels, None, Selection(method="my_abs_topk", score="my_surprise", ratio=0.5))
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    target = labels[:, 1:]
    valid = target >= 0
    loss = -logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    key = torch.where(valid, (loss - entropy).abs(), -torch.inf).flatten()
    k = int(int(valid.sum()) * 0.5 + 0.5)  # num_selected: floor(ratio x n + 0.5)
    expected = torch.zeros_like(key, dtype=torch.bool)
    expected[key.topk(k).indices] = True
    chosen = out.weights[:, 1:].flatten() != 0
    assert torch.equal(chosen, expected)
    # The loss: the mean CE of those tokens. In float32 (u = 6e-8) a log-softmax of 11 logits of size <= 15 (3 sigma
    # x 3, plus the log-sum-exp) takes ~16 roundings of terms <= 15: within 16 x 15 x u = 1.5e-5 of float64's.
    assert out.mean().item() == pytest.approx(loss.flatten()[expected].mean().item(), abs=2e-5)


def test_renamed_keys_of_an_objective(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An out dir stored before `train.kd_weight` became `objectives.distill.weight` loads with its value moved;
    a user who types the old key is told the new one."""
    import yaml

    from selective_lm.config import load_config

    tree = load_config("smoke").to_dict()
    tree["train"]["kd_weight"], tree["train"]["kd_temperature"] = 0.5, 1.0  # as an earlier version stored it
    del tree["objectives"], tree["plugins"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    assert main(["config", "--out", str(tmp_path)]) == 0
    stored = yaml.safe_load(capsys.readouterr().out)
    assert stored["objectives"] == {"distill": {"weight": 0.5}} and "kd_weight" not in stored["train"]
    assert main(["config", "--preset", "smoke", "train.kd_temperature=2"]) == 2
    assert capsys.readouterr().err.strip().endswith("is now 'objectives.distill.temperature'")


def test_plugins_flag_takes_a_list_and_repeats(tmp_path: Path, registries: None,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    a, b, c = (tmp_path / f"{n}.py" for n in "abc")
    for path in (a, b, c):
        path.write_text(_PLUGIN_KIND.format(name=f"kind_{path.stem}", needs="student_logits"))
    assert main(["config", "--preset", "smoke", "--plugins", f"{a},{b}", "--plugins", str(c),
                 "train.score=kind_c"]) == 0
    assert {"kind_a", "kind_b", "kind_c"} <= set(reg.SCORE_KINDS)
    assert str(c.resolve()) in capsys.readouterr().out  # the printed config names every plugin
