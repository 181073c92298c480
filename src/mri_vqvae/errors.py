"""The errors a user can cause and fix: the command line prints them in one line (exit 2).
Every other exception is a bug and keeps its traceback."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Bad input, a bad setting or a refused output: the message names the file or option
    and the problem, and says what to do instead. Anything else raised is a bug."""


class ConfigError(UserError, ValueError):
    """A configuration value, option or key is invalid; the message names the setting."""


class InputError(UserError, ValueError):
    """A file or folder given as input is not what the command needs; the message names it."""


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages: a value from a hostile file
    or option can be megabytes long, and the message only needs to say which one it was."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
