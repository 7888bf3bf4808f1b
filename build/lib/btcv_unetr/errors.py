"""The one exception type for mistakes a user can fix (bad flag, missing file, bad datalist).

Command-line entry points catch :class:`UserError` and print its message as a single line with a
non-zero exit status; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message says what, where, and what to do."""
