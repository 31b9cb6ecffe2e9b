"""`slm` in a child process that test_resume.py and test_parallel.py can kill at a known point.

Usage: python tests/helpers/train_proc.py PAUSE_AT MARKER slm-args... Runs `selective_lm.cli.main(slm-args)`;
when the loop is about to run optimizer step PAUSE_AT (0-based), it writes MARKER and sleeps, so
the test can SIGKILL it with everything up to that step on disk (checkpoints, log lines).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import testenv

from selective_lm import cli
from selective_lm.training.trainer import Trainer


def main(pause_at: int, marker: str, argv: list[str]) -> int:
    step_fn = Trainer.step

    def pausing_step(self: Trainer, step: int) -> dict[str, float]:
        if step == pause_at:
            Path(marker).write_text(str(step))
            time.sleep(600)  # killed long before this ends
        return step_fn(self, step)

    Trainer.step = pausing_step  # type: ignore[method-assign]
    return cli.main(argv)


if __name__ == "__main__":
    testenv.apply()
    sys.exit(main(int(sys.argv[1]), sys.argv[2], sys.argv[3:]))
