"""The error every weight import raises, and the helpers that keep its messages short."""

from __future__ import annotations

from collections.abc import Iterable

MAX_LISTED = 25  # keys listed per category in an error message


class WeightsError(ValueError):
    """Pretrained weights that cannot be read or do not fit the model; the message names the file."""


def listing(keys: Iterable[str], limit: int = MAX_LISTED) -> str:
    """'a, b, c, ... (N more)': at most `limit` keys."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def first_line(error: Exception) -> str:
    """The first line of an error's message (torch's and Orbax's run to many lines)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
