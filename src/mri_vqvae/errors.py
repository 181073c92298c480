"""The errors a user can cause and fix: the command line prints them in one line (exit 2).
Every other exception is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input, a bad setting or a refused output: the message names the file or option
    and the problem, and says what to do instead. Anything else raised is a bug."""


class ConfigError(UserError, ValueError):
    """A configuration value, option or key is invalid; the message names the setting."""


class InputError(UserError, ValueError):
    """A file or folder given as input is not what the command needs; the message names it."""
