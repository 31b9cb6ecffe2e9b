"""Noise injection for the train split, every character labelled with its kind.

Rho-1's premise is that a pretraining corpus mixes useful tokens with tokens that teach the
model nothing or something wrong. CHAMP's model-written solutions are fluent; we make the
training split realistically dirty and — unlike real web data — know exactly where the dirt
is, so selection precision can be measured. A label must mean what it says: only text that
was inserted or altered, or that now follows a cut, is noise; unchanged text is never noise.

Kinds (`KIND_NAMES`, ids stored per token in `noise_kind.npy`; names in meta.json):

- 0 `clean`: ordinary body text, unchanged (the EOS appended per document is clean too);
- 1 `web`: an inserted line (with its newline) of navigation/menu text, cookie and legal
  boilerplate, HTML fragments, URLs or mojibake, generated from templates with seeded
  randomness (never one fixed string);
- 2 `numbers`: only the altered characters of a number changed inside a step — not a prefix
  or suffix the old and new number share, nor a digit equal to the old one in its place when
  the length stayed — and an operator flipped after it in the same sentence;
- 3 `foreign_step`: an inserted line (with its newline): a fluent line taken from a document
  of another group (another problem);
- 4 `truncate`: a line cut off mid-sentence (its rest deleted); the text that now follows the
  cut — the newline at the cut and the next sentence, up to its end or the end of its line —
  is the span; the kept fragment before the cut is unchanged and stays `clean`;
- 5 `header`: the protected prefix (`Document.protect` characters: the CHAMP problem
  statement), never changed;
- 6 `numbers_context`: the unchanged text after the first altered character of a number to
  the end of its sentence (wrong in substance, since it builds on the wrong number, but
  unchanged and predictable text): reported, never counted as noise;
- 7 `after_wrong_step`, 8 `before_wrong_step` (`LABEL_KINDS`): natural wrong reasoning, not
  injected. CHAMP annotates the first wrong step of some model-written solutions
  (`Problem.fws_annotations`); the corpus labels such a solution's text from that step to its
  end `after_wrong_step` and the text before it `before_wrong_step` (`Document.labels`). The
  text is the corpus's own: these kinds are not noise (not in `noise_mask.npy`, not counted in
  the realized noise rate, not removed by the oracle). Injection moves the labels with its
  edits (`NoiseInjector.inject`); an injected kind beats a label where they overlap.

The noise kinds (`KINDS`: web, numbers, foreign_step, truncate) make `noise_mask.npy`, the
injected rate and the oracle's removal; header, numbers_context and the labels are reported
only. A token whose characters touch several spans takes the most specific kind (`PRECEDENCE`:
a noise kind beats numbers_context, which beats header, which beats after_wrong_step, which
beats before_wrong_step, which beats clean).

Kinds mix by their weights as shares of noise events (edits): each event goes to the kind
furthest behind its share. Events differ in size (a web line has tens of characters, an
altered number one or two), so a split's token shares by kind follow from the event mix and
are reported in meta.json (`realized_by_kind`). How much to inject per document is steered by
feedback on realized token counts of the noise kinds only (`observe`), so the split's
`noise_mask` fraction lands on `rate` whatever the tokenizer does to markup and digits.
"""

from __future__ import annotations

import bisect
import random
import re

import numpy as np

KINDS = ("web", "numbers", "foreign_step", "truncate")  # the noise kinds: injected, in the noise mask
LABEL_KINDS = ("after_wrong_step", "before_wrong_step")  # the corpus's own text, labelled (CHAMP's annotations)
KIND_NAMES = ("clean", *KINDS, "header", "numbers_context", *LABEL_KINDS)  # indexed by the ids in noise_kind.npy
KIND_IDS = {k: i for i, k in enumerate(KIND_NAMES)}
NOISE_IDS = np.array([KIND_IDS[k] for k in KINDS], np.uint8)
LABEL_IDS = np.array([KIND_IDS[k] for k in LABEL_KINDS], np.uint8)
PRECEDENCE = ("clean", "before_wrong_step", "after_wrong_step", "header", "numbers_context", "truncate",
              "foreign_step", "web", "numbers")  # later wins
_RANK = {k: i for i, k in enumerate(PRECEDENCE)}

Span = tuple[int, int, str]  # [start, end) character span and its kind (any kind but clean)

