"""The corpus registry: the shipped corpora are registered, and a corpus added with `register` is
all `slm prepare` needs (one token store per split it returns, its meta in meta.json)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import selective_lm.data.corpora
from selective_lm.config import load_config
from selective_lm.data.corpora import CORPORA, Document, Split
from selective_lm.errors import UserError
from selective_lm.prepare import prepare
from selective_lm.store.layout import load_store

NAME = "tiny-test"
SPLITS = ("train", "val_clean", "holdout")  # one split the study never reads


def _docs(split: str, n: int) -> Iterator[Document]:
    """A generator: a corpus may stream its documents (they are consumed once)."""
    for i in range(n):
        text = f"{split} document {i}: " + " ".join(f"word{j} plus {i + j} equals {i + 2 * j}." for j in range(12))
        yield Document(text, source_id=f"{split}-{i}", group=f"g{i % 3}", origin=f"{split}-origin")


@pytest.fixture
def tiny_corpus() -> Iterator[list[str]]:
    """Registers `tiny-test` for one test; returns the names of the data settings it was called with."""
    calls: list[str] = []

    @selective_lm.data.corpora.register(NAME)
    def tiny(data) -> dict[str, Split]:
        calls.append(data.corpus)
        sizes = {"train": 12, "val_clean": 4, "holdout": 3}
        return {s: Split(_docs(s, sizes[s]), {"sources": {"corpus": NAME, "split": s}, "problems": sizes[s]})
                for s in SPLITS}

    assert CORPORA[NAME] is tiny
    try:
        yield calls
    finally:
        del CORPORA[NAME]


def _cfg(*overrides: str):
    return load_config("smoke", overrides=[f"data.corpus={NAME}", "data.noise_rate=0", "data.max_tokens=null",
                                           *overrides])


def test_shipped_corpora_are_registered() -> None:
    assert {"champ", "custom"} <= set(CORPORA)
    assert all(callable(fn) for fn in CORPORA.values())


def test_a_registered_corpus_is_all_prepare_needs(tiny_corpus: list[str], tmp_path: Path) -> None:
    cfg = _cfg()
    summary = prepare(cfg, tmp_path)
    assert tiny_corpus == [NAME]
    assert set(summary) == set(SPLITS)
    for split in SPLITS:
        store = load_store(tmp_path / "data" / split)
        meta = json.loads((tmp_path / "data" / split / "meta.json").read_text())
        assert store.meta == meta
        assert meta["split"] == split
        assert meta["sources"] == {"corpus": NAME, "split": split}  # the Split's meta fields
        assert meta["problems"] == {"train": 12, "val_clean": 4, "holdout": 3}[split]
        assert set(meta["tokens_by_origin"]) == {f"{split}-origin"}
        assert meta["documents"] == [f"{split}-{i}" for i in range(meta["n_docs"])]
        assert store.noise_mask is None and meta["noise"] is None
        assert store.tokens.shape == (meta["n_blocks"], cfg.data.block_len) and meta["n_blocks"] > 0
        assert np.unique(np.asarray(store.doc_ids)).tolist() == list(range(meta["n_docs"]))
        assert summary[split]["n_blocks"] == meta["n_blocks"]


def test_a_registered_corpus_gets_noise_in_train_only(tiny_corpus: list[str], tmp_path: Path) -> None:
    prepare(_cfg("data.noise_rate=0.2"), tmp_path)
    train = load_store(tmp_path / "data" / "train")
    assert train.noise_mask is not None and train.noise_mask.any()
    assert train.meta["noise"]["rate"] == 0.2
    for split in ("val_clean", "holdout"):
        assert load_store(tmp_path / "data" / split).noise_mask is None


def test_prepare_names_the_splits_a_corpus_has(tiny_corpus: list[str], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no split 'reference' in data.corpus=tiny-test.*available: train"):
        prepare(_cfg(), tmp_path, splits=["reference"])
    assert not (tmp_path / "data").exists()


def test_the_registry_entry_is_gone_after_the_test() -> None:
    assert NAME not in CORPORA
    with pytest.raises(UserError, match="unknown corpus 'tiny-test'"):
        _cfg()
