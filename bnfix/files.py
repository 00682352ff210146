"""Open an input only if it is a regular file, and say in one line what it is otherwise.

A plain ``open()`` blocks forever on a FIFO with no writer, and ``read()`` never ends on
``/dev/zero``; a directory fails late with a confusing message.  So an input is opened with
``O_NONBLOCK`` (which makes opening a FIFO return at once and has no effect on a regular file),
checked with ``fstat`` on the open descriptor (no race with a rename between a check and the
open), and refused unless ``S_ISREG``.  Every error is an :class:`InputError` naming the file.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import InputError

__all__ = ["open_regular", "read_regular"]

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation


def _kind(mode: int) -> str:
    """What a non-regular file is, as a user would call it."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _not_regular(path: str | Path, mode: int) -> InputError:
    kind = _kind(mode)
    return InputError(f"{path}: is {kind}, not a regular file" if kind.startswith("a ") else f"{path}: {kind}")


def _open_error(path: str | Path, exc: OSError) -> InputError:
    if exc.errno == errno.ENOENT:
        return InputError(f"{path}: no such file")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return InputError(f"{path}: permission denied")
    if exc.errno == errno.EISDIR:
        return InputError(f"{path}: is a directory, not a regular file")
    if exc.errno == errno.ENXIO:  # a socket (or a device without its driver) cannot be opened
        try:
            return _not_regular(path, os.stat(path).st_mode)
        except OSError:
            pass
    return InputError(f"{path}: cannot open: {exc.strerror or exc}")


def open_regular(path: str | Path) -> int:
    """Open ``path`` for reading and return the descriptor, or raise :class:`InputError` at
    once if it is missing, unreadable or anything but a regular file (symlinks are followed)."""
    try:
        fd = os.open(path, _FLAGS | _BINARY)
    except OSError as exc:
        raise _open_error(path, exc) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # ordinary reads from here on
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | Path) -> bytes:
    """The whole content of a regular file (see :func:`open_regular` for what is refused)."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        chunks = []
        while True:  # read to the end, whatever the size said: the file may grow meanwhile
            chunk = os.read(fd, max(size + 1, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            size = 0
        return b"".join(chunks)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
