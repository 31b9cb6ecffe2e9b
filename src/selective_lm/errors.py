"""The user-error type and the one "did you mean ...?" helper.

A `UserError` is a mistake the user can fix (bad config, missing file, stale store): the CLI
prints its message as one line on stderr and exits 2. Pure tensor functions raise `ValueError`
instead (they know nothing of the CLI); the CLI treats both alike.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, ...): the CLI exits 2 with one line."""


def did_you_mean(name: object, choices: Iterable[str], cutoff: float = 0.6, n: int = 1) -> str:
    """`"; did you mean 'x'?"` for the closest of `choices` (up to `n` of them, closest first: "'x', 'y' or
    'z'"), or `""` when nothing is close."""
    close = [repr(c) for c in difflib.get_close_matches(str(name), list(choices), n=n, cutoff=cutoff)]
    if not close:
        return ""
    return f"; did you mean {close[0] if len(close) == 1 else ', '.join(close[:-1]) + ' or ' + close[-1]}?"
