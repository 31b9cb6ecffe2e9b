"""The CLI's contract: config printing, exit codes, one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selective_lm.cli import COMMANDS, main


def test_config_prints_resolved_yaml(capsys) -> None:
    assert main(["config", "--preset", "smoke", "train.ratio=0.5", "train.method=topk"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["preset"] == "smoke" and cfg["train"]["ratio"] == 0.5 and cfg["train"]["method"] == "topk"


def test_default_preset_is_champ_smollm2(capsys) -> None:
    assert main(["config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["preset"] == "champ-smollm2" and cfg["model"]["name"] == "embedded:smollm2-135m"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["config", "train.ratoi=0.5"], "did you mean 'train.ratio'"),
        (["config", "train.ratio=1.5"], "(0, 1]"),
        (["config", "train.ratio=0"], "train.ratio"),
        (["config", "train.method=best"], "train.method"),
        (["config", "--preset", "smok"], "did you mean 'smoke'"),
        (["config", "--config", "/nonexistent/c.yaml"], "cannot read config file"),
        (["bogus"], "invalid choice"),
        (["prepare", "--preset", "smoke", "--preset", "x", "--config", "y"], "not allowed"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv: list[str], needle: str, capsys) -> None:
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def _exit_code(argv: list[str]) -> int:
    """main()'s return value, or the code of the SystemExit that argparse raises for usage errors."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def test_missing_store_is_a_user_error(tmp_path: Path, capsys) -> None:
    assert main(["train", "--preset", "smoke", "--out", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "slm prepare" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "empty" / "runs").exists()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command: str, capsys) -> None:
    """In process (argparse exits 0 after printing); the console script itself: test_console_script_version."""
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0 and "--preset" in capsys.readouterr().out


def test_console_script_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "selective_lm.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip()


def test_prepare_smoke_through_the_cli(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["prepare", "--preset", "smoke", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"reference", "train", "val_clean", "val_noisy"}
    for split in summary:
        for name in ("tokens.npy", "doc_ids.npy", "meta.json"):
            assert (out / "data" / split / name).is_file(), (split, name)
    assert (out / "data" / "train" / "noise_mask.npy").is_file()
    assert main(["prepare", "--preset", "smoke", "--out", str(out)]) == 0  # same config: nothing rebuilt
    assert all(s["reused"] for s in json.loads(capsys.readouterr().out).values())
