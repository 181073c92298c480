"""The errors a user can cause and fix: the command line prints them in one line (exit 2)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input, a bad setting or a refused output: the message names the file or option
    and the problem, and says what to do instead. Anything else raised is a bug."""
