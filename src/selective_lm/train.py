"""`slm train`: one CLM or SLM run under `runs/<name>/`, through the one loop in training/trainer.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Config
from .store.layout import OutDir
from .training.trainer import Trainer


def train(cfg: Config, out: str | Path | OutDir, name: str | None = None, *, reference_model: Any = None,
          replace_stale: bool = False) -> dict[str, Any]:
    """Run (or resume, or return the finished summary of) the run `cfg.train` describes.

    The run dir is `runs/<name>` (default: `cfg.run_name()`). A run dir holding another config's
    run is an error, or is cleared when `replace_stale` (what `slm run` does when a changed config
    invalidates a run). `reference_model` is needed with `scoring.mode=online` only.
    """
    out = OutDir.of(out)
    run = out.run(name or cfg.run_name())
    return Trainer(cfg, out, run, reference_model=reference_model, build=False).fit(replace_stale)
