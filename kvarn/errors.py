"""The one exception type users see, and how untrusted text is shown to them.

Every user-facing failure is a ``KvarnError`` whose message is a single line that names the file or
argument, says what is wrong and says how to fix it. The CLI prints ``error: <message>`` and exits 2.

Text that comes from files (recipe metadata, paths) can hold anything: ``printable`` escapes control
characters (ANSI escapes, carriage returns, bidi overrides) and caps the length, so a hostile value
can neither drive the terminal nor flood it. ``KvarnError`` applies the escaping to its own message.
"""

from __future__ import annotations

import json
import re

# C0/C1 controls, DEL, zero-width and bidirectional formatting characters
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")
MESSAGE_LIMIT = 2000


def _escape(m: re.Match) -> str:
    c = m.group()
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def printable(value, limit: int = 200) -> str:
    """``value`` as one line of at most about ``limit`` characters with control characters escaped
    (``\\x1b``); strings as they are, other values as JSON."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, default=str, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError):
            text = repr(value)
    if len(text) > limit:
        text = f"{text[:limit]}…(+{len(text) - limit} chars)"
    return _UNPRINTABLE.sub(_escape, text)


class KvarnError(Exception):
    """A user-facing error with a one-line message (file/argument, what is wrong, the fix)."""

    def __init__(self, message: str):
        message = str(message)
        if any(c in message for c in "\n\r\t\v\f"):
            message = " ".join(message.split())
        super().__init__(printable(message, MESSAGE_LIMIT))
