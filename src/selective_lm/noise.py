"""Noise injection for the train split, marked character by character.

Rho-1's premise is that a pretraining corpus mixes useful tokens with tokens that teach the
model nothing or something wrong. CHAMP's model-written solutions are fluent; we make the
training split realistically dirty and — unlike real web data — know exactly where the dirt
is, so selection precision can be measured (`noise_mask.npy`). Four kinds:

- `web`: navigation/menu lines, cookie and legal boilerplate, HTML fragments, URLs and
  mojibake, generated from templates with seeded randomness (never one fixed string);
- `numbers`: a number (and sometimes an operator after it) altered inside a step; the span
  runs from the altered number to the end of its sentence, because everything the step
  derives from a wrong number is wrong too (CHAMP's first-wrong-step annotations reason alike);
- `foreign_step`: a fluent line taken from a document of another group (another problem)
  inserted between lines;
- `truncate`: a line cut off mid-sentence and followed by the next line; the cut-off sentence
  fragment is the span.

Kinds mix by their weights as shares of noisy characters: each event goes to the kind that
is furthest behind its share. How much to inject per document is steered by feedback on
realized token counts (`observe`), so the split's token-level noise fraction lands on `rate`
whatever the tokenizer does to markup and digits.
"""

from __future__ import annotations

import random
import re

import numpy as np

KINDS = ("web", "numbers", "foreign_step", "truncate")
KIND_IDS = {k: i + 1 for i, k in enumerate(KINDS)}  # 0 = clean in token-level kind arrays

Span = tuple[int, int, str]  # [start, end) character span of injected/corrupted text, kind

_MAX_EVENTS = 200  # per document; a guard, reached only by tiny documents with high rates
_POOL_SIZE = 2000  # lines kept for foreign steps (reservoir: memory stays bounded)
_NUMBER = re.compile(r"(?<![A-Za-z_\d.])\d+(?:\.\d+)?")
_OPERATOR = re.compile(r"(?<= )[-+<>≤≥×÷*/](?= )")
_FLIP = {"+": "-", "-": "+", "<": ">", ">": "<", "≤": "≥", "≥": "≤", "×": "÷", "÷": "×", "*": "/", "/": "*"}
_SENTENCE_END = re.compile(r"[.!?](?=\s)|\n")

# --------------------------------------------------------------------------- web-style text

_NAV = ["Home", "Forums", "Topics", "Algebra", "Geometry", "Calculus", "Number Theory", "Login",
        "Sign up", "Register", "Search", "About us", "Contact", "Help", "FAQ", "Blog", "Tags",
        "Members", "Latest", "Popular", "Unanswered", "Store", "Careers", "Newsletter"]
_SITE = ["math", "study", "tutor", "answers", "homework", "exam", "quiz", "brain", "proof", "calc",
         "solve", "learn", "hub", "zone", "forum", "central", "world", "box"]
_TLD = ["com", "net", "org", "io", "co.uk", "info", "edu"]
_WORDS = ["algebra", "solution", "problem", "lesson", "worksheet", "chapter", "practice", "review",
          "integers", "primes", "sequence", "polynomial", "inequality", "combinatorics", "answer"]
_GARBLE = list("ÃÂâ€™œ�¤¦§¨©ª«¬®¯°±²³´µ¶·¸¹º»¼½¾¿ï»¿Ð×ØÞßæð") + ["â€", "Ã©", "Ã¨", "Ã¢", "ï¿½", "\\x9d"]


def _site(rng: random.Random) -> str:
    return f"{rng.choice(_SITE)}{rng.choice(_SITE)}.{rng.choice(_TLD)}"


def _url(rng: random.Random) -> str:
    path = "/".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3)))
    query = rng.choice(["", f"?utm_source={rng.choice(_SITE)}&utm_medium=cpc",
                        f"?ref=sidebar&page={rng.randint(2, 40)}", f"#comment-{rng.randint(100, 99999)}"])
    return f"http{rng.choice(['', 's'])}://www.{_site(rng)}/{path}-{rng.randint(1, 99999)}.html{query}"


