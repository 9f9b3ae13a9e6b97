"""Every file the project writes goes through here: whole or not at all.

The bytes go to a temporary file in the destination's own folder (so the final rename never crosses a file system
and is atomic on POSIX and Windows) and are renamed onto the real name only once they are all written and flushed.
Any exception on the way, Ctrl-C included, removes the temporary file; while it is being removed, Ctrl-C and
SIGTERM are held back on POSIX (delivered right after), so a second press during the cleanup cannot leave it
behind either. The command line also ignores every press after the first (sdxl_core/app/cli.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# Prefix of the temporary files, hidden on POSIX, and recognisable as ours if a power cut leaves one behind.
TEMPORARY_PREFIX = ".sdxl_core-"
_HELD_SIGNALS = {signal.SIGINT, getattr(signal, "SIGTERM", signal.SIGINT)}


@contextlib.contextmanager
def atomic_write(path: Path | str) -> Iterator[BinaryIO]:
    """Yield a binary file to write `path`'s whole content into; on a clean exit it becomes `path` (replacing an
    older file), on any exception it is removed and the exception goes on."""
    path = Path(path)
    handle_fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMPORARY_PREFIX}{path.name}.",
                                            suffix=".partial")
    try:
        with os.fdopen(handle_fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())  # the data is on disk before the name points at it (no empty file on power loss)
        os.replace(temporary, path)
    except BaseException:
        with _signals_held():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        raise


def check_writable(path: Path | str) -> None:
    """Raise a ValueError, in a sentence, unless a file can be created at `path`: its folder exists and takes new
    files. A probe file is created and removed, because permission bits alone do not tell (root ignores them, and a
    read-only mount does not show in them)."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise ValueError(f"{path} is a folder; name a file inside it, e.g. {path / 'image.png'}")
    if not folder.exists():
        raise ValueError(f"the folder {folder} does not exist; create it first or choose another place")
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder, so {path.name} cannot be written inside it")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=TEMPORARY_PREFIX):
            pass
    except OSError as error:
        raise ValueError(f"cannot write into {folder} ({describe_os_error(error)}); choose a folder you can "
                         "write to") from None


def describe_os_error(error: OSError) -> str:
    """An OSError as a short reason (the strerror, without the Python class name and errno number)."""
    reasons = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
    if getattr(error, "errno", None) in reasons:
        return reasons[error.errno]
    return error.strerror or str(error)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold back Ctrl-C and SIGTERM for the duration (delivered afterwards), where the platform allows it."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
