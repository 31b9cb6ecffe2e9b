"""Noise injection: what each kind does to the text, the spans it reports, and the rate it reaches."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from selective_lm.noise import KIND_IDS, NoiseInjector, token_kinds, web_text

HEAD = "Problem: Find 12 + 30.\n\nSolution:\n"
BODY = "\n".join(
    f"Step {k}: we add {k} and {3 * k} to get {4 * k}, which we keep for the next step of the argument."
    for k in range(1, 9)
)
DOC = HEAD + BODY + "\n\nSummary: the answer is 42."


def _strip(text: str, spans: list) -> str:
    """The text with every span removed."""
    out, pos = [], 0
    for s, e, _ in spans:
        out.append(text[pos:s])
        pos = e
    return "".join(out) + text[pos:]


def _only(kind: str, seed: int = 0, rate: float = 0.2) -> NoiseInjector:
    return NoiseInjector(rate, {kind: 1.0}, seed)


def test_web_text_varies():
    rng = random.Random(0)
    samples = [web_text(rng) for _ in range(200)]
    assert len(set(samples)) == 200
    joined = "\n".join(samples)
    for marker in ("http", "©", "<div", "cookies", " | "):
        assert marker in joined


@pytest.mark.parametrize("kind", ["web", "foreign_step"])
def test_insertions_leave_the_original_around_them(kind):
    inj = _only(kind)
    inj.inject(DOC.replace("Step", "Stage"), group="other", protect=len(HEAD))  # fills the foreign pool
    text, spans = inj.inject(DOC, group="mine", protect=len(HEAD))
    assert spans and all(k == kind for _, _, k in spans)
    assert _strip(text, spans) == DOC  # only inserted lines are marked, nothing else changed
    assert text.startswith(HEAD) and all(s >= len(HEAD) for s, _, _ in spans)
    if kind == "foreign_step":
        assert all("Stage" in text[s:e] for s, e, _ in spans)  # taken from the other group's document


def test_foreign_steps_never_come_from_the_same_group():
    inj = _only("foreign_step")
    inj.inject(DOC, group="same", protect=len(HEAD))
    text, spans = inj.inject(DOC, group="same", protect=len(HEAD))
    assert spans == [] and text == DOC


def test_numbers_alter_a_number_and_mark_the_rest_of_its_sentence():
    text, spans = _only("numbers").inject(DOC, group="g", protect=len(HEAD))
    assert spans and text.startswith(HEAD)
    lines = DOC.split("\n")
    for s, e, _ in spans:
        prefix = text[text.rfind("\n", 0, s) + 1:s]
        original = next(line for line in lines if line.startswith(prefix))[len(prefix):]
        old_number, new_number = (re.match(r"\d+(?:\.\d+)?", t).group() for t in (original, text[s:]))
        assert old_number != new_number  # a wrong value, where the sentence had a right one
        assert e == len(text) or text[e] == "\n" or text[e - 1] in ".!?"


def test_truncate_cuts_a_line_mid_sentence_and_goes_on():
    text, spans = _only("truncate").inject(DOC, group="g", protect=len(HEAD))
    assert spans and len(text) < len(DOC)
    for s, e, _ in spans:
        fragment = text[s:e]
        assert fragment in DOC and not fragment.endswith(".")
        assert text[e] == "\n" and text[e + 1:].startswith(("Step", "\n"))  # continuing text follows


def test_injection_is_deterministic_per_seed():
    weights = {"web": 0.3, "numbers": 0.3, "foreign_step": 0.25, "truncate": 0.15}

    def run(seed: int) -> list:
        inj = NoiseInjector(0.2, weights, seed)
        return [inj.inject(DOC, group=str(i % 3), protect=len(HEAD)) for i in range(6)]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_controller_reaches_the_rate_and_mixes_kinds():
    weights = {"web": 0.3, "numbers": 0.3, "foreign_step": 0.25, "truncate": 0.15}
    inj = NoiseInjector(0.3, weights, 0)
    for i in range(200):
        text, spans = inj.inject(DOC, group=str(i % 7), protect=len(HEAD))
        noisy = sum(e - s for s, e, _ in spans)
        inj.observe(len(text), noisy, len(text), noisy)  # one token per character
    assert inj.noisy_tokens / inj.tokens == pytest.approx(0.3, rel=0.05)
    assert all(chars > 0 for chars in inj.kind_chars.values())


def test_zero_rate_changes_nothing():
    assert NoiseInjector(0.0, {"web": 1.0}, 0).inject(DOC) == (DOC, [])


def test_token_kinds_marks_overlapping_tokens():
    offsets = np.array([[0, 3], [3, 5], [5, 9], [9, 9], [9, 12]])
    kinds = token_kinds(offsets, [(4, 6, "web"), (10, 11, "numbers")])
    assert kinds.tolist() == [0, KIND_IDS["web"], KIND_IDS["web"], 0, KIND_IDS["numbers"]]
