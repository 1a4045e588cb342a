"""Errors that mean "the user got something wrong" (as opposed to a bug or an outage)."""


class UserError(Exception):
    """A user mistake, told in one line: the CLI prints "batchinfer: error: <msg>" and exits 2."""
