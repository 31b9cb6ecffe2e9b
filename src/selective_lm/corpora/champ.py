"""`champ`: the embedded CHAMP math corpus (PyPI champ-dataset, MIT), no network needed.

Problems are split into train/validation by problem id, stratified by category and seeded by
`data.seed`. `val_clean` holds the human documents of the held-out problems (problem, concepts,
hints, step-by-step solution, answer); `val_noisy` their model-written solutions; `train` the
model-written solutions of the training problems (noise is injected by `slm prepare`);
`reference` the human documents of the training problems plus, as `data.reference_mix` of its
text, noise-free model-written solutions from conversations reserved for it and never used in
`train`. A model-written document is one conversation: the problem statement, the model's
solution and its one-sentence summary; the statement is the protected prefix, so that the
solution reads in context and noise injection leaves it intact. Documents are shuffled (seeded)
before capping, so a cap takes a random sample.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata, resources
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from . import Document, Split, register

if TYPE_CHECKING:
    from ..config import DataConfig

CHAMP_FILE = "dataset_files/v0.json"
RESERVED_SHARE = 0.25  # of each training problem's conversations, kept out of train for the reference


def load_champ() -> dict[str, Any]:
    """The CHAMP JSON (problems, concepts, hints) from the champ-dataset package."""
    try:
        file = resources.files("champ_dataset") / CHAMP_FILE
        return json.loads(file.read_text())
    except ModuleNotFoundError:
        raise UserError("data.corpus=champ needs the champ-dataset package: pip install champ-dataset") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the CHAMP corpus ({e}); reinstall champ-dataset") from None


@dataclass(frozen=True)
class ChampPartition:
    """Which problems and conversations each CHAMP split may draw from (all lists sorted)."""

    train_problems: list[str]
    val_problems: list[str]
    train_conversations: list[tuple[str, str]]  # (problem id, conversation key)
    reference_conversations: list[tuple[str, str]]


def champ_partition(data: DataConfig, corpus: dict[str, Any] | None = None) -> ChampPartition:
    """Hold out `val_fraction` of the problems per category; reserve RESERVED_SHARE of each
    training problem's conversations for the reference. Seeded by `data.seed`."""
    problems = (corpus or load_champ())["problems"]
    rng = random.Random(f"{data.seed}:champ-split")
    by_category: dict[str, list[str]] = {}
    for pid, p in sorted(problems.items()):
        by_category.setdefault(p["category"], []).append(pid)
    val: list[str] = []
    for _, ids in sorted(by_category.items()):
        rng.shuffle(ids)
        val += ids[: max(1, min(len(ids) - 1, round(len(ids) * data.val_fraction)))]
    train = sorted(set(problems) - set(val))
    train_convs, reserved = [], []
    for pid in train:
        keys = sorted(problems[pid]["conversations"])
        rng.shuffle(keys)
        k = round(len(keys) * RESERVED_SHARE)
        reserved += [(pid, key) for key in keys[:k]]
        train_convs += [(pid, key) for key in keys[k:]]
    return ChampPartition(train, sorted(val), sorted(train_convs), sorted(reserved))


def _human_text(p: dict[str, Any], corpus: dict[str, Any]) -> str:
    """Problem, concepts, hints, numbered solution steps and answer, as a textbook would lay them out."""
    concepts = [corpus["concepts"][i] for i in p["ch_list"] if i in corpus["concepts"]]
    hints = [corpus["hints"][i]["_text"] for i in p["ch_list"] if i in corpus["hints"]]
    parts = [f"Problem: {p['_text']}"]
    if concepts:
        parts.append("Concepts:\n" + "\n".join(
            f"- {c['name'][0].upper()}{c['name'][1:]}: {c['_text']}" if c.get("name") else f"- {c['_text']}"
            for c in concepts))
    if hints:
        parts.append("Hints:\n" + "\n".join(f"- {h}" for h in hints))
    steps = "\n".join(f"{i}. {s['_text']}" for i, s in enumerate(p["solution"]["steps"], 1))
    parts += [f"Solution:\n{steps}", f"Answer: {p['_answer']}"]
    return "\n\n".join(parts)


