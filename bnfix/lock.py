"""Advisory locks that keep two bnfix processes off the same files.

Why: two runs writing one output pair can each commit their own pair correctly and still end
with the prototxt of one and the caffemodel of the other; a run reading a pair while another
replaces it in place can correct it twice.  So a writer holds an exclusive lock on every file
it writes and a shared lock on every file it only reads; :func:`acquire` takes them all.

How:

- A lock is ``fcntl.flock`` on a lock file beside the path, ``.NAME.bnfix-lock`` (a long NAME is
  shortened like bnfix's temp names, so it fits in NAME_MAX), beside the file a symlink points
  to, so that every name of one file shares one lock.
- All locks of a call are taken in one global order (sorted lock-file paths), so two processes
  never wait for each other in a circle.  A path in both lists is locked exclusively.
- Busy: poll with short, growing sleeps for up to ``wait`` seconds, then raise :class:`Busy`,
  one line naming the other writer's files: an exclusive holder writes its pid and ``owner``
  text into the lock file; a reader writes nothing ("another bnfix is reading it").
- Lock files do not accumulate: an exclusive holder unlinks its lock file before unlocking; a
  shared holder does so if a non-blocking upgrade to exclusive succeeds (it was the last).
  A waiter may thus lock a file that is no longer at its path, so after locking it checks
  (``fstat`` against ``stat``) and starts again if so.
- A shared lock where the lock file cannot be created (read-only model store: EACCES, EROFS;
  or a missing directory, reported by the read itself) is skipped, so reading still works; an
  exclusive one raises :class:`LockFailed`.

The locks are advisory: they order bnfix runs, not other programs.  They need ``fcntl``
(POSIX); without it (Windows) :func:`acquire` locks nothing.  Every system call goes
through this module's ``os`` and ``fcntl`` attributes, so a test can inject faults.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .commit import NAME_MAX, HoldSignals, fit_name
from .errors import BnfixError

try:
    import fcntl
except ImportError:  # Windows: no flock; see acquire()
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from collections.abc import Iterable
    from types import TracebackType

__all__ = ["SUFFIX", "Busy", "Held", "Lock", "LockFailed", "acquire", "lock_file"]

SUFFIX = ".bnfix-lock"
_ROOM = NAME_MAX - len(".") - len(SUFFIX)
_SKIP_SHARED = frozenset({errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOENT})
_FIRST_SLEEP, _MAX_SLEEP = 0.001, 0.05


class Busy(BnfixError):
    """Another bnfix holds a lock that this one needs; ``pid`` and ``owner`` describe the other
    writer where known (``pid`` is None for readers)."""

    def __init__(self, message: str, *, path: Path, pid: int | None, owner: str):
        super().__init__(message)
        self.path, self.pid, self.owner = path, pid, owner


class LockFailed(BnfixError):
    """The lock file for a path being written cannot be created or opened."""


class Lock(NamedTuple):
    """One lock held: the user's path, its lock file, the open descriptor and the kind."""

    path: Path
    file: Path
    fd: int
    exclusive: bool


class Held:
    """The locks taken by :func:`acquire`; released by ``release()`` or leaving ``with``."""

    def __init__(self, locks: Iterable[Lock]):
        self.locks = tuple(locks)

    def __enter__(self) -> Held:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def release(self) -> None:
        locks, self.locks = self.locks, ()
        _release_all(locks)


def lock_file(path: str | os.PathLike[str]) -> Path:
    """The lock file for ``path``: ``.NAME.bnfix-lock`` beside the file it names."""
    real = Path(os.path.realpath(path))
    return real.with_name(f".{fit_name(real.name, _ROOM)}{SUFFIX}")


def acquire(exclusive: Iterable[str | os.PathLike[str]] = (),
            shared: Iterable[str | os.PathLike[str]] = (), *, wait: float = 0.0,
            owner: str = "") -> Held:
    """Lock ``exclusive`` paths for writing and ``shared`` ones for reading, all or none.

    ``owner`` says what this process does, for another one's :class:`Busy` message, e.g.
    ``"writing out/m.prototxt and out/m.caffemodel"``.  Waits up to ``wait`` seconds in all.
    Use as ``with lock.acquire(...):``.  Where there is no ``fcntl`` (Windows) nothing is
    locked: the returned ``Held`` is empty.
    """
    if fcntl is None:
        return Held(())
    wanted: dict[Path, tuple[Path, bool]] = {}
    for p in shared:
        wanted.setdefault(lock_file(p), (Path(p), False))
    for p in exclusive:
        wanted[lock_file(p)] = (Path(p), True)
    deadline = time.monotonic() + wait
    held: list[Lock] = []
    try:
        for file in sorted(wanted, key=os.fsencode):
            path, ex = wanted[file]
            if _take(path, file, ex, deadline, wait, held) and ex:
                _write_owner(held[-1].fd, owner)
    except BaseException:
        _release_all(held)
        raise
    return Held(held)


