"""The one "did you mean" helper behind every unknown-name error (model names, config keys, sizes)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, choices: Iterable[str], *, n: int = 3, cutoff: float = 0.5) -> str:
    """``" Did you mean: 'a', 'b'?"`` with up to ``n`` close matches of ``name`` in ``choices``, or ``""``.

    Meant to be appended to an error message, so it starts with a space when non-empty.

    Args:
        name: the unknown name as the user wrote it; one or more variants may be tried by the caller.
        choices: valid names.
        n: most suggestions.
        cutoff: difflib similarity ratio in [0, 1] a suggestion needs.
    """
    close = difflib.get_close_matches(str(name), [str(choice) for choice in choices], n=n, cutoff=cutoff)
    return f" Did you mean: {', '.join(repr(match) for match in close)}?" if close else ""
