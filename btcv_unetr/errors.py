"""The one exception type for mistakes a user can fix (bad flag, missing file, bad datalist).

Command-line entry points catch :class:`UserError` and print its message as a single line with a
non-zero exit status; anything else is a bug and keeps its traceback.

    one_line   text with its control characters escaped: a file name holding a newline cannot forge a line
"""

from __future__ import annotations

import unicodedata

# Characters that end or rewrite a line on a terminal besides the control characters (Unicode category Cc):
# the line and paragraph separators, and the bidirectional overrides that reorder what is shown.
_UNSAFE = {"\u2028", "\u2029", *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))}
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(char: str) -> str:
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def one_line(text: str) -> str:
    """``text`` without surrounding whitespace, every control character inside escaped as Python writes it
    (``a\\nb``): printed, it is one line that no name inside it can break or disguise. Idempotent."""
    return "".join(_escaped(c) if unicodedata.category(c) == "Cc" or c in _UNSAFE else c for c in text.strip())


class UserError(Exception):
    """A problem with the user's input: the message says what, where, and what to do.

    Its text is always one line (:func:`one_line`): names quoted in it (files, flags, datalist entries) are shown
    escaped wherever the error is printed.
    """

    def __str__(self) -> str:
        return one_line(super().__str__())
