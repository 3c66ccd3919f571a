"""What the operating systems differ in, for the files the project writes: locks that the
system releases with their process, and flushing a folder's entries to disk.

A run folder (and a cache being written) is locked so that two processes never write it at
once. The lock is one the operating system releases when its process ends in any way
(kill -9, a crash, a laptop that shuts down), so it is never left stale; a lock *file* whose
mere existence meant "in use" would need removing by hand after a crash. POSIX has flock
(fcntl); Windows has no fcntl but locks byte ranges of a file (msvcrt.locking), which it
also releases when the process ends. Both come with Python: no dependency.
Nothing here imports the lab's files.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:  # every system but Windows
    msvcrt = None

# msvcrt.locking locks bytes against reading too: it locks this one byte, far past what the
# file holds (a lock holder's line), so that another process can still read that line.
WINDOWS_LOCK_OFFSET = 1 << 20


def try_lock(file) -> bool | None:
    """Lock the open `file` for this process without waiting: True when it is locked, False
    when another process holds it, None on a system with neither flock nor msvcrt."""
    try:
        if fcntl is not None:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        elif msvcrt is not None:
            os.lseek(file.fileno(), WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            return None
    except OSError:
        return False
    return True


def unlock(file) -> None:
    """Release the lock of `try_lock` before closing `file`. Closing releases a flock at once;
    Windows releases a closed file's byte locks only when it gets to it, and asks programs
    to unlock first."""
    if fcntl is None and msvcrt is not None:
        os.lseek(file.fileno(), WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(file.fileno(), msvcrt.LK_UNLCK, 1)


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk where the system allows it. POSIX
    opens a folder to fsync it; Windows refuses to open a folder with os.open, and some file
    systems refuse the fsync: there the rename is still atomic (the old file or the new
    one, whole), it only may not survive a power cut that follows it at once."""
    try:
        directory = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(directory)
    finally:
        os.close(directory)
