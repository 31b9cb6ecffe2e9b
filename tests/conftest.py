"""Shared fixtures: no network, the smoke config, and a prepared + scored smoke out dir."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# Never wait on the Hub's retries in tests: an unreachable hub id must fail at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model is no faster on two threads, and one thread cannot spin-wait on a busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def smoke_cfg():
    from selective_lm.config import load_config

    return load_config("smoke")


@pytest.fixture(scope="session")
def _smoke_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare → reference (trained) → score on the smoke preset, once per session."""
    from selective_lm.config import load_config
    from selective_lm.data import prepare
    from selective_lm.reference import reference
    from selective_lm.scoring import score

    out = tmp_path_factory.mktemp("smoke-template")
    cfg = load_config("smoke")
    prepare(cfg, out)
    reference(cfg, out)
    score(cfg, out)
    return out


def private_copy(template: Path, tmp_path: Path) -> Path:
    """A test's own copy of a session- or module-wide out dir, so that it may change it."""
    out = tmp_path / "out"
    shutil.copytree(template, out)
    return out


@pytest.fixture
def smoke_out(_smoke_template: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared, referenced and scored smoke out dir."""
    return private_copy(_smoke_template, tmp_path)