_MAX_EVENTS = 200  # per document; a guard, reached only by tiny documents with high rates
_POOL_SIZE = 2000  # lines kept for foreign steps (reservoir: memory stays bounded)
_NUMBER = re.compile(r"(?<![A-Za-z_\d.])\d+(?:\.\d+)?")
_OPERATOR = re.compile(r"(?<= )[-+<>≤≥×÷*/](?= )")
_FLIP = {"+": "-", "-": "+", "<": ">", ">": "<", "≤": "≥", "≥": "≤", "×": "÷", "÷": "×", "*": "/", "/": "*"}
_STOP = re.compile(r"[.!?](?=\s)")
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
    return (f"© {rng.randint(1998, 2024)} {name} {rng.choice(['Inc', 'Ltd', 'LLC', 'Media Group'])}. "
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
    """True when [a, b) touches no existing span.

    The spans are sorted and never overlap, so their ends grow too: of the spans starting
    before `b`, only the last can reach past `a` (a bisection, not a scan: this runs per line).
    """
    i = bisect.bisect_left(spans, (b,))
    return i == 0 or spans[i - 1][1] <= a


def noise_chars(spans: list[Span]) -> int:
    """Characters of the noise kinds: what the rate counts (header and numbers_context are not noise)."""
    return sum(e - s for s, e, k in spans if k in KINDS)


def _fraction(text: str, spans: list[Span]) -> float:
    return noise_chars(spans) / max(len(text), 1)


def _moved(labels: list[Span], moves: list[tuple[int, int, int]]) -> list[Span]:
    """Label spans carried through edits, each (a, b, n): text[a:b] replaced by n characters, in order.

    A point at or before `a` stays, one at or after `b` shifts with the edit, one inside the replaced
    text goes to `a` (so a line inserted at a label's start falls inside it, where the injected kind
    wins). Spans left empty are dropped.
    """
    for a, b, n in moves:
        def point(x: int, a: int = a, b: int = b, n: int = n) -> int:
            return x if x <= a else x + n - (b - a) if x >= b else a
        labels = [(point(s), point(e), k) for s, e, k in labels]
    return [sp for sp in labels if sp[1] > sp[0]]


def _edit(text: str, spans: list[Span], a: int, b: int, new: str, marks: list[Span]) -> tuple[str, list[Span]]:
    """Replace text[a:b] with `new`, shift later spans, and add `marks` (offsets into the new text)."""
    shift = len(new) - (b - a)
    moved = [(s, e, k) if e <= a else (s + shift, e + shift, k) for s, e, k in spans]
    return text[:a] + new + text[b:], sorted([*moved, *marks])


def _lines(text: str, protect: int) -> list[tuple[int, int]]:
    """[start, end) of each non-empty line at or after `protect` (end excludes the newline)."""
    out, pos = [], 0
    for line in text.split("\n"):
        if pos >= protect and line.strip():
            out.append((pos, pos + len(line)))
        pos += len(line) + 1
    return out


def _mutate_number(tok: str, rng: random.Random) -> str:
    """A different, plausible number: off by a little, digits swapped, or scaled."""
    if "." in tok:
        whole, frac = tok.split(".", 1)
        return f"{whole}.{frac[:-1]}{(int(frac[-1]) + rng.randint(1, 9)) % 10}"
    n, r = int(tok), rng.random()
    swaps = [i for i in range(len(tok) - 1) if tok[i] != tok[i + 1] and not (i == 0 and tok[1] == "0")]
    if r < 0.2 and swaps:
        i = rng.choice(swaps)
        return tok[:i] + tok[i + 1] + tok[i] + tok[i + 2:]
    if r < 0.35:
        return str(n * rng.choice([2, 10]) if n else rng.randint(2, 9))
    new = n + rng.choice([-1, 1]) * rng.randint(1, max(1, n // 4))
    return str(new if new >= 0 and new != n else n + rng.randint(1, 3))


def _altered(old: str, new: str) -> list[tuple[int, int]]:
    """[start, end) ranges in `new` of the characters that differ from `old`: a common prefix and
    suffix are unchanged, and so is a digit equal to the one in its place when the length stayed."""
    n = min(len(old), len(new))
    p = next((i for i in range(n) if old[i] != new[i]), n)
    s = next((i for i in range(n - p) if old[-1 - i] != new[-1 - i]), n - p)
    if p >= len(new) - s:  # a pure deletion: nothing new to point at, the whole number is the edit
        return [(0, len(new))]
    if len(old) != len(new):  # digits shifted: everything between prefix and suffix is new
        return [(p, len(new) - s)]
    out: list[tuple[int, int]] = []
    for i in range(p, len(new) - s):
        if old[i] == new[i]:
            continue
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _follow_end(text: str, pos: int) -> int:
    """End of the sentence that starts at the first non-space character from `pos` (its line end at most)."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    m = _SENTENCE_END.search(text, pos)
    return len(text) if m is None else m.start() if m.group() == "\n" else m.end()


def is_noise(kinds: np.ndarray) -> np.ndarray:
    """The noise mask of kind ids: True on the noise kinds (web, numbers, foreign_step, truncate)."""
    return (kinds >= NOISE_IDS[0]) & (kinds <= NOISE_IDS[-1])  # ids 1..len(KINDS): 100x faster than np.isin


def token_kinds(offsets: np.ndarray, spans: list[Span]) -> np.ndarray:
    """Kind id per token (0 = clean): the kind of the spans its characters overlap, the most specific
    (`PRECEDENCE`) where they overlap several.

    offsets: [n_tokens, 2] character offsets from a fast tokenizer; returns uint8 [n_tokens].
    """
    kinds = np.zeros(len(offsets), np.uint8)
    if spans and len(offsets):
        starts, ends = offsets[:, 0], offsets[:, 1]
        for s, e, k in sorted(spans, key=lambda sp: _RANK[sp[2]]):
            kinds[(starts < e) & (ends > s)] = KIND_IDS[k]
    return kinds


class NoiseInjector:
    """Inject noise into documents one by one, steering the split's token-level noise fraction.

    Deterministic for a seed and a document order; state (feedback counters, the pool of
    lines for foreign steps) carries from one document to the next.
    """

    def __init__(self, rate: float, weights: dict[str, float], seed: int) -> None:
        self.rate = rate
        self.weights = {k: w for k, w in weights.items() if w > 0}
        self.rng = random.Random(f"{seed}:noise")
        self.kind_events = dict.fromkeys(self.weights, 0)  # what the mix steers on
        self.kind_chars = dict.fromkeys(self.weights, 0)  # noise characters added, for the record
        self.tokens = self.noisy_tokens = self.chars = self.noisy_chars = 0
        self._pool: list[tuple[str | None, str]] = []
        self._pool_seen = 0
        self._moves: list[tuple[int, int, int]] = []  # the edits of the event being tried (for the labels)

    def observe(self, n_tokens: int, n_noisy_tokens: int, n_chars: int, n_noisy_chars: int) -> None:
        """Record how one injected document tokenized (feeds `char_target`).

        Noisy means the noise kinds only (`is_noise`, `noise_chars`), never header or numbers_context.
        """
        self.tokens += n_tokens
        self.noisy_tokens += n_noisy_tokens
        self.chars += n_chars
        self.noisy_chars += n_noisy_chars

    def char_target(self) -> float:
        """Noise-character fraction to aim at in the next document.

        Token and character fractions relate through their odds, odds(tokens) = κ·odds(chars),
        with κ measured so far; the goal overshoots by the current deficit so that the
        cumulative token fraction converges on `rate`.
        """
        goal, kappa = self.rate, 1.0
        if 0 < self.noisy_tokens < self.tokens and 0 < self.noisy_chars < self.chars:
            goal = min(max(self.rate + 2 * (self.rate - self.noisy_tokens / self.tokens), 0.0), 0.9)
            kappa = (self.noisy_tokens / (self.tokens - self.noisy_tokens)) / (
                self.noisy_chars / (self.chars - self.noisy_chars))
        odds = goal / (1 - goal) / kappa
        return odds / (1 + odds)

    def inject(self, text: str, group: str | None = None, protect: int = 0,
               labels: tuple[Span, ...] | None = None) -> tuple[str, list[Span]]:
        """Return the noisy text and the spans of every labelled character (all kinds but clean); the
        first `protect` characters stay intact and are the `header` span.

        `group` names where the document comes from (a CHAMP problem): foreign steps are
        only taken from documents of other groups. `labels` (spans of `LABEL_KINDS`, the corpus's
        own) are moved with every edit and returned after the noise spans; they never steer where
        or how much noise goes, so a document gets the same noise with or without them. The noise
        spans are sorted and disjoint; a label may overlap them (an injected kind wins its tokens).
        """
        spans: list[Span] = [(0, min(protect, len(text)), "header")] if protect > 0 and text else []
        moved = list(labels or ())
        if self.rate <= 0 or not self.weights:
            return text, spans + moved
        target, original = self.char_target(), text
        active = list(self.weights)
        for _ in range(_MAX_EVENTS):
            before = _fraction(text, spans)
            if not active or before >= target:
                break
            kind = min(active, key=lambda k: self.kind_events[k] / self.weights[k])
            self._moves = []
            done = getattr(self, f"_{kind}")(text, spans, protect, group)
            if done is None:  # nothing left in this document for that kind
                active.remove(kind)
                continue
            if _fraction(done[0], done[1]) - target > target - before:
                break  # this event would overshoot by more than stopping short: unbiased per document
            text, spans, added = done
            moved = _moved(moved, self._moves)
            self.kind_events[kind] += 1
            self.kind_chars[kind] += added
        self._remember(original, group, protect)
        return text, spans + moved

    def _edit(self, text: str, spans: list[Span], a: int, b: int, new: str,
              marks: list[Span]) -> tuple[str, list[Span]]:
        """`_edit`, recorded so that `inject` can move the labels with it."""
        self._moves.append((a, b, len(new)))
        return _edit(text, spans, a, b, new, marks)

    # ---- the four noise kinds: each returns (text, spans, noise chars added) or None

    def _web(self, text: str, spans: list[Span], protect: int, group: str | None):
        return self._insert(text, spans, protect, web_text(self.rng), "web")

    def _foreign_step(self, text: str, spans: list[Span], protect: int, group: str | None):
        for _ in range(20):
            if not self._pool:
                return None
            src, line = self.rng.choice(self._pool)
            if group is None or src != group:
                return self._insert(text, spans, protect, line, "foreign_step")
        return None

    def _numbers(self, text: str, spans: list[Span], protect: int, group: str | None):
        """Alter one number of a clean line (and maybe an operator after it in its sentence).

        Only the altered characters are `numbers`; the unchanged rest of the sentence from the
        first altered character on is `numbers_context`.
        """
        lines = [(a, b) for a, b in _lines(text, protect) if _clean(spans, a, b) and _NUMBER.search(text, a, b)]
        if not lines:
            return None
        a, b = self.rng.choice(lines)
        found = list(_NUMBER.finditer(text, a, b))
        results = [m for m in found if text[a:m.start()].rstrip().endswith("=")]
        m = self.rng.choice(results or found)
        stop = _STOP.search(text, m.end(), b)
        end = stop.end() if stop else b
        number = _mutate_number(m.group(), self.rng)
        new = number + text[m.end():end]
        altered = _altered(m.group(), number)  # offsets into `new`
        ops = list(_OPERATOR.finditer(new))
        if ops and self.rng.random() < 0.5:
            op = self.rng.choice(ops)
            flipped = _FLIP[op.group()]
            new = new[:op.start()] + flipped + new[op.end():]
            altered.append((op.start(), op.start() + len(flipped)))
        marks: list[Span] = []
        pos = altered[0][0]
        for i, j in altered:
            if i > pos:
                marks.append((m.start() + pos, m.start() + i, "numbers_context"))
            marks.append((m.start() + i, m.start() + j, "numbers"))
            pos = j
        if pos < len(new):
            marks.append((m.start() + pos, m.start() + len(new), "numbers_context"))
        text, spans = self._edit(text, spans, m.start(), end, new, marks)
        return text, spans, sum(j - i for i, j in altered)

    def _truncate(self, text: str, spans: list[Span], protect: int, group: str | None):
        """Cut a clean line mid-sentence and delete its rest: what now follows the cut is the span."""
        body_end = len(text.rstrip())
        lines = [(a, b, _follow_end(text, b)) for a, b in _lines(text, protect)
                 if b - a >= 50 and b < body_end and _clean(spans, a, b) and text.count(" ", a, b) >= 8]
        lines = [(a, b, f) for a, b, f in lines if _clean(spans, b, f)]
        if not lines:
            return None
        a, b, follow = self.rng.choice(lines)
        cuts = [i for i in range(a + (b - a) * 35 // 100, a + (b - a) * 75 // 100)
                if text[i] == " " and text[i - 1] not in ".!?"]  # mid-sentence: never after a full stop
        if not cuts:
            return None
        cut = self.rng.choice(cuts)
        text, spans = self._edit(text, spans, cut, b, "", [(cut, cut + follow - b, "truncate")])
        return text, spans, follow - b

    def _insert(self, text: str, spans: list[Span], protect: int, new: str, kind: str):
        """Insert `new` as a line of its own at a random line start (the end if there is none)."""
        starts = [p for p in (0, *(m.end() for m in re.finditer("\n", text)))
                  if p >= protect and p < len(text) and _clean(spans, p, p)]
        if starts:
            p = self.rng.choice(starts)
            new = new + "\n"
        else:
            p = len(text)
            new = "\n" + new
        text, spans = self._edit(text, spans, p, p, new, [(p, p + len(new), kind)])
        return text, spans, len(new)

    def _remember(self, text: str, group: str | None, protect: int) -> None:
        """Reservoir-sample the document's clean lines as future foreign steps."""
        for a, b in _lines(text, protect):
            if 60 <= b - a <= 600:
                self._pool_seen += 1
                if len(self._pool) < _POOL_SIZE:
                    self._pool.append((group, text[a:b]))
                else:
                    j = self.rng.randrange(self._pool_seen)
                    if j < _POOL_SIZE:
                        self._pool[j] = (group, text[a:b])