def _model_text(p: dict[str, Any], conversation: dict[str, Any]) -> tuple[str, int] | None:
    """Problem + the model's solution + its one-line summary, and the length of the problem header.

    The solution is the model message answered by the final "Now, summarize ..." request;
    earlier turns (concept explanations, few-shot examples) are left out. None when the
    model produced no solution (CHAMP's LENGTH errors).
    """
    msgs = conversation["messages"]
    ask = next((i for i, m in enumerate(msgs)
                if m["role"] == "User" and (m["text"] or "").startswith("Now, summarize")), None)
    if not ask or not msgs[ask - 1]["role"].startswith("Model") or not (msgs[ask - 1]["text"] or "").strip():
        return None
    summary = msgs[ask + 1]["text"] if ask + 1 < len(msgs) else None
    head = f"Problem: {p['_text']}\n\nSolution:\n"
    text = head + msgs[ask - 1]["text"].strip() + (f"\n\nSummary: {summary.strip()}" if summary else "")
    return text, len(head)


def _champ_docs(corpus: dict[str, Any], items: list[tuple[str, str | None]]) -> Iterator[Document]:
    """Documents for (problem id, conversation key) pairs; key None = the human document."""
    for pid, key in items:
        p = corpus["problems"][pid]
        if key is None:
            yield Document(_human_text(p, corpus), pid, pid, 0, "human")
        elif made := _model_text(p, p["conversations"][key]):
            yield Document(made[0], f"{pid}|{key}", pid, made[1], "model")


def _mix(human: Iterator[Document], model: Iterator[Document], share: float) -> Iterator[Document]:
    """Interleave two streams so that model-written text makes `share` of the characters (≈ tokens);
    stops when the stream due next runs dry, so the share holds even when a cap is not reached."""
    h = m = 0
    while True:
        take_model = share >= 1 or (share > 0 and m < share * (h + m))
        doc = next(model if take_model else human, None)
        if doc is None:
            return
        h, m = (h, m + len(doc.text)) if take_model else (h + len(doc.text), m)
        yield doc


def _shuffled(items: list, seed: int, split: str) -> list:
    items = list(items)
    random.Random(f"{seed}:{split}:order").shuffle(items)
    return items


@register("champ")
def champ(data: DataConfig) -> dict[str, Split]:
    """The four splits of the embedded CHAMP corpus (module docstring)."""
    corpus = load_champ()
    part = champ_partition(data, corpus)
    problems = corpus["problems"]
    val_convs = [(pid, key) for pid in part.val_problems for key in sorted(problems[pid]["conversations"])]
    src = {"corpus": "champ", "package": f"champ-dataset {metadata.version('champ-dataset')}", "file": CHAMP_FILE}

    def docs(split: str, items: list[tuple[str, str | None]]) -> Iterator[Document]:
        return _champ_docs(corpus, _shuffled(items, data.seed, split))

    return {
        "reference": Split(
            _mix(docs("reference-human", [(p, None) for p in part.train_problems]),
                 docs("reference-model", part.reference_conversations), data.reference_mix),
            {"sources": {**src, "text": "human solutions + reserved model-written solutions",
                         "reference_mix": data.reference_mix}, "problems": part.train_problems}),
        "train": Split(docs("train", part.train_conversations),
                       {"sources": {**src, "text": "model-written solutions"}, "problems": part.train_problems}),
        "val_clean": Split(docs("val_clean", [(p, None) for p in part.val_problems]),
                           {"sources": {**src, "text": "human solutions"}, "problems": part.val_problems}),
        "val_noisy": Split(docs("val_noisy", val_convs),
                           {"sources": {**src, "text": "model-written solutions"}, "problems": part.val_problems}),
    }
