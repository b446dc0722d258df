"""The one exception type for user mistakes.

A UserError becomes a single line on stderr and exit code 2 (see cli.main); anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from a person: a config key, a file, a value. The message names it and the fix."""


def one_line(message, limit: int = 0) -> str:
    """A message as one line (library errors, torch's unpickling ones say, span lines); cut to
    `limit` characters when one is given."""
    text = " ".join(str(message).split()) or type(message).__name__
    return text if not limit or len(text) <= limit else text[:limit] + "..."
