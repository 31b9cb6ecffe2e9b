"""Shared fixtures: no network, the smoke config, and a prepared + scored smoke out dir."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from helpers import testenv

# Never wait on the Hub's retries in tests: an unreachable hub id must fail at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# One torch thread, or another float order on demand (SLM_TEST_THREADS, SLM_TEST_ONEDNN: helpers/testenv.py), here
# and in the children (through the environment; the helpers' entry points apply it too).
testenv.apply()

# The suite checks exact identities (resume bit for bit, two processes equal one, our loss equal to
# transformers'), often between a child process and the test's own, in float32: on a GPU machine both
# run on the CPU, as in CI. This process's CUDA is initialised first (so it keeps its GPU for the
# tests marked `gpu`, tests/test_gpu.py, which check what CUDA changes with tolerances of their own),
# then hidden from this process's code and from every child.
CUDA = torch.cuda.is_available()
_cuda_is_available = torch.cuda.is_available
if CUDA:
    torch.cuda.init()
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.cuda.is_available = lambda: False


@pytest.fixture(autouse=True)
def _cuda_for_gpu_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The GPU is back for the tests marked `gpu` (see `CUDA` above), in accelerate's state too (one per process,
    it keeps the first device it was made with): reset before the test and after it."""
    if not (CUDA and request.node.get_closest_marker("gpu") is not None):
        yield
        return
    from accelerate.state import AcceleratorState

    monkeypatch.setattr(torch.cuda, "is_available", _cuda_is_available)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(autouse=True)
def _accelerate_state_as_found() -> Iterator[None]:
    """accelerate keeps one state per process and refuses a second mixed precision. transformers' and TRL's
    trainers (test_api, examples: TRL's SFTConfig defaults to bf16) may leave it in bf16, which our engine, that
    asks for "no" and autocasts itself, would then refuse: a test that leaves another precision resets it."""
    yield
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", "no") != "no":
        AcceleratorState._reset_state(reset_partial_state=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Without a CUDA device the tests marked `gpu` are skipped, with the reason. The modules that hold `slow`
    tests come first, each still in one piece (its module fixtures made once): pytest-xdist hands tests out in
    this order, so the quick ones fill the workers' last minutes instead of a long test running alone."""
    if not CUDA:
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
    slow = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow)  # stable: the order within each group is kept


@pytest.fixture(scope="module")
def one_thread():
    """The suite's thread count (helpers/testenv.py) through a module, whatever its code sets, and back after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(testenv.threads())
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
    from selective_lm.prepare import prepare
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
