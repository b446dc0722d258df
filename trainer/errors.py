"""The one exception type for user mistakes, and the one way to make an error one line.

A UserError becomes a single line on stderr and exit code 2 (see cli.main); anything
else is a bug and keeps its traceback.
"""

import re


class UserError(Exception):
    """Bad input from a person: a config key, a file, a value. The message names it and the fix."""


def one_line(message, limit: int = 0) -> str:
    """A message as one line (library errors, torch's unpickling ones say, span lines); cut to
    `limit` characters when one is given."""
    text = " ".join(str(message).split()) or type(message).__name__
    return text if not limit or len(text) <= limit else text[:limit] + "..."


def reason(e: BaseException) -> str:
    """A library error as a short clause for "... is unreadable (<reason>)": an OSError's
    strerror, else the first sentence of its message. torch's unpickler explains at length how
    to turn its safety off, which is wrong advice for a file from disk: keep only what it refused."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    chunks = [c for c in re.split(r"\n\s*\n", text) if c.strip()]
    text = one_line("".join(ch if ch.isprintable() else " " for ch in (chunks or [""])[0]))
    return text.split(". ", 1)[0][:200] if chunks else type(e).__name__
