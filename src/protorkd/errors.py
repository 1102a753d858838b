"""Errors the CLI prints as one line: what a user can fix (exit code 2), and a run that diverged (exit code 1)."""


class UsageError(Exception):
    """Bad input: a flag, a missing file, an unknown name. The message says what to change."""


class BadDataError(UsageError):
    """Too many unreadable samples in an epoch; the message names the first offending rows."""


class TrainingDiverged(Exception):
    """A run stopped because its loss or gradients stopped being numbers; the message names the term, the step
    and the checkpoint to resume from (`train.guard`)."""


class WriteFailed(Exception):
    """A file could not be written: the disk is full, a quota or a file-size limit (`ulimit -f`) was reached.
    The message names the file; what was there before is intact (`protorkd.io` writes atomically)."""
