"""The errors a user can cause, and the exit code each one ends `prodclip` with.

Every error a person can fix (a bad config, catalog, checkpoint, store, query or
request) is a `ProdclipError`, and so are the two training faults of faults.py
(NonFiniteError, Preempted), each with its own exit code. The command line catches
exactly this class at the top, prints `prodclip: <kind>: <message>` as one line on
stderr and exits with `exit_code`; anything else is a bug and keeps its traceback.

Exit codes (docs/errors.md and `prodclip --help`):

    0   success
    2   bad input: config, data/catalog, checkpoint, store, query (fix it and rerun)
    3   a training step produced NaN/Inf (faults.EXIT_NONFINITE)
    75  preempted; state saved; rerun the same command to resume (faults.EXIT_PREEMPTED)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USER_ERROR = 2


class ProdclipError(Exception):
    """Base of every user-fixable error. The message is one line: what was wrong, and what to do."""

    kind = "error"
    exit_code = EXIT_USER_ERROR


class ConfigError(ProdclipError, ValueError):
    """A config file, override or value is invalid; the message says which and why."""

    kind = "config error"


class DataError(ProdclipError, ValueError):
    """A catalog or dataset cannot be read: missing path, missing column, no usable rows."""

    kind = "data error"


class CheckpointError(ProdclipError, ValueError):
    """A checkpoint, export or imported weight file is missing, damaged or does not fit the model."""

    kind = "checkpoint error"


class StoreError(ProdclipError, ValueError):
    """An embedding store or index is missing, damaged, or was made by another model."""

    kind = "store error"


class QueryError(ProdclipError, ValueError):
    """A search query or request is unusable (empty, k out of range, not an image)."""

    kind = "query error"
