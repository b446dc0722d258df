"""The one exception type for user mistakes.

A UserError becomes a single line on stderr and exit code 2 (see cli.main); anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from a person: a config key, a file, a value. The message names it and the fix."""
