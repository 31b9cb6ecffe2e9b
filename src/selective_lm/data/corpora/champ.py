"""`champ`: the embedded CHAMP math corpus (PyPI champ-dataset, MIT), no network needed.

Problems are partitioned by problem id, stratified by category and seeded by `data.seed`:
within each category the shuffled problems go to validation (`data.val_fraction`), then, by
default (`data.reference_problems=disjoint`), to the reference (`data.reference_fraction`), and
the rest to train, so that no problem feeds two of them: a reference trained on the training
problems' statements would score those tokens as learnable and bias selection towards them.
`val_clean` holds the human documents of the held-out problems (problem, concepts, hints,
step-by-step solution, answer); `val_noisy` their model-written solutions; `train` the
model-written solutions of the training problems (noise is injected by `slm prepare`);
`reference` the human documents of the reference problems plus, as `data.reference_mix` of its
text, noise-free model-written solutions of the same problems. `reference_problems=shared`
reproduces the old split: the reference holds the human documents of the training problems
plus conversations reserved from them (RESERVED_SHARE of each) and never used in `train`; the
validation problems are the same in both modes. Each split's meta lists its problems.

A model-written document is one conversation: the problem statement, the model's solution and
its one-sentence summary; the statement is the protected prefix, so that the solution reads in
context and noise injection leaves it intact. Documents are shuffled (seeded) before capping,
so a cap takes a random sample.

Natural wrong reasoning: CHAMP's experts marked the first wrong step of 540 model-written
solutions (two per problem, `Problem.fws_annotations`; 96 of them have none). In `train` and
`val_noisy` (the labelled splits) such a solution's text from its first wrong step to its end is
labelled `after_wrong_step` and the text before that step `before_wrong_step` (`Document.labels`;
token kinds in noise_kind.npy); a solution annotated as having no wrong step gets no label, and
neither does the statement or the summary. At their natural share (about 3 % of the
conversations) a 20k-token run would train on one or two of them, so they are interleaved with
the other conversations to make `data.annotated_share` of the split's characters from its start
until they run out (the order within each group stays the seeded shuffle; 0 = the plain shuffle).
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata, resources
from typing import TYPE_CHECKING, Any

from ...errors import UserError
from . import Document, Split, register

if TYPE_CHECKING:
    from ...config import DataConfig

CHAMP_FILE = "dataset_files/v0.json"
RESERVED_SHARE = 0.25  # of each training problem's conversations, kept out of train for the reference


@functools.lru_cache(maxsize=1)
def load_champ() -> dict[str, Any]:
    """The CHAMP JSON (problems, concepts, hints) from the champ-dataset package, read once per process (72 MB of
    JSON, ~0.3 s to parse; `slm run` reads it to check the splits, to prepare and for champ_answer): shared, so
    read it, never change it."""
    try:
        file = resources.files("champ_dataset") / CHAMP_FILE
        return json.loads(file.read_text())
    except ModuleNotFoundError:
        raise UserError("data.corpus=champ needs the champ-dataset package: pip install champ-dataset") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the CHAMP corpus ({e}); reinstall champ-dataset") from None


@dataclass(frozen=True)
class ChampPartition:
    """Which problems and conversations each CHAMP split may draw from (all lists sorted).

    With `reference_problems=shared`, `reference_problems` is `train_problems` and the reference
    conversations are reserved from the training problems' conversations.
    """

    train_problems: list[str]
    val_problems: list[str]
    reference_problems: list[str]
    train_conversations: list[tuple[str, str]]  # (problem id, conversation key)
    reference_conversations: list[tuple[str, str]]


def champ_partition(data: DataConfig, corpus: dict[str, Any] | None = None) -> ChampPartition:
    """Per category: `val_fraction` of the problems to validation, then (disjoint mode)
    `reference_fraction` to the reference, the rest to train; every category of at least
    three problems feeds all three. Shared mode reserves RESERVED_SHARE of each training
    problem's conversations for the reference instead. Seeded by `data.seed`; the
    validation problems do not depend on the mode."""
    problems = (corpus or load_champ())["problems"]
    disjoint = data.reference_problems == "disjoint"
    rng = random.Random(f"{data.seed}:champ-split")
    by_category: dict[str, list[str]] = {}
    for pid, p in sorted(problems.items()):
        by_category.setdefault(p["category"], []).append(pid)
    val: list[str] = []
    ref: list[str] = []
    for _, ids in sorted(by_category.items()):
        rng.shuffle(ids)
        n_val = max(1, min(len(ids) - 1, round(len(ids) * data.val_fraction)))
        val += ids[:n_val]
        if disjoint and (rest := len(ids) - n_val) >= 2:
            n_ref = max(1, min(rest - 1, round(len(ids) * data.reference_fraction)))
            ref += ids[n_val:n_val + n_ref]
    train = sorted(set(problems) - set(val) - set(ref))
    if disjoint:
        def convs(pids: list[str]) -> list[tuple[str, str]]:
            return [(pid, key) for pid in pids for key in sorted(problems[pid]["conversations"])]
        return ChampPartition(train, sorted(val), sorted(ref), convs(train), convs(sorted(ref)))
    train_convs, reserved = [], []
    for pid in train:
        keys = sorted(problems[pid]["conversations"])
        rng.shuffle(keys)
        k = round(len(keys) * RESERVED_SHARE)
        reserved += [(pid, key) for key in keys[:k]]
        train_convs += [(pid, key) for key in keys[k:]]
    return ChampPartition(train, sorted(val), list(train), sorted(train_convs), sorted(reserved))


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


def wrong_step_labels(text: str, head: int, annotation: dict[str, Any] | None) -> tuple[tuple[int, int, str], ...]:
    """The label spans of a model-written document `text` whose solution starts at `head`, from CHAMP's
    annotation of its first wrong step (`text` / `start_idx` in the annotation's own text, which is the
    solution before stripping): `before_wrong_step` [head, wrong step), `after_wrong_step` [wrong step,
    solution end). None for no annotation, no wrong step, or an annotation of another text."""
    if not annotation or annotation.get("start_idx") is None or not isinstance(annotation.get("text"), str):
        return ()
    raw = annotation["text"]
    solution = raw.strip()
    if not solution or not text.startswith(solution, head):
        return ()
    end = head + len(solution)
    wrong = min(max(head + annotation["start_idx"] - (len(raw) - len(raw.lstrip())), head), end)
    return tuple(sp for sp in ((head, wrong, "before_wrong_step"), (wrong, end, "after_wrong_step")) if sp[1] > sp[0])


def _annotated(problem: dict[str, Any], key: str | None) -> dict[str, Any] | None:
    return (problem.get("fws_annotations") or {}).get(key) if key is not None else None


def _champ_docs(corpus: dict[str, Any], items: list[tuple[str, str | None]],
                labels: bool = False) -> Iterator[Document]:
    """Documents for (problem id, conversation key) pairs; key None = the human document. With `labels`,
    annotated solutions carry their wrong-step labels (`wrong_step_labels`)."""
    for pid, key in items:
        p = corpus["problems"][pid]
        if key is None:
            yield Document(_human_text(p, corpus), pid, pid, 0, "human")
        elif made := _model_text(p, p["conversations"][key]):
            spans = wrong_step_labels(made[0], made[1], _annotated(p, key)) if labels else ()
            yield Document(made[0], f"{pid}|{key}", pid, made[1], "model", labels=spans or None)


def _interleave(first: Iterator[Document], rest: Iterator[Document], share: float) -> Iterator[Document]:
    """`first`'s documents as `share` of the characters, interleaved with `rest`'s; once either runs dry,
    the other continues alone (so a split without a cap holds every document of both)."""
    a = b = 0
    while True:
        take_first = a <= share * (a + b)
        doc = next(first if take_first else rest, None)
        if doc is None:
            doc = next(rest if take_first else first, None)
            take_first = not take_first
            if doc is None:
                return
        a, b = (a + len(doc.text), b) if take_first else (a, b + len(doc.text))
        yield doc


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
    ref_text = ("human solutions + noise-free model-written solutions of the reference problems"
                if data.reference_problems == "disjoint"
                else "human solutions + reserved model-written solutions of the training problems")
    src = {"corpus": "champ", "package": f"champ-dataset {metadata.version('champ-dataset')}", "file": CHAMP_FILE}

    def docs(split: str, items: list[tuple[str, str | None]]) -> Iterator[Document]:
        return _champ_docs(corpus, _shuffled(items, data.seed, split))

    def labelled(split: str, items: list[tuple[str, str]]) -> Iterator[Document]:
        """A labelled split: the annotated conversations as `data.annotated_share` of it (module docstring)."""
        order = _shuffled(items, data.seed, split)
        if not data.annotated_share:
            return _champ_docs(corpus, order, labels=True)
        annotated = [(pid, key) for pid, key in order if _annotated(problems[pid], key)]
        others = [(pid, key) for pid, key in order if not _annotated(problems[pid], key)]
        return _interleave(_champ_docs(corpus, annotated, labels=True), _champ_docs(corpus, others, labels=True),
                           data.annotated_share)

    return {
        "reference": Split(
            _mix(docs("reference-human", [(p, None) for p in part.reference_problems]),
                 docs("reference-model", part.reference_conversations), data.reference_mix),
            {"sources": {**src, "text": ref_text, "reference_mix": data.reference_mix,
                         "reference_problems": data.reference_problems}, "problems": part.reference_problems}),
        "train": Split(labelled("train", part.train_conversations),
                       {"sources": {**src, "text": "model-written solutions"}, "problems": part.train_problems},
                       labelled=True),
        "val_clean": Split(docs("val_clean", [(p, None) for p in part.val_problems]),
                           {"sources": {**src, "text": "human solutions"}, "problems": part.val_problems}),
        "val_noisy": Split(labelled("val_noisy", val_convs),
                           {"sources": {**src, "text": "model-written solutions"}, "problems": part.val_problems},
                           labelled=True),
    }
