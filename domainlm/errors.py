"""The one exception type for a user's mistake.

A `UserError` reaches the CLI as a one-line message on stderr and a non-zero exit status, never a
traceback: the message names the file, line or field at fault and says what to do. Anything else
that escapes is a bug in domainlm and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, bad config or a refused operation; the message is shown as-is to the user."""

    exit_code = 2


def did_you_mean(word: str, options) -> str:
    """' (did you mean X?)' for the closest option, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
