"""The project's one error type for bad input (kept apart so that any module, ``config`` and ``keys`` included,
can raise it without importing the other)."""


class ConfigError(ValueError):
    """A bad input: its message is one line naming the field and the fix (the CLIs print it and exit 2)."""
