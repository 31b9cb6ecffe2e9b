"""Noise injection: what each kind does to the text, the kinds it labels, and the rate it reaches."""

from __future__ import annotations

import difflib
import itertools
import random
import re

import numpy as np
import pytest

from selective_lm.data.assets import byte_tokenizer
from selective_lm.data.noise import (
    KIND_IDS,
    KIND_NAMES,
    KINDS,
    LABEL_KINDS,
    NoiseInjector,
    _altered,
    is_noise,
    noise_chars,
    token_kinds,
    web_text,
)

HEAD = "Problem: Find 12 + 30.\n\nSolution:\n"
BODY = "\n".join(
    f"Step {k}: we add {k} and {3 * k} to get {4 * k}, which we keep for the next step of the argument."
    for k in range(1, 9)
)
DOC = HEAD + BODY + "\n\nSummary: the answer is 42."
WEIGHTS = {"web": 0.3, "numbers": 0.3, "foreign_step": 0.25, "truncate": 0.15}
# one letter per kind: 'c'lean, 'w'eb, 'n'umbers, 'f'oreign_step, 't'runcate, 'h'eader, 'x' numbers_context,
# 'a'fter_wrong_step, 'b'efore_wrong_step
LETTERS = dict(zip(KIND_NAMES, "cwnfthxab", strict=True))


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _noise(spans: list) -> list:
    return [sp for sp in spans if sp[2] in KINDS]


def _strip(text: str, spans: list) -> str:
    """The text with every span removed."""
    out, pos = [], 0
    for s, e, _ in spans:
        out.append(text[pos:s])
        pos = e
    return "".join(out) + text[pos:]


def _only(kind: str, seed: int = 0, rate: float = 0.2) -> NoiseInjector:
    return NoiseInjector(rate, {kind: 1.0}, seed)


def _chars(text: str, spans: list) -> str:
    """The kind of each character of `text`, one letter each (LETTERS)."""
    kinds = token_kinds(np.stack([np.arange(len(text)), np.arange(1, len(text) + 1)], 1), spans)
    return "".join(LETTERS[KIND_NAMES[k]] for k in kinds)