def _take(path: Path, file: Path, exclusive: bool, deadline: float, wait: float, held: list[Lock]) -> bool:
    """One lock, polling until ``deadline``, appended to ``held``; False for a shared lock that
    cannot be had here."""
    try:
        return _poll(path, file, exclusive, deadline, wait, held)
    except OSError as exc:
        kind = "writing" if exclusive else "reading"
        raise LockFailed(f"{path}: cannot lock it for {kind}: {exc.strerror or exc} "
                         f"(lock file {file})") from exc


def _poll(path: Path, file: Path, exclusive: bool, deadline: float, wait: float, held: list[Lock]) -> bool:
    """Each try runs with signals held off: a Ctrl-C between creating or locking the lock file
    and recording it in ``held`` would leave the file behind (acquire's cleanup releases only
    what ``held`` lists).  The sleeps between tries are not held: a signal ends the wait."""
    delay, before = _FIRST_SLEEP, len(held)
    fd: int | None = None
    try:
        while True:
            signals = HoldSignals()
            try:
                with signals:
                    owned, fd = fd, None  # _try closes it if it raises
                    fd = _try(path, file, exclusive, owned, held)
            finally:
                signals.replay()  # a signal that came wins over an OSError
            if fd is None:
                return len(held) > before
            left = deadline - time.monotonic()
            if left <= 0:
                raise _busy(path, fd, exclusive, wait)
            time.sleep(min(delay, left))
            delay = min(delay * 2, _MAX_SLEEP)
    except BaseException:
        if fd is not None:
            _close_quietly(fd)
        raise


def _try(path: Path, file: Path, exclusive: bool, fd: int | None, held: list[Lock]) -> int | None:
    """Open the lock file (unless ``fd`` is open on it already) and lock it without waiting,
    appending the lock to ``held``.  Returns the open descriptor if the lock is busy, None if
    done (locked, or a shared lock that cannot be had here)."""
    try:
        while True:
            if fd is None:
                fd = _open(path, file, exclusive)
                if fd is None:
                    return None
            if not _flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH):
                return fd
            if _still_there(fd, file):
                held.append(Lock(path, file, fd, exclusive))
                return None
            stale, fd = fd, None  # its holder removed it after we opened it: use the new one
            _close_quietly(stale)
    except BaseException:
        if fd is not None:
            _close_quietly(fd)
        raise


def _open(path: Path, file: Path, exclusive: bool) -> int | None:
    cloexec = getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(file, (os.O_RDWR if exclusive else os.O_RDONLY) | os.O_CREAT | cloexec, 0o666)
    except OSError as exc:
        if exclusive and exc.errno == errno.EACCES:
            try:  # another user's lock file: flock works on a read-only descriptor too
                return os.open(file, os.O_RDONLY | cloexec)
            except OSError:
                pass
        if not exclusive and exc.errno in _SKIP_SHARED:
            return None
        raise


def _flock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _still_there(fd: int, file: Path) -> bool:
    """Whether the locked inode is still the file at ``file`` (the unlink race)."""
    mine = os.fstat(fd)
    try:
        now = os.stat(file)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def _write_owner(fd: int, owner: str) -> None:
    """``<pid> <owner>`` into the lock file, for another bnfix's Busy message.  A failure only
    makes that message vaguer, so it is ignored."""
    text = f"{os.getpid()} {' '.join(owner.split())}".rstrip() + "\n"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode("utf-8", "replace"), 0)
    except OSError:
        pass


def _busy(path: Path, fd: int, exclusive: bool, wait: float) -> Busy:
    pid, what = _holder(fd, exclusive)
    waited = f" (waited {wait:g} s)" if wait > 0 else ""
    who = "another bnfix" if pid is None else f"another bnfix (pid {pid})"
    return Busy(f"{path}: busy: {who} is {what}{waited}", path=path, pid=pid, owner=what)


def _holder(fd: int, exclusive: bool) -> tuple[int | None, str]:
    """Who holds the lock: readers only (a shared lock would be granted), or a writer that
    wrote ``<pid> <owner>`` (maybe not yet: it writes after locking)."""
    try:
        if exclusive and _flock(fd, fcntl.LOCK_SH):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None, "reading it"
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    pid, _, what = text.partition(" ")
    if not pid.isdigit():
        return None, "writing it"
    return int(pid), what or "writing it"


def _release_all(locks: Iterable[Lock]) -> None:
    """Release in reverse order, with signals held off: a signal in the middle would leave a
    lock file behind (harmless, but it should not happen on a plain Ctrl-C)."""
    held = HoldSignals()
    with held:
        for lock in reversed(list(locks)):
            _release(lock)
    held.replay()


def _release(lock: Lock) -> None:
    """Unlock, removing the lock file if nobody else holds it: an exclusive holder always may;
    a shared one only if it can upgrade (it was the last reader)."""
    try:
        if lock.exclusive or _flock(lock.fd, fcntl.LOCK_EX):
            os.unlink(lock.file)
    except OSError:
        pass  # a lock file left behind is harmless: the next run locks and removes it
    finally:
        _close_quietly(lock.fd)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
