"""The one base class of errors that are the user's to fix.

A `UserError` says what is wrong and where (file, line, field, item) in one line; the CLI prints
it without a traceback. Anything else is a bug in raftlm or a library and keeps its traceback
(`RAFTLM_TRACEBACK=1` shows one for user errors too).
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a config field, a file, a data row, a reward's answer, a busy run directory."""


class InvalidInput(UserError, ValueError):
    """A value the user gave (a flag, a file, a model to export) that raftlm cannot use."""