def _check_tokens(tok, text: str, spans: list) -> np.ndarray:
    """Token kinds through a real fast tokenizer: byte-level, so each character's kind once per byte."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    kinds = token_kinds(np.asarray(enc["offset_mapping"]).reshape(-1, 2), spans)
    per_byte = "".join(k * len(c.encode()) for k, c in zip(_chars(text, spans), text, strict=True))
    assert "".join(LETTERS[KIND_NAMES[k]] for k in kinds) == per_byte
    np.testing.assert_array_equal(is_noise(kinds), np.isin(kinds, [KIND_IDS[k] for k in KINDS]))
    return kinds


def test_web_text_varies():
    rng = random.Random(0)
    samples = [web_text(rng) for _ in range(200)]
    assert len(set(samples)) == 200
    joined = "\n".join(samples)
    for marker in ("http", "©", "<div", "cookies", " | "):
        assert marker in joined


def test_kind_ids_are_stable():
    assert KIND_NAMES == ("clean", "web", "numbers", "foreign_step", "truncate", "header", "numbers_context",
                          "after_wrong_step", "before_wrong_step")
    assert KIND_IDS["clean"] == 0 and all(KIND_IDS[k] == i + 1 for i, k in enumerate(KINDS))
    assert not is_noise(np.array([KIND_IDS[k] for k in LABEL_KINDS], np.uint8)).any()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weights", [{"web": 0.5, "foreign_step": 0.5}, WEIGHTS])
def test_labels_move_with_the_edits_and_never_steer_them(seed, weights, tok):
    """Wrong-step labels on the body: the noise is the same with or without them, and after injection each
    label covers its own original text. Insertions only: exactly that text once the inserted lines are
    removed. Every kind: what keeps the label is original text in order (an edit's text takes its kind)."""
    wrong, end = DOC.index("Step 5"), DOC.index("\n\nSummary")
    labels = ((len(HEAD), wrong, "before_wrong_step"), (wrong, end, "after_wrong_step"))
    plain, labelled = NoiseInjector(0.4, weights, seed), NoiseInjector(0.4, weights, seed)
    for i in range(5):
        text, spans = plain.inject(DOC, group=str(i), protect=len(HEAD))
        text2, spans2 = labelled.inject(DOC, group=str(i), protect=len(HEAD), labels=labels)
        assert text2 == text and [sp for sp in spans2 if sp[2] not in LABEL_KINDS] == spans
        moved = {k: (s, e) for s, e, k in spans2 if k in LABEL_KINDS}
        assert set(moved) == set(LABEL_KINDS) and moved["before_wrong_step"][1] == moved["after_wrong_step"][0]
        chars = _chars(text, spans2)
        assert set(chars[:len(HEAD)]) == {"h"}
        for letter, (s, e), (a, b) in (("b", labels[0][:2], moved["before_wrong_step"]),
                                       ("a", labels[1][:2], moved["after_wrong_step"])):
            kept = "".join(c for c, k in zip(text[a:b], chars[a:b], strict=True) if k == letter)
            if "numbers" not in weights:  # insertions only: nothing of the original is lost
                assert kept == DOC[s:e] and set(chars[a:b]) <= {letter, "w", "f"}
            it = iter(DOC[s:e])
            assert kept and all(c in it for c in kept)  # a subsequence of the original labelled text
        _check_tokens(tok, text, spans2)


@pytest.mark.parametrize("kind", ["web", "foreign_step"])
def test_insertions_mark_exactly_the_inserted_lines(kind, tok):
    inj = _only(kind)
    inj.inject(DOC.replace("Step", "Stage"), group="other", protect=len(HEAD))  # fills the foreign pool
    text, spans = inj.inject(DOC, group="mine", protect=len(HEAD))
    noise = _noise(spans)
    assert noise and all(k == kind for _, _, k in noise)
    assert spans == [(0, len(HEAD), "header"), *noise]
    assert _strip(text, noise) == DOC  # only inserted lines are marked, nothing else changed
    for s, e, _ in noise:  # each span is whole lines of their own, with their newlines
        assert (text[s - 1] == "\n" and text[e - 1] == "\n") or (text[s] == "\n" and e == len(text))
    assert _chars(text, spans) == "h" * len(HEAD) + "".join(
        ("w" if kind == "web" else "f") if any(s <= i < e for s, e, _ in noise) else "c"
        for i in range(len(HEAD), len(text)))
    if kind == "foreign_step":
        assert all("Stage" in text[s:e] for s, e, _ in noise)  # taken from the other group's document
    kinds = _check_tokens(tok, text, spans)
    assert is_noise(kinds).sum() == sum(len(text[s:e].encode()) for s, e, _ in noise)  # a token per byte


def test_foreign_steps_never_come_from_the_same_group():
    inj = _only("foreign_step")
    inj.inject(DOC, group="same", protect=len(HEAD))
    text, spans = inj.inject(DOC, group="same", protect=len(HEAD))
    assert spans == [(0, len(HEAD), "header")] and text == DOC


def test_header_is_the_protected_prefix(tok):
    for kind in KINDS:
        inj = NoiseInjector(0.5, {kind: 1.0}, 0)
        inj.inject(DOC.replace("Step", "Stage"), group="other", protect=len(HEAD))
        text, spans = inj.inject(DOC, group="mine", protect=len(HEAD))
        assert text.startswith(HEAD) and spans[0] == (0, len(HEAD), "header")
        assert _chars(text, spans)[: len(HEAD)] == "h" * len(HEAD)
        assert "h" not in _chars(text, spans)[len(HEAD):]
        _check_tokens(tok, text, spans)
    assert NoiseInjector(0.2, WEIGHTS, 0).inject("x" * 10, protect=20)[1] == [(0, 10, "header")]


def test_numbers_mark_only_the_altered_digits(tok):
    head, before, after = "Problem: x?\nSolution:\n", "Step 1. We get x = ", ". Then y = x + 3."
    doc, seen = head + before + "12" + after, set()
    for seed in range(60):
        text, spans = _only("numbers", seed, rate=0.3).inject(doc, group="g", protect=len(head))
        new = re.match(r"\d+", text[len(head + before):]).group()
        assert text == head + before + new + after and new != "12"  # only the number changed
        seen.add(new)
        p = next((i for i in range(min(len(new), 2)) if new[i] != "12"[i]), min(len(new), 2))
        s = next((i for i in range(min(len(new), 2) - p) if new[-1 - i] != "12"[-1 - i]), min(len(new), 2) - p)
        assert p < len(new) - s  # the mutations never only delete digits
        # clean up to the first altered digit; numbers_context from the unchanged digits after it to the "."
        expected = ("h" * len(head) + "c" * len(before) + "c" * p + "n" * (len(new) - s - p)
                    + "x" * (s + 1) + "c" * (len(after) - 1))
        assert _chars(text, spans) == expected, (new, _chars(text, spans))
        kinds = _check_tokens(tok, text, spans)
        assert is_noise(kinds).sum() == len(new) - s - p == noise_chars(spans)
    assert {"21", "120", "24", "13", "9"} <= seen  # swapped, scaled, doubled, shifted by one, shortened


@pytest.mark.parametrize(("old", "new", "altered"), [
    ("12", "13", [(1, 2)]), ("12", "21", [(0, 2)]), ("100", "1000", [(3, 4)]), ("12", "112", [(1, 2)]),
    ("7560", "15120", [(0, 4)]), ("12345", "19375", [(1, 2), (3, 4)]), ("3.14", "3.17", [(3, 4)]),
    ("10", "0", [(0, 1)]),
])
def test_altered_characters(old, new, altered):
    assert _altered(old, new) == altered


def test_numbers_flip_an_operator_of_the_sentence():
    head, line = "Q\n", "Then x = 12 + 30 - 5, and we stop here."
    flipped = 0
    for seed in range(20):
        text, spans = _only("numbers", seed, rate=0.3).inject(head + line, group="g", protect=len(head))
        kinds = _chars(text, spans)
        start = kinds.index("n")  # in the number after "=" (a result): 12
        assert text.startswith(head + "Then x = ") and set(kinds[:start]) <= {"h", "c"}
        assert set(kinds[start:]) == {"n", "x"} and kinds.endswith("x")  # the sentence ends the line
        ops = [i for i in range(start, len(text)) if kinds[i] == "n" and not text[i].isdigit()]
        old_tail = line[line.index(" + "):]  # after the number: same length, at most one operator flipped
        offset = len(text) - len(old_tail)
        assert [i + offset for i, (x, y) in enumerate(zip(text[offset:], old_tail, strict=True)) if x != y] == ops
        assert len(ops) <= 1 and all(text[i] in "+-" for i in ops)
        flipped += len(ops)
    assert 3 <= flipped <= 17  # about half the edits flip an operator after the number


def test_numbers_context_ends_with_its_sentence():
    text, spans = _only("numbers").inject(DOC, group="g", protect=len(HEAD))
    noise = _noise(spans)
    assert noise and text.startswith(HEAD)
    context = [sp for sp in spans if sp[2] == "numbers_context"]
    assert context and all(text[e - 1] in ".!?" or e == len(text) or text[e] == "\n" for _, e, _ in context)
    lines = DOC.split("\n")
    for s, _, _ in noise:
        prefix = text[text.rfind("\n", 0, s) + 1:s]
        assert prefix.startswith(("Step", "Summary"))
        original = next(line for line in lines if line.startswith(prefix))
        assert text[s] != original[len(prefix)]  # the first marked character is an altered one


def test_truncate_marks_what_follows_the_cut(tok):
    head = "Problem: Q?\nSolution:\n"
    first = "We first add the two numbers together and then we divide the sum by three to get it."
    second = "Next we add 2 and 3. Then we are done."
    doc = head + first + "\n" + second
    for seed in range(8):
        text, spans = _only("truncate", seed).inject(doc, group="g", protect=len(head))
        assert spans[0] == (0, len(head), "header") and [k for _, _, k in spans[1:]] == ["truncate"]
        cut = len(text) - len(second) - 1 - len(head)
        kept = first[:cut]
        assert text == head + kept + "\n" + second and first[cut] == " "  # cut at a word boundary, mid-sentence
        assert 0.35 * len(first) <= cut < 0.75 * len(first)
        follow = "\nNext we add 2 and 3."
        assert _chars(text, spans) == ("h" * len(head) + "c" * len(kept) + "t" * len(follow)
                                       + "c" * (len(second) + 1 - len(follow)))
        _check_tokens(tok, text, spans)


def test_truncate_on_a_longer_document():
    text, spans = _only("truncate").inject(DOC, group="g", protect=len(HEAD))
    noise = _noise(spans)
    assert noise and len(text) < len(DOC)
    for s, e, _ in noise:
        assert text[s] == "\n" and text[s - 1] != "."  # the line before the span was cut mid-sentence
        assert text[s + 1:].startswith(("Step", "\n", "Summary")) and text[s + 1:e] in DOC
        assert text[e - 1] == "." and (e == len(text) or text[e] in " \n")


def test_injection_is_deterministic_per_seed():
    def run(seed: int) -> list:
        inj = NoiseInjector(0.2, WEIGHTS, seed)
        return [inj.inject(DOC, group=str(i % 3), protect=len(HEAD)) for i in range(6)]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_spans_are_sorted_and_disjoint():
    inj = NoiseInjector(0.4, WEIGHTS, 3)
    for i in range(40):
        text, spans = inj.inject(DOC, group=str(i % 5), protect=len(HEAD))
        assert spans == sorted(spans) and all(e > s for s, e, _ in spans)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
        assert spans[-1][1] <= len(text)


def test_controller_reaches_the_rate_and_mixes_kinds():
    inj = NoiseInjector(0.3, WEIGHTS, 0)
    for i in range(200):
        text, spans = inj.inject(DOC, group=str(i % 7), protect=len(HEAD))
        noisy = noise_chars(spans)  # header and numbers_context are not noise
        inj.observe(len(text), noisy, len(text), noisy)  # one token per character
    assert inj.noisy_tokens / inj.tokens == pytest.approx(0.3, rel=0.05)
    assert all(chars > 0 for chars in inj.kind_chars.values())
    events = np.array([inj.kind_events[k] for k in WEIGHTS]) / sum(inj.kind_events.values())
    np.testing.assert_allclose(events, list(WEIGHTS.values()), atol=0.05)  # the weights are shares of events


def test_zero_rate_changes_nothing():
    assert NoiseInjector(0.0, {"web": 1.0}, 0).inject(DOC) == (DOC, [])
    assert NoiseInjector(0.0, {"web": 1.0}, 0).inject(DOC, protect=4) == (DOC, [(0, 4, "header")])


def test_token_kinds_marks_overlapping_tokens():
    offsets = np.array([[0, 3], [3, 5], [5, 9], [9, 9], [9, 12]])
    kinds = token_kinds(offsets, [(4, 6, "web"), (10, 11, "numbers")])
    assert kinds.tolist() == [0, KIND_IDS["web"], KIND_IDS["web"], 0, KIND_IDS["numbers"]]


def test_token_kinds_takes_the_most_specific_kind():
    offsets = np.array([[0, 4], [4, 8], [8, 12], [12, 16], [16, 20]])
    spans = [(0, 2, "header"), (2, 6, "numbers_context"), (6, 7, "numbers"), (7, 10, "numbers_context"),
             (10, 13, "truncate"), (13, 18, "web")]
    kinds = [KIND_NAMES[k] for k in token_kinds(offsets, spans)]
    assert kinds == ["numbers_context", "numbers", "truncate", "web", "web"]
    assert [KIND_NAMES[k] for k in token_kinds(offsets, [(0, 3, "header"), (5, 6, "truncate")])] == [
        "header", "truncate", "clean", "clean", "clean"]


def _unchanged(original: str, text: str) -> np.ndarray:
    """Prefix sums over `text` of the characters in words that difflib aligns with an equal word of
    `original` (words: numbers, identifiers, single symbols, whitespace runs). Word level, so that
    a digit of an altered number never counts as unchanged by a chance alignment of digits."""
    words = re.compile(r"\d+(?:\.\d+)?|\w+|\s+|\S")
    a = [m.group() for m in words.finditer(original)]
    b = list(words.finditer(text))
    same = np.zeros(len(text) + 1, np.int64)
    for blk in difflib.SequenceMatcher(None, a, [m.group() for m in b], autojunk=False).get_matching_blocks():
        for m in b[blk.b: blk.b + blk.size]:
            same[m.start() + 1: m.end() + 1] = 1
    return np.cumsum(same)


def test_labels_match_the_edits_on_champ_documents(tok):
    """On real smoke-preset documents: altered tokens are noise, unchanged tokens are not.

    A token is changed when some character of it lies in a word that difflib does not align
    with the original document. ≥ 90 % of `numbers` tokens and of inserted lines are changed;
    clean, header and numbers_context tokens are unchanged; truncate tokens are unchanged text
    that now follows a cut.
    """
    from selective_lm.config import load_config
    from selective_lm.data.corpora import CORPORA

    docs = list(itertools.islice(CORPORA["champ"](load_config("smoke").data)["train"].documents, 120))
    inj = NoiseInjector(0.2, WEIGHTS, 0)
    changed_by_kind = {k: [0, 0] for k in KIND_NAMES}  # [changed, all] tokens
    for doc in docs:
        text, spans = inj.inject(doc.text, doc.group, doc.protect, doc.labels)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = np.asarray(enc["offset_mapping"]).reshape(-1, 2)
        kinds = token_kinds(offsets, spans)
        inj.observe(len(kinds), int(is_noise(kinds).sum()), len(text), noise_chars(spans))
        same = _unchanged(doc.text, text)
        changed = same[offsets[:, 1]] - same[offsets[:, 0]] < offsets[:, 1] - offsets[:, 0]
        for k in np.unique(kinds):
            changed_by_kind[KIND_NAMES[k]][0] += int(changed[kinds == k].sum())
            changed_by_kind[KIND_NAMES[k]][1] += int((kinds == k).sum())
    share = {k: c / n for k, (c, n) in changed_by_kind.items() if n}
    assert set(share) == set(KIND_NAMES), share
    assert share["numbers"] >= 0.9 and share["web"] >= 0.95 and share["foreign_step"] >= 0.95, share
    # not exactly 0: an inserted "line\n" after "\n" aligns as well as "\nline" before it, and numbers_context
    # holds the unchanged digits of an altered number, whose word did change
    assert share["clean"] <= 0.01 and share["header"] <= 0.01 and share["numbers_context"] <= 0.03, share
    assert share["after_wrong_step"] <= 0.01 and share["before_wrong_step"] <= 0.01, share  # labels moved with edits
    assert share["truncate"] <= 0.05, share
    assert inj.noisy_tokens / inj.tokens == pytest.approx(0.2, abs=0.03)
