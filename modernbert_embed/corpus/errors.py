"""The corpus command's errors: each message is for the user, each class has its exit status."""

from __future__ import annotations


class CorpusError(Exception):
    """A problem with the input, the options or the output folder; the message is for the user."""

    exit_code = 1


class RefusedError(CorpusError):
    """The command cannot run as asked (options, missing inputs, an output folder of another job):
    refused before anything is written."""

    exit_code = 2


class RowError(CorpusError):
    """One input row that cannot be embedded; `where` names the file and line (or row)."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason
