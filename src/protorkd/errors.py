"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UsageError(Exception):
    """Bad input: a flag, a missing file, an unknown name. The message says what to change."""


class BadDataError(UsageError):
    """Too many unreadable samples in an epoch; the message names the first offending rows."""
