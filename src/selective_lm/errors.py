"""The user-error type, the one "did you mean ...?" helper and the one-line form of other errors.

A `UserError` is a mistake the user can fix (bad config, missing file, stale store): the CLI
prints its message as one line on stderr and exits 2. Pure tensor functions raise `ValueError`
instead (they know nothing of the CLI); the CLI treats both alike.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, ...): the CLI exits 2 with one line."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): third-party errors
    become part of our one-line messages."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def did_you_mean(name: object, choices: Iterable[str], cutoff: float = 0.6, n: int = 1) -> str:
    """`"; did you mean 'x'?"` for the closest of `choices` (up to `n` of them, closest first: "'x', 'y' or
    'z'"), or `""` when nothing is close."""
    close = [repr(c) for c in difflib.get_close_matches(str(name), list(choices), n=n, cutoff=cutoff)]
    if not close:
        return ""
    return f"; did you mean {close[0] if len(close) == 1 else ', '.join(close[:-1]) + ' or ' + close[-1]}?"
