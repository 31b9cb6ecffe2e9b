"""Shared fixtures: no network, a private asset cache, the smoke config."""

from __future__ import annotations

import os

import pytest

# Never wait on the Hub's retries in tests: an unreachable hub id must fail at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def smoke_cfg():
    from selective_lm.config import load_config

    return load_config("smoke")
