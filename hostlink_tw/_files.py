"""
Reading the small files an operator configures (state file, key, CA bundle).

One discipline for all of them: open with ``O_NONBLOCK`` (a FIFO left at the
path would otherwise block the open until a writer comes, hanging the agent
or the control plane's reactor), then check the *open descriptor* with
``fstat`` — a regular file, of bounded size, and whatever else the caller
checks — so the checks apply to the very file that is read, not to a path
that could be swapped in between.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

__all__ = ["FileTooLargeError", "NotRegularFileError", "describe_os_error", "read_regular_file"]


class NotRegularFileError(OSError):
    """The path is a FIFO, socket or device: never something we should read."""


class FileTooLargeError(OSError):
    """The file is larger than the caller's bound."""


def _open_readonly(path: str) -> int:
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
    # writer; it has no effect on regular files.  Tests replace this function
    # to simulate EACCES, which root (as tests often run) never gets.
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)


def read_regular_file(
    path: str,
    max_bytes: int,
    check: Callable[[str, os.stat_result], None] | None = None,
) -> bytes:
    """
    The whole content of the regular file at ``path``, at most ``max_bytes``.

    :param check: called with the path and the open descriptor's ``stat``
        before anything is read (permission rules); what it raises escapes.
    :raises OSError: ``FileNotFoundError``, ``PermissionError``,
        ``IsADirectoryError``, :class:`NotRegularFileError` (FIFO, socket,
        device), :class:`FileTooLargeError`, ...
    """
    fd = _open_readonly(path)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file", path)
        if check is not None:
            check(path, st)
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            raise FileTooLargeError(errno.EFBIG, f"larger than {max_bytes} bytes", path)
        return b"".join(chunks)
    finally:
        os.close(fd)


def describe_os_error(error: OSError) -> str:
    """How *error* reads in a message about a file: ``permission denied``,
    ``it is a directory``, or the system's text."""
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, IsADirectoryError):
        return "it is a directory"
    return error.strerror or str(error)


def private_file_problem(path: str, what: str) -> str | None:
    """Create ``path`` mode 0600, or check the existing one is a private regular file.

    Returns ``None`` when the file is fine, else one line naming ``what`` and
    the path.  An existing file that group or others can access is refused,
    never repaired: the operator decides (as for the key files).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    except OSError as e:
        return f"{what} {path} cannot be created: {e.strerror}"
    else:
        os.close(fd)
        return None
    try:
        st = os.stat(path)
    except OSError as e:
        return f"{what} {path} cannot be read: {e.strerror}"
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode):
        return f"{what} {path} is not a regular file"
    if mode & 0o077:
        return (
            f"{what} {path} is accessible by group or others (mode {mode:04o}); "
            f"it must be readable by its owner only (chmod 600)"
        )
    return None
