"""Run the slm CLI, SIGKILL-ing itself at a chosen point (for tests/test_reliability.py).

usage: python tests/helpers/killer.py POINT N -- <slm args>
POINT is one of the keys of `POINTS`; the process dies at the N-th time it reaches it.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import testenv


def _die_on_call(module: Any, name: str, n: int, before: bool = False) -> None:
    """Wrap module.name: on its n-th call, die (before the call, or after it returned)."""
    original = getattr(module, name)
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if before and calls["n"] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if not before and calls["n"] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(module, name, wrapper)


def _die_on_write(pattern: str, n: int) -> None:
    """Die right after the n-th atomic write of a file whose name contains `pattern`."""
    from selective_lm import files

    original = files.write_text
    calls = {"n": 0}

    def wrapper(path: Any, text: str) -> None:
        original(path, text)
        if pattern in str(path):
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGKILL)

    files.write_text = wrapper


def main() -> int:
    point, n, sep, *argv = sys.argv[1:]
    assert sep == "--"
    n = int(n)
    testenv.apply()  # the suite's float switches, as in the uninterrupted run
    from selective_lm.report import plots
    from selective_lm.training import checkpoint, trainer

    if point == "score":  # mid-score: after some rows are on disk
        _die_on_write(".ref_loss.progress.json", n)
    elif point == "train":  # mid-training: at the start of an optimizer step
        _die_on_call(trainer.Trainer, "step", n, before=True)
    elif point == "checkpoint":  # during a checkpoint write: the weights file is written, the rest not
        _die_on_call(checkpoint, "save_file", n)
    elif point == "eval":  # mid-evaluation
        _die_on_write(".progress.json", n)
    elif point == "report":  # during the report: some plots written
        _die_on_call(plots, "_save", n)
    else:
        raise SystemExit(f"unknown point {point}")
    from selective_lm.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
