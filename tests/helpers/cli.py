"""The `slm` CLI in-process, as the tests call it."""

from __future__ import annotations

from pathlib import Path

from selective_lm.cli import main


def slm(command: str, out: Path, *overrides: str) -> int:
    """`slm <command> --preset smoke --out <out> <overrides>`; returns the exit code."""
    return main([command, "--preset", "smoke", "--out", str(out), *overrides])
