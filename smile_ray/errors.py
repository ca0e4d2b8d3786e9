"""The one user-facing exception type.

Anything a user can fix (a config key, a value, a file) raises :class:`SmileError` with a
message that names the key, value or file at fault. The CLI prints it as one line on
stderr and exits non-zero; any other exception is a bug and keeps its traceback.
"""


class SmileError(Exception):
    """A problem with the user's input: config, files, names, values."""
