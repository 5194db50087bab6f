"""The one exception type users see.

Every user-facing failure is a ``KvarnError`` whose message is a single line that names the file or
argument, says what is wrong and says how to fix it. The CLI prints ``error: <message>`` and exits 2.
"""


class KvarnError(Exception):
    """A user-facing error with a one-line message (file/argument, what is wrong, the fix)."""

    def __init__(self, message: str):
        if "\n" in message:
            message = " ".join(message.split())
        super().__init__(message)
