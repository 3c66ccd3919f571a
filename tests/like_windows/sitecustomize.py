"""Python as on Windows, for tests/test_platforms.py, on a Linux machine.

Python imports this module when it starts, before anything else, in every process whose
PYTHONPATH begins with this folder: the program under test and, since they inherit the
environment, the loader workers it starts. In each of them:

- `import fcntl` fails (ModuleNotFoundError), and `msvcrt` is importable: a stand-in with
  the one function the project uses, `locking`, whose lock is, as Windows' is, refused to
  another open file even in the same process and released when the process ends; unlocking
  must name the region that was locked;
- signal.SIGUSR1 does not exist (os.uname neither on Windows, but numpy calls it on Linux:
  tests/test_platforms.py looks for it in the project's code instead);
- os.open of a folder fails with PermissionError, as it does on Windows.

The loader workers start with `spawn` only where the test also sets SEGLAB_START_METHOD.
With LIKE_WINDOWS_LOG set, each process appends a line to that file: its process id, then
"spawned" for a process that multiprocessing started with spawn (a loader worker), else
"started". The test counts the processes that ran under these conditions.
"""

import errno
import fcntl as posix_fcntl  # before it is hidden: the stand-in's lock is a flock
import getpass  # noqa: F401
import os
import signal
import stat
import subprocess  # noqa: F401
import sys
import types

# subprocess and getpass take an importable msvcrt for Windows: imported above, before the
# stand-in exists, they stay the POSIX modules they are here.

sys.modules["fcntl"] = None  # `import fcntl` now raises ModuleNotFoundError
del signal.SIGUSR1

locked_regions: dict[int, tuple[int, int]] = {}  # file descriptor -> (position, bytes)


def locking(fd: int, mode: int, nbytes: int) -> None:
    """msvcrt.locking: lock (LK_NBLCK) or unlock (LK_UNLCK) `nbytes` from the position."""
    region = (os.lseek(fd, 0, os.SEEK_CUR), nbytes)
    if mode == msvcrt.LK_NBLCK:
        try:
            posix_fcntl.flock(fd, posix_fcntl.LOCK_EX | posix_fcntl.LOCK_NB)
        except BlockingIOError:
            raise PermissionError(errno.EACCES, "Permission denied") from None
        locked_regions[fd] = region
    elif mode == msvcrt.LK_UNLCK:
        if locked_regions.pop(fd, None) != region:
            raise PermissionError(errno.EACCES, "Permission denied")  # not the locked region
        posix_fcntl.flock(fd, posix_fcntl.LOCK_UN)
    else:
        raise ValueError(f"this stand-in of msvcrt.locking has no mode {mode}")


msvcrt = types.ModuleType("msvcrt")
msvcrt.LK_UNLCK, msvcrt.LK_NBLCK = 0, 2  # the values of Windows' msvcrt
msvcrt.locking = locking
sys.modules["msvcrt"] = msvcrt

posix_open = os.open


def windows_open(path, flags, mode=0o777, *, dir_fd=None):
    """os.open, refusing folders as Windows does."""
    try:
        is_folder = stat.S_ISDIR(os.stat(path, dir_fd=dir_fd).st_mode)
    except OSError:
        is_folder = False
    if is_folder:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))
    return posix_open(path, flags, mode, dir_fd=dir_fd)


os.open = windows_open

if os.environ.get("LIKE_WINDOWS_LOG"):
    with open(os.environ["LIKE_WINDOWS_LOG"], "a") as log:
        spawned = "--multiprocessing-fork" in sys.argv  # spawn's mark on its children
        log.write(f"{os.getpid()} {'spawned' if spawned else 'started'}\n")