def _nav(rng: random.Random) -> str:
    sep = rng.choice([" | ", " · ", " > ", "  ", " / ", " » "])
    return sep.join(rng.sample(_NAV, rng.randint(3, 8)))


def _cookie(rng: random.Random) -> str:
    return (f"We use cookies to {rng.choice(['improve your experience', 'personalise content and ads', 'analyse our traffic', 'remember your preferences'])}. "  # noqa: E501
            f"By {rng.choice(['continuing to browse', 'clicking “Accept”', 'using this site'])} you agree to our "
            f"{rng.choice(['Cookie Policy', 'Privacy Policy', 'use of cookies', 'Terms of Service'])}. "
            f"{rng.choice(['[Accept all]', 'Accept | Reject', 'OK, got it', '[Manage preferences]'])}")


def _legal(rng: random.Random) -> str:
    name = rng.choice(_SITE).capitalize() + rng.choice(_SITE).capitalize()
    return (f"© {rng.randint(1998, 2024)} {name} {rng.choice(['Inc.', 'Ltd.', 'LLC', 'Media Group'])}. "
            f"All rights reserved. {rng.choice(['Terms of Use', 'Privacy', 'DMCA', 'Imprint'])} · "
            f"{rng.choice(['Sitemap', 'Accessibility', 'Do Not Sell My Info', 'Advertise'])}")


def _html(rng: random.Random) -> str:
    word = rng.choice(_WORDS)
    return rng.choice([
        f'<div class="{rng.choice(["nav-item", "sidebar", "ad-slot", "post-meta", "footer"])}">'
        f'<a href="/{word}/{rng.randint(1, 9999)}">{word.capitalize()}</a></div>',
        f'<script src="/static/js/{rng.getrandbits(32):08x}.min.js" async></script>',
        f'<li class="menu-item"><span>{rng.choice(_NAV)}</span></li>&nbsp;&raquo;',
        f'<img src="https://cdn.{_site(rng)}/img/{rng.getrandbits(24):06x}.png" alt="{word}" />',
        f"Posted by {rng.choice(_SITE)}_{rng.randint(1, 999)} on {rng.randint(1, 28)}/{rng.randint(1, 12)}/"
        f"{rng.randint(2008, 2024)} · {rng.randint(0, 300)} comments · Reply · Share",
    ])


def _garbled(rng: random.Random) -> str:
    parts = [rng.choice(_GARBLE) if rng.random() < 0.6 else rng.choice(_WORDS) + " "
             for _ in range(rng.randint(8, 30))]
    return "".join(parts).strip()


_WEB_LINES = (_nav, _cookie, _legal, _html, _url, _garbled)


def web_text(rng: random.Random) -> str:
    """One to three lines of web boilerplate, different on every call."""
    return "\n".join(rng.choice(_WEB_LINES)(rng) for _ in range(rng.randint(1, 3)))


# --------------------------------------------------------------------------- text edits


def _clean(spans: list[Span], a: int, b: int) -> bool:
    """True when [a, b) touches no existing span (spans never overlap or nest)."""
    return all(b <= s or a >= e for s, e, _ in spans)


def _edit(text: str, spans: list[Span], a: int, b: int, new: str, mark: tuple[int, int, str]) -> tuple[str, list[Span]]:
    """Replace text[a:b] with `new`, shift later spans, and add `mark` (offsets into the new text)."""
    shift = len(new) - (b - a)
    moved = [(s, e, k) if e <= a else (s + shift, e + shift, k) for s, e, k in spans]
    return text[:a] + new + text[b:], sorted([*moved, mark])


def _lines(text: str, protect: int) -> list[tuple[int, int]]:
    """[start, end) of each non-empty line at or after `protect` (end excludes the newline)."""
    out, pos = [], 0
    for line in text.split("\n"):
        if pos >= protect and line.strip():
            out.append((pos, pos + len(line)))
        pos += len(line) + 1
    return out


