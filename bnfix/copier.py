"""Write a copy of a file with a few byte ranges replaced, without the bulk passing through Python.

bnfix rewrites a few kilobytes of a caffemodel that can be 2 GB.  The untouched ranges are
copied file to file by the kernel (``os.copy_file_range``; else ``os.sendfile``; else
``pread``/``write`` chunks, each fallback tested) into blocks reserved beforehand when the
file is large, and the rebuilt layer entries are written over or after them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from .errors import InputChanged

CHUNK = 64 << 20  # copy granularity: progress updates and signal checks between chunks
_FALLBACK = 1 << 22
PREALLOCATE_MIN = 64 << 20  # below this, loading ctypes costs more than preallocation saves


class Replacement(NamedTuple):
    """Input bytes ``[start, end)`` become ``data`` in the output."""

    start: int
    end: int
    data: bytes


def output_size(size: int, replacements: Sequence[Replacement]) -> int:
    return size + sum(len(r.data) - (r.end - r.start) for r in replacements)


def write(src: int, size: int, replacements: Sequence[Replacement], dst: int,
          progress: Callable[[int], None] | None = None) -> None:
    """Write the ``size`` bytes of fd ``src`` to fd ``dst`` (at its current position, which
    must be 0) with ``replacements`` (non-overlapping) applied.

    Replacements that keep their length do not split the copy: the bytes around them go in
    one kernel copy, which is then overwritten in place (``pwrite``).  Only a replacement that
    changes the length starts a new copy, at a shifted output offset, which the kernel copies
    much more slowly when it is not page-aligned with the input (see bench/).
    """
    reps = sorted(replacements)
    preallocate(dst, output_size(size, reps))
    pos = done = 0
    for r in reps:
        if r.start < pos or r.end > size:
            raise AssertionError(f"internal error: replacement {r.start}..{r.end} out of order")
        if len(r.data) != r.end - r.start:
            done = _copy(src, dst, pos, r.start - pos, done, progress)
            _write_all(dst, r.data)
            pos = r.end
    _copy(src, dst, pos, size - pos, done, progress)
    shift = 0
    for r in reps:
        if len(r.data) == r.end - r.start:
            _pwrite_all(dst, r.data, r.start + shift)
        else:
            shift += len(r.data) - (r.end - r.start)


def preallocate(fd: int, size: int) -> None:
    """Reserve the blocks of a large output before copying into them.

    Measured in bench/ (copy anatomy): a kernel copy into preallocated blocks takes 0.75-0.83x
    the time of the same copy into an empty file, and a full disk is refused before a byte is
    copied.  Only Linux's fallocate(2) is used: glibc's ``posix_fallocate`` (``os.``) falls back
    to writing into every block on file systems without it, which would cost more than it saves.
    """
    if size < PREALLOCATE_MIN or not sys.platform.startswith("linux"):
        return
    fallocate = _fallocate()
    if fallocate is None or fallocate(fd, 0, 0, size) == 0:
        return
    import ctypes

    err = ctypes.get_errno()
    if err not in _FALL_BACK_ERRNOS:
        raise OSError(err, os.strerror(err))


def _fallocate() -> Callable[[int, int, int, int], int] | None:
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    function.restype = ctypes.c_int
    return function


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _copy(src: int, dst: int, offset: int, count: int, done: int,
          progress: Callable[[int], None] | None) -> int:
    while count > 0:
        n = copy_range(src, dst, offset, min(count, CHUNK))
        offset, count, done = offset + n, count - n, done + n
        if progress is not None:
            progress(done)
    return done


def copy_range(src: int, dst: int, offset: int, count: int) -> int:
    """Copy up to ``count`` bytes at ``offset`` of ``src`` to ``dst``'s position; return how many.

    copy_file_range first (in-kernel, no page copies through Python), then sendfile, then a
    plain read/write; the first two may be missing or refuse (EXDEV, EINVAL on some file
    systems, ENOSYS in containers), which only means falling back.
    """
    try:
        n: int = os.copy_file_range(src, dst, count, offset)
        if n > 0:
            return n
    except (AttributeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in _FALL_BACK_ERRNOS:
            raise
    try:
        n = os.sendfile(dst, src, offset, count)
        if n > 0:
            return n
    except (AttributeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in _FALL_BACK_ERRNOS:
            raise
    chunk = os.pread(src, min(count, _FALLBACK), offset)
    if not chunk:
        raise InputChanged(f"the input ended {count} bytes early while copying")
    _write_all(dst, chunk)
    return len(chunk)


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until everything is written (it may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _errnos() -> frozenset[int]:
    import errno

    names = ("EXDEV", "EINVAL", "ENOSYS", "EOPNOTSUPP", "ENOTSUP", "EBADF", "ETXTBSY", "EPERM")
    return frozenset(getattr(errno, n) for n in names if hasattr(errno, n))


# Errors that say "this call cannot do it here", as opposed to a real I/O failure (ENOSPC, EIO),
# which must reach the caller.  EPERM: copy_file_range refuses some special files.
_FALL_BACK_ERRNOS = _errnos()
