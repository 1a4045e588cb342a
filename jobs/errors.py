"""Errors a command reports in one line, as opposed to a bug (a traceback)."""


class UserError(Exception):
    """A user mistake, told in one line: the CLI prints "batchinfer: error: <msg>" and exits 2."""


class ServiceUnavailable(Exception):
    """The broker or the store could not be reached: one line, exit code 4. Running the
    same command again once the service is back is safe."""
