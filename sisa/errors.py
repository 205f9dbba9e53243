"""Errors a user can cause. The CLI prints their message on one line and exits with `exit_code`."""


class SisaError(Exception):
    """Something about the input or the run's state is wrong (exit code 1)."""

    exit_code = 1


class UsageError(SisaError):
    """The command was called wrongly: a bad option value, a path that does not exist (exit code 2)."""

    exit_code = 2


class ConflictError(SisaError):
    """The input names something the run already has (new samples with ids already in it)."""


class IntegrityError(SisaError):
    """A file on disk does not match what the index recorded for it."""
