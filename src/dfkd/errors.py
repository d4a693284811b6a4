"""User-facing errors.

A :class:`DfkdError` carries a one-line message that says what is wrong and what to do. The command line prints
it without a traceback and exits with status 2 (the input was wrong), or 1 for a :class:`RunFailedError` or a
:class:`DownloadError` (the input was fine and the run or the transfer failed); the Python API lets it propagate.
"""

from __future__ import annotations

import difflib
import errno
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

# How a run ended, as its summary.json's ``status`` records it (set by the collapse guard, engine/guard.py). Here, at
# the bottom, because the loader of an exported student reads it from the card too.
STATUS_OK, STATUS_COLLAPSED, STATUS_DIVERGED = "ok", "collapsed", "diverged"
FAILED_STATUSES = (STATUS_COLLAPSED, STATUS_DIVERGED)  # a run with one of these is not a result


class DfkdError(Exception):
    """Bad input or an unusable state, explained in one line."""


class ConfigError(DfkdError):
    """A recipe, override or value that does not fit the configuration schema."""


class DataError(DfkdError):
    """Dataset files that are missing or malformed."""


class DownloadError(DataError):
    """A dataset download that failed (unreachable server, corrupt or cut-short transfer): the command failed, which
    the command line reports with exit status 1 rather than the 2 of bad input."""


class CheckpointError(DfkdError):
    """A weights file that cannot be read or does not fit the model."""


class RunFailedError(DfkdError):
    """A run that started from valid input and failed; the command line exits with status 1."""


class DivergedError(RunFailedError):
    """Training produced a NaN or Inf loss and was stopped."""


def write_error(path: str | os.PathLike[str], exc: OSError, kept: str = "") -> DfkdError:
    """The one-line error for a file that could not be written (a full disk, a read-only folder): which file, why,
    what to do, and ``kept``: what the failed write left intact."""
    path = Path(path)
    if exc.errno == errno.ENOSPC:
        hint = f"free space on the disk of {path.parent}"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = f"make {path.parent} writable (or write somewhere else)"
    else:
        hint = "check the disk and the folder"
    return DfkdError(f"cannot write {path}: {exc.strerror or exc}; {hint}" + (f"; {kept}" if kept else ""))


@contextmanager
def writing_to(path: str | os.PathLike[str], kept: str = "") -> Iterator[None]:
    """Inside the block, a file system error (a full disk, a read-only folder) becomes :func:`write_error`, naming the
    file that failed (or ``path``, where the error names none)."""
    try:
        yield
    except OSError as exc:
        raise write_error(exc.filename or path, exc, kept) from None


def closest(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix naming the closest of ``choices``, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""
