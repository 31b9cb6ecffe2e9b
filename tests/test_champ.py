"""The CHAMP partition: a reference split whose problems are in neither train nor validation."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from typing import Any

import pytest

from selective_lm.config import DataConfig, load_config
from selective_lm.data.corpora.champ import (
    RESERVED_SHARE,
    ChampPartition,
    _model_text,
    _shuffled,
    champ,
    champ_partition,
    load_champ,
)
from selective_lm.errors import UserError

SPLITS = ("reference", "train", "val_clean", "val_noisy")
# sha256 of [train_problems, val_problems, train_conversations, reference_conversations] at data.seed=0,
# computed with the partition code from before data.reference_problems existed (champ-dataset 0.1.x)
OLD_PARTITION_SEED0 = "74418bc07a3353744189dd8a50b89469d23c186ad241675e0eebb0ea8915004d"


@pytest.fixture(scope="module")
def corpus() -> dict[str, Any]:
    return load_champ()


def _data(*overrides: str) -> DataConfig:
    return load_config("smoke", overrides=list(overrides)).data


def _conversations(corpus: dict[str, Any], pids: list[str]) -> set[tuple[str, str]]:
    return {(pid, key) for pid in pids for key in corpus["problems"][pid]["conversations"]}


def _categories(corpus: dict[str, Any], pids: list[str]) -> Counter[str]:
    return Counter(corpus["problems"][pid]["category"] for pid in pids)


def test_disjoint_mode_is_the_default_and_holds_each_problem_once(corpus):
    data = _data()
    assert data.reference_problems == "disjoint"
    part = champ_partition(data, corpus)
    ref, train, val = set(part.reference_problems), set(part.train_problems), set(part.val_problems)
    assert not ref & train and not ref & val and not train & val
    assert ref | train | val == set(corpus["problems"])
    assert len(val) == pytest.approx(270 * data.val_fraction, abs=3)
    assert len(ref) == pytest.approx(270 * data.reference_fraction, abs=3)
    assert set(part.train_conversations) == _conversations(corpus, part.train_problems)
    assert set(part.reference_conversations) == _conversations(corpus, part.reference_problems)
    for field in ("train_problems", "val_problems", "reference_problems", "train_conversations",
                  "reference_conversations"):
        assert getattr(part, field) == sorted(getattr(part, field)), field


def test_every_category_feeds_every_split(corpus):
    part = champ_partition(_data(), corpus)
    everything = _categories(corpus, list(corpus["problems"]))
    for pids in (part.train_problems, part.val_problems, part.reference_problems):
        assert set(_categories(corpus, pids)) == set(everything)
    for cat, n in everything.items():  # stratified: each category's shares follow the fractions
        assert _categories(corpus, part.val_problems)[cat] == pytest.approx(n * 0.15, abs=1)
        assert _categories(corpus, part.reference_problems)[cat] == pytest.approx(n * 0.25, abs=1)


def test_small_categories_keep_train_and_validation():
    """A category too small for three sets gives up its reference share first, never train or validation."""
    problems = {f"{cat}_{i}": {"category": cat, "conversations": {f"c{j}": {} for j in range(4)}}
                for cat, n in {"one": 1, "two": 2, "three": 3, "many": 20}.items() for i in range(n)}
    part = champ_partition(_data(), {"problems": problems})

    def count(pids: list[str]) -> dict[str, int]:
        return {cat: sum(p.startswith(f"{cat}_") for p in pids) for cat in ("one", "two", "three", "many")}

    assert count(part.val_problems) == {"one": 1, "two": 1, "three": 1, "many": 3}
    assert count(part.reference_problems) == {"one": 0, "two": 0, "three": 1, "many": 5}
    assert count(part.train_problems) == {"one": 0, "two": 1, "three": 1, "many": 12}


def test_partition_is_seeded(corpus):
    base = champ_partition(_data(), corpus)
    assert champ_partition(_data(), corpus) == base
    other = champ_partition(_data("data.seed=1"), corpus)
    assert other.reference_problems != base.reference_problems
    assert other.val_problems != base.val_problems and other.train_problems != base.train_problems
    more = champ_partition(_data("data.reference_fraction=0.4"), corpus)
    assert len(more.reference_problems) > len(base.reference_problems)
    assert more.val_problems == base.val_problems


def test_shared_mode_is_the_old_partition(corpus):
    part = champ_partition(_data("data.reference_problems=shared"), corpus)
    assert part.reference_problems == part.train_problems
    assert not set(part.val_problems) & set(part.train_problems)
    assert len(part.train_problems) + len(part.val_problems) == 270
    train, reserved = set(part.train_conversations), set(part.reference_conversations)
    assert not train & reserved and train | reserved == _conversations(corpus, part.train_problems)
    for pid in part.train_problems[:20]:
        n = len(corpus["problems"][pid]["conversations"])
        assert sum(p == pid for p, _ in part.reference_conversations) == round(n * RESERVED_SHARE)
    old = [part.train_problems, part.val_problems, part.train_conversations, part.reference_conversations]
    assert hashlib.sha256(json.dumps(old).encode()).hexdigest() == OLD_PARTITION_SEED0
    # the validation problems do not depend on the mode, so both modes evaluate on the same text
    assert champ_partition(_data(), corpus).val_problems == part.val_problems


def _problems_by_split(part: ChampPartition) -> dict[str, list[str]]:
    return {"reference": part.reference_problems, "train": part.train_problems,
            "val_clean": part.val_problems, "val_noisy": part.val_problems}


@pytest.mark.parametrize("mode", ["disjoint", "shared"])
def test_split_metas_list_their_problems(corpus, mode):
    data = _data(f"data.reference_problems={mode}")
    part, splits = champ_partition(data, corpus), champ(data)
    assert set(splits) == set(SPLITS)
    for split, pids in _problems_by_split(part).items():
        assert splits[split].meta["problems"] == pids, split
    assert splits["reference"].meta["sources"]["reference_problems"] == mode
    if mode == "disjoint":
        assert not set(splits["reference"].meta["problems"]) & set(splits["train"].meta["problems"])


@pytest.mark.parametrize("mode", ["disjoint", "shared"])
def test_documents_come_from_their_splits_problems(corpus, mode):
    data = _data(f"data.reference_problems={mode}")
    part, splits = champ_partition(data, corpus), champ(data)
    allowed_convs = {"reference": set(part.reference_conversations), "train": set(part.train_conversations),
                     "val_noisy": _conversations(corpus, part.val_problems)}
    for split, pids in _problems_by_split(part).items():
        docs = list(splits[split].documents)
        assert docs and {d.group for d in docs} <= set(pids), split
        for d in docs:
            pid, _, key = d.source_id.partition("|")
            assert pid == d.group and (d.origin == "human") == (not key), (split, d.source_id)
            if key:
                assert (pid, key) in allowed_convs[split], (split, d.source_id)
        if split == "reference" and mode == "disjoint":  # the reference's text runs out of human documents first
            assert {d.group for d in docs if d.origin == "human"} == set(pids)
    train_docs = {d.source_id for d in champ(data)["train"].documents}
    assert not train_docs & {d.source_id for d in champ(data)["reference"].documents}


@pytest.mark.parametrize("mix", [0.0, 0.5, 0.8, 1.0])
def test_disjoint_reference_follows_reference_mix(mix):
    docs = list(champ(_data(f"data.reference_mix={mix}"))["reference"].documents)
    chars = Counter()
    for d in docs:
        chars[d.origin] += len(d.text)
    assert chars["model"] / sum(chars.values()) == pytest.approx(mix, abs=0.03)


def test_fractions_must_leave_training_problems():
    with pytest.raises(UserError, match="reference_fraction"):
        load_config("smoke", overrides=["data.val_fraction=0.5", "data.reference_fraction=0.5"])
    shared = load_config("smoke", overrides=["data.val_fraction=0.5", "data.reference_fraction=0.5",
                                             "data.reference_problems=shared"])
    assert shared.data.reference_problems == "shared"
    with pytest.raises(UserError, match="reference_problems"):
        load_config("smoke", overrides=["data.reference_problems=mixed"])


def _annotation(corpus: dict[str, Any], source_id: str) -> dict[str, Any] | None:
    pid, key = source_id.split("|", 1)
    return (corpus["problems"][pid].get("fws_annotations") or {}).get(key)


@pytest.mark.parametrize("split", ["train", "val_noisy"])
def test_annotated_solutions_make_their_share_and_carry_their_wrong_step(corpus, split):
    """The first ~60 documents: annotated ones make data.annotated_share of the characters, and each labelled
    after_wrong_step span starts with the step CHAMP's expert marked (the annotation's start_idx..end_idx)."""
    data = _data("data.annotated_share=0.25")
    docs = list(itertools.islice(champ(data)[split].documents, 60))
    annotated = [d for d in docs if _annotation(corpus, d.source_id)]
    share = sum(len(d.text) for d in annotated) / sum(len(d.text) for d in docs)
    assert share == pytest.approx(0.25, abs=0.03)
    with_step = 0
    for d in annotated:
        a = _annotation(corpus, d.source_id)
        labels = {k: (s, e) for s, e, k in d.labels or ()}
        if a["start_idx"] is None:
            assert d.labels is None  # no wrong step: no label
            continue
        with_step += 1
        s, e = labels["after_wrong_step"]
        step = a["text"][a["start_idx"]:a["end_idx"]].strip()
        assert d.text[s:e].startswith(step) and d.text[e:].startswith("\n\nSummary") or e == len(d.text)
        assert labels.get("before_wrong_step", (d.protect, s)) == (d.protect, s)
    assert with_step >= 5
    assert all(d.labels is None for d in docs if d not in annotated)


def test_annotated_share_zero_is_the_plain_shuffle(corpus):
    """data.annotated_share=0 keeps the document order of before the labels existed (only labels are added)."""
    data = _data("data.annotated_share=0")
    part = champ_partition(data, corpus)
    plain = _shuffled(part.train_conversations, data.seed, "train")
    ids = [d.source_id for d in itertools.islice(champ(data)["train"].documents, 200)]
    assert ids == [f"{pid}|{key}" for pid, key in plain if _model_text(corpus["problems"][pid],
                                                                       corpus["problems"][pid]["conversations"][key])][:200]
    assert all(d.labels is None for d in champ(data)["reference"].documents)  # the reference is not labelled


def test_annotated_share_is_champ_only():
    with pytest.raises(UserError, match="annotated_share=0.3 has no effect with data.corpus=custom.*annotated wrong"):
        load_config("smoke", overrides=["data.corpus=custom", "data.sources={train: x.jsonl}",
                                        "data.annotated_share=0.3"])
