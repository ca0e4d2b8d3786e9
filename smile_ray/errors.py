"""The one user-facing exception type.

Anything a user can fix (a config key, a value, a file) raises :class:`SmileError` with a
message that names the key, value or file at fault. The CLI prints it as one line on
stderr and exits non-zero; any other exception is a bug and keeps its traceback.
"""


class SmileError(Exception):
    """A problem with the user's input: config, files, names, values."""


def one_line(e: BaseException) -> str:
    """An exception as ``Type: message`` on one line (whitespace collapsed), for a
    :class:`SmileError` that names what a library raised (a gzip, PIL or OS error)."""
    text = " ".join(str(e).split())
    return f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__
