"""Commit several output files as one unit: after a failure bnfix sees, all are old or all new.

Why: a prototxt and its caffemodel only make sense together.  Two independent renames can leave
the patched prototxt beside the old caffemodel, a pair that looks done and is not.  So
:func:`commit` works in steps, and only the last one changes what the final paths hold:

1. *check*: resolve each final path (``in_place`` follows a symlink, so the file it points to
   is replaced and the link is kept); a directory there is refused.
2. *write*: each output goes into a temp file beside its final path (same directory, so the
   rename is atomic), gets its metadata (mode of ``like``; owner and group too if
   ``in_place``) and is fsynced.
3. *back up* (``backup=True``): ``<file>.orig`` is hard-linked to each existing target unless
   one exists already (the oldest original is the one worth keeping).  A link costs nothing for
   a 2 GB model and ``os.link`` fails instead of overwriting; a copy is the fallback.
4. *keep the old*: a hidden hard link to every file about to be replaced, for the rollback
   (where this run made a backup, that backup serves).
5. *switch*, with SIGINT/SIGTERM/SIGHUP held off: rename the temps over the targets **in the
   order given**, fsync the directories; if a step fails, rename the kept old files back
   (an output that did not exist before is unlinked).  Then the old links go.

A failure in steps 1-4 changes nothing and removes every temp file.  A failure in step 5 is
undone, so the exception says ``rolled back``; only if the undo fails too is the state
``mixed``, and the message says which file is new, which is old and where the old one is.  The
caller picks the order for what no program can undo, a SIGKILL or power cut between two renames:
bnfix passes the prototxt first, so what can be left is "patched prototxt + old caffemodel",
which the next run must recognise (the marker's digest of the statistics does not match).

Temp files are named ``.NAME.<12 hex>.bnfix-tmp`` (rollback links ``...bnfix-old``), always
within NAME_MAX: a long NAME is shortened and given a hash.  :func:`sweep` removes those a killed
bnfix left; call it only while holding the target's lock (:mod:`bnfix.lock`), or it may remove
another run's work in progress.

Every system call goes through this module's ``os`` attribute, so a test can put a
fault-injecting stand-in there.  Imports are kept to what a plain run loads anyway.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, final

from .errors import BnfixError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import FrameType, TracebackType

__all__ = ["NAME_MAX", "OLD", "SIGNALS", "TMP", "BackupFailed", "CommitError", "Committed",
           "HoldSignals", "Interrupted", "Output", "OutputIsDirectory", "ReplaceFailed", "State", "SweepFailed",
           "Terminated", "WriteFailed", "commit", "fit_name", "install_signal_handlers",
           "interrupt_in", "make_dirs", "raise_swallowed", "remove_dirs", "settle", "sweep", "temp_name",
           "write_fd"]

TMP, OLD = ".bnfix-tmp", ".bnfix-old"
NAME_MAX = 255
_HEX = 12  # random hex digits in a temp name
_ROOM = NAME_MAX - len(".") - len(".") - _HEX - len(TMP)  # bytes left for the target's name
# errno values of link() meaning "no hard link possible here" (file system, immutable file,
# fs.protected_hardlinks): copy instead.
_NO_LINK = frozenset({errno.EPERM, errno.EMLINK, errno.EXDEV, errno.ENOSYS, errno.ENOTSUP,
                      errno.EOPNOTSUPP})
# errno values of copy_file_range meaning "not between these files": copy through memory.
_NO_FAST_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.ENOTSUP,
                           errno.EOPNOTSUPP, errno.EBADF})
# errno values of fsync on a directory meaning "not supported here", not "failed".
_NO_DIR_SYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})
_CHUNK = 1 << 26
SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


# -- the interface ---------------------------------------------------------------------------


class Output(NamedTuple):
    """One file to commit.  A ``fill(fd)`` writes the whole file into ``fd`` (positioned at 0;
    ``pwrite``/``copy_file_range`` at explicit offsets are fine) and must not close it; an
    OSError it raises is reported as the output's write failure."""

    path: Path  # the final path
    content: bytes | Callable[[int], None]  # the whole file, or fill(fd) writing it from offset 0
    like: Path | None = None  # take the permission bits from this file (the input)
    in_place: bool = False  # replacing ``like`` itself: keep owner and group, follow a symlink


class Committed(NamedTuple):
    """What a successful :func:`commit` did."""

    outputs: tuple[Path, ...]  # where the files now are (symlink targets for in-place)
    backups: tuple[Path, ...]  # ``.orig`` files this run created
    warnings: tuple[str, ...]  # e.g. the owner could not be kept (not root)


class State(str, Enum):
    """What the final paths hold after a failed or interrupted commit."""

    UNCHANGED = "unchanged"  # nothing was replaced
    ROLLED_BACK = "rolled back"  # files were replaced and put back: all are as before
    MIXED = "mixed"  # some files are new, some old; the message says which
    COMMITTED = "committed"  # all files are new


class CommitError(BnfixError):
    """A commit failed; ``state`` says what is on disk, ``path`` is the user's file concerned,
    ``error`` the OSError behind it.  The message is one line for the user."""

    def __init__(self, message: str, *, path: Path, state: State, error: OSError | None = None):
        super().__init__(message)
        self.path, self.state, self.error = path, state, error


class OutputIsDirectory(CommitError):
    """A final path is a directory; refused before anything was written."""


class WriteFailed(CommitError):
    """A temp file could not be created, written, given its metadata or synced."""


class BackupFailed(CommitError):
    """A ``.orig`` backup could not be created."""


class ReplaceFailed(CommitError):
    """Replacing the files failed: a rename, the directory sync, or the rollback preparation."""


class SweepFailed(BnfixError):
    """A leftover temp file of an earlier run could not be removed."""


class Terminated(KeyboardInterrupt):
    """Raised by :func:`install_signal_handlers`' handler: SIGTERM and SIGHUP (and SIGINT) end
    the program like Ctrl-C does, through cleanup code, instead of killing it on the spot."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Interrupted(KeyboardInterrupt):
    """A commit ended by a signal.  ``state`` is UNCHANGED (it came while writing; the temps are
    gone) or COMMITTED (it was held off during the renames and delivered after them; then
    ``committed`` is the result), or a failure's state.  Exit with ``exit_code``."""

    def __init__(self, message: str, *, signum: int, state: State, paths: tuple[Path, ...],
                 committed: Committed | None = None):
        super().__init__(message)
        self.message, self.signum, self.state = message, signum, state
        self.paths, self.committed = paths, committed

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return self.message


def install_signal_handlers(*, once: bool = False) -> None:
    """Make SIGINT, SIGTERM and SIGHUP raise :class:`Terminated` (a KeyboardInterrupt).

    Call it first thing in the CLI: then every signal runs the cleanup in ``finally`` blocks
    and :func:`commit` can report what is on disk.  A signal already ignored (``nohup``) stays
    ignored.  A signal that Python swallows is kept for :func:`raise_swallowed`.  ``once``
    (the bnfix process): the first signal raised is the last; it :func:`settle` s, so a second
    Ctrl-C cannot break the cleanup, or the message, of the first.
    """
    global _previous_hook, _once, _settled
    _once, _settled = once, False
    for signum in SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _raise_terminated)
    if sys.unraisablehook is not _keep_swallowed:
        _previous_hook, sys.unraisablehook = sys.unraisablehook, _keep_swallowed


_once = _settled = False


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    if _settled:
        return
    if _once:
        settle()
    raise Terminated(signum)


def settle() -> None:
    """Ignore SIGINT, SIGTERM and SIGHUP from now on.  The bnfix process calls this once its
    verdict is final: a signal after it would raise outside every handler (a traceback), or,
    once Python resets its handlers while it shuts down, kill the process, and the exit status
    would contradict the files and the lines already printed."""
    global _settled
    _settled = True  # first: a signal from here on is ignored by _raise_terminated
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


_previous_hook = sys.unraisablehook  # for every other exception Python cannot raise
_swallowed: list[int] = []  # the signals it swallowed, not raised yet


def _keep_swallowed(unraisable: sys.UnraisableHookArgs) -> None:
    """``sys.unraisablehook``: where an exception cannot propagate (a weakref callback, such as
    the import system's module-lock cleanup, or a ``__del__``), Python prints "Exception
    ignored in ..." with a traceback and drops it.  A signal's KeyboardInterrupt landing there
    would be lost with a traceback shown; keep its number instead, silently."""
    exc = unraisable.exc_value
    if isinstance(exc, KeyboardInterrupt):
        _swallowed.append(_signum(exc, signal.SIGINT))
    else:
        _previous_hook(unraisable)


def raise_swallowed() -> None:
    """Raise the first signal Python swallowed (see :func:`_keep_swallowed`) as
    :class:`Terminated`, now: bnfix calls this where stopping is safe and the message true
    (before each pair, before a commit writes, after the run)."""
    if _swallowed:
        signum = _swallowed[0]
        _swallowed.clear()
        if _once:
            settle()
        raise Terminated(signum)


def interrupt_in(exc: BaseException) -> KeyboardInterrupt | None:
    """The signal's KeyboardInterrupt that ``exc`` is or carries, else None.

    Python 3.10 and 3.11 wrap an exception raised in a ``__set_name__`` in a RuntimeError
    ("Error calling __set_name__ ..."), so a Ctrl-C that lands while a class is created (the
    first import of a module, mid-run) arrives as that RuntimeError; 3.12 no longer wraps it.
    """
    if isinstance(exc, KeyboardInterrupt):
        return exc
    if type(exc) is RuntimeError and isinstance(exc.__cause__, KeyboardInterrupt):
        return exc.__cause__
    return None


def commit(outputs: Sequence[Output], *, backup: bool = False, sync: bool = True,
           on_commit: Callable[[], None] | None = None) -> Committed:
    """Replace every ``output.path`` by its content, all or nothing (see the module docstring).

    ``backup`` keeps ``<target>.orig`` of each existing target (never overwriting one).
    ``sync=False`` skips the fsyncs: still all-or-nothing for the running system, but after a
    power cut a renamed file may be empty.  ``on_commit`` is called once the outputs are new,
    with signals still held off: a caller that records it there cannot be stopped by a signal
    between the commit and its record (which would make its "nothing was changed" untrue).

    Raises a :class:`CommitError` subclass for an OSError, :class:`Interrupted` for a signal;
    any other exception from a ``fill`` propagates unchanged, after the temps were removed.
    """
    names = [Path(out.path) for out in outputs]  # the user's names, for the messages
    slots = [_check(out) for out in outputs]  # nothing created yet: no cleanup needed
    _refuse_duplicates(slots)
    warnings: list[str] = []
    try:
        raise_swallowed()
        for slot in slots:
            _write(slot, sync, warnings)
        if backup:
            _back_up(slots, sync)
        for slot in slots:
            _keep_old(slot)
        return _switch(slots, sync, warnings, on_commit)
    except (Interrupted, CommitError):  # done by _switch
        raise
    except BaseException as exc:  # before the first rename: remove everything, nothing changed
        with HoldSignals() as held:
            left = _discard(slots)
        if isinstance(exc, _Fault):
            error = exc.build(slots, State.UNCHANGED, left)
            held.deliver(State.UNCHANGED, names, None, error)
            raise error from exc.cause
        interrupt = interrupt_in(exc)
        if interrupt is not None:  # normally before the renames; else just after them
            state = _state(slots) if slots else State.UNCHANGED
            done = _result(slots, warnings) if state is State.COMMITTED else None
            raise _interrupted(_signum(interrupt, signal.SIGINT), state, names, done, left) from None
        held.deliver(State.UNCHANGED, names, None, None)
        raise


def leftovers(directory: Path) -> list[str]:
    """The names in ``directory`` that look like bnfix temp files or rollback links."""
    return [e.name for e in os.scandir(directory) if e.name.endswith((TMP, OLD))]


def sweep(path: Path, listing: Callable[[Path], list[str]] = leftovers) -> list[Path]:
    """Remove the temp files and rollback links a killed bnfix left for ``path`` (and for its
    ``.orig`` backup; for a symlink, also beside the file it points to); return their paths.

    Call it only while holding ``path``'s exclusive lock: without it, the files may belong to a
    bnfix that is still running.  ``listing`` lists a directory's candidates (a run over many
    pairs in one directory passes a cached one, so it does not list the directory per pair).
    """
    path = Path(path)
    removed: list[Path] = []
    for target in dict.fromkeys((path, Path(os.path.realpath(path)))):
        prefixes = tuple(f".{fit_name(name, _ROOM)}." for name in (target.name, target.name + ".orig"))
        try:
            entries = listing(target.parent)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise SweepFailed(f"{path}: cannot look for temp files left by an earlier bnfix: "
                              f"{_why(exc)}") from exc
        for name in entries:
            if any(_is_leftover(name, p) for p in prefixes):
                leftover = target.parent / name
                try:
                    os.unlink(leftover)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise SweepFailed(f"{path}: cannot remove {leftover}, left by an earlier "
                                      f"bnfix: {_why(exc)}") from exc
                removed.append(leftover)
    return removed


def temp_name(target: Path, suffix: str = TMP) -> Path:
    """A fresh ``.NAME.<random>.bnfix-tmp`` path beside ``target``, within NAME_MAX."""
    return target.with_name(f".{fit_name(target.name, _ROOM)}.{os.urandom(_HEX // 2).hex()}{suffix}")


def write_fd(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until everything is written (it may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the directories it created (outermost first), so a failed run
    can remove them again with :func:`remove_dirs`.  Call it before locking the outputs: the
    lock files live in that directory."""
    missing: list[Path] = []
    while not os.path.isdir(path):
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    created: list[Path] = []
    try:
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                continue
            created.append(d)
    except BaseException:
        remove_dirs(created)  # a failure deep down leaves none of the new directories
        raise
    return created


def remove_dirs(created: list[Path]) -> None:
    """Remove what :func:`make_dirs` created, innermost first, if still empty."""
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:
            pass


def fit_name(name: str, room: int) -> str:
    """``name`` if it fits in ``room`` bytes, else its start (cut at a character boundary) plus
    ``~`` and a CRC of the whole name, so that two long names sharing a start stay apart."""
    raw = os.fsencode(name)
    if len(raw) <= room:
        return name
    import zlib  # only for long names: it costs more to import than the rest of this module

    cut = room - 9
    while cut > 0 and raw[cut] & 0xC0 == 0x80:  # do not split a UTF-8 sequence
        cut -= 1
    return f"{os.fsdecode(raw[:cut])}~{zlib.crc32(raw):08x}"


def _is_leftover(name: str, prefix: str) -> bool:
    if not name.startswith(prefix) or not name.endswith((TMP, OLD)):
        return False
    middle = name[len(prefix):-len(TMP)]
    return len(middle) == _HEX and all(c in "0123456789abcdef" for c in middle)


# -- the steps -------------------------------------------------------------------------------


class _Slot:
    """The working state of one output during a commit (private, mutable)."""

    __slots__ = ("backup", "old", "out", "put_back", "replaced", "scratch", "st", "target", "tmp",
                 "undo_error")

    def __init__(self, out: Output, target: Path, st: os.stat_result | None):
        self.out, self.target, self.st = out, target, st
        self.tmp: Path | None = None  # the new content, until renamed
        self.old: Path | None = None  # rollback link to the file being replaced
        self.backup: Path | None = None  # ``.orig`` created by this run
        self.scratch: Path | None = None  # temp copy for a backup where no link is possible
        self.replaced = False  # the target holds the new content
        self.put_back = False  # it did, and the rollback restored the old one
        self.undo_error: OSError | None = None  # why the rollback could not

    @property
    def name(self) -> Path:
        """The user's name for this file."""
        return self.out.path


class _Fault(Exception):
    """An OSError in a step, tagged with the step's error class and the output concerned."""

    def __init__(self, kind: type[CommitError], slot: _Slot, cause: OSError, what: str = ""):
        super().__init__(what)
        self.kind, self.slot, self.cause, self.what = kind, slot, cause, what

    def build(self, slots: list[_Slot], state: State, left: list[str]) -> CommitError:
        what = self.what or ("cannot write" if self.kind is WriteFailed else "cannot replace")
        message = f"{self.slot.name}: {what}: {_why(self.cause)}; {_outcome(slots, state)}"
        return self.kind(message + "".join(left), path=self.slot.name, state=state, error=self.cause)


def _check(out: Output) -> _Slot:
    """Step 1: where the file goes and what is there now; a directory is refused."""
    path = Path(out.path)
    out = out._replace(path=path)
    target = Path(os.path.realpath(path)) if out.in_place and os.path.islink(path) else path
    try:
        st: os.stat_result | None = os.lstat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise WriteFailed(f"{path}: cannot write: {_why(exc)}; nothing was changed",
                          path=path, state=State.UNCHANGED, error=exc) from exc
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputIsDirectory(f"{path}: is a directory; nothing was changed",
                                path=path, state=State.UNCHANGED)
    return _Slot(out, target, st)


def _refuse_duplicates(slots: list[_Slot]) -> None:
    seen = set()
    for slot in slots:
        if slot.target in seen:
            raise ValueError(f"{slot.name}: given twice")
        seen.add(slot.target)


def _write(slot: _Slot, sync: bool, warnings: list[str]) -> None:
    """Step 2: the content into a new temp file beside the target, with its metadata, synced."""
    try:
        mode, owner = _metadata(slot)
        fd = _create(slot, "tmp")
        try:
            content = slot.out.content
            if isinstance(content, (bytes, bytearray, memoryview)):
                write_fd(fd, content)
            else:
                content(fd)
            if owner is not None:
                _chown(fd, slot, owner, warnings)
            os.fchmod(fd, mode)
            if sync:
                os.fsync(fd)
        except BaseException:
            _close_quietly(fd)
            raise
        os.close(fd)
    except OSError as exc:
        raise _Fault(WriteFailed, slot, exc) from exc


def _metadata(slot: _Slot) -> tuple[int, tuple[int, int] | None]:
    """The mode for the new file and, in place, the owner to keep: from ``like``, else the file
    being replaced, else a new file's default (0666 minus the umask)."""
    like = slot.out.like
    if like is not None:
        st = os.stat(like)
    elif slot.st is not None and stat.S_ISREG(slot.st.st_mode):
        st = slot.st
    else:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask, None
    return stat.S_IMODE(st.st_mode), ((st.st_uid, st.st_gid) if slot.out.in_place else None)


def _chown(fd: int, slot: _Slot, owner: tuple[int, int], warnings: list[str]) -> None:
    """Keep owner and group; where not permitted (not root), keep going and say so."""
    try:
        os.fchown(fd, *owner)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EINVAL):
            raise
        now = os.fstat(fd)
        warnings.append(f"{slot.name}: owner and group {owner[0]}:{owner[1]} not kept "
                        f"({_why(exc)}); the new file belongs to {now.st_uid}:{now.st_gid}")


def _create(slot: _Slot, field: str, target: Path | None = None, suffix: str = TMP) -> int:
    """A new private file beside ``target`` (default: the slot's), its name recorded in
    ``slot.<field>`` *before* it exists, so that a signal at any moment leaves nothing unknown.
    Like ``tempfile.mkstemp``, which is not used because importing it costs more than this."""
    target = target or slot.target
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = temp_name(target, suffix)
        setattr(slot, field, tmp)
        try:
            return os.open(tmp, flags, 0o600)
        except FileExistsError:  # another file's name: forget it (any other error: the name
            setattr(slot, field, None)  # stays, and a signal just after the open still finds it)
    raise FileExistsError(errno.EEXIST, "cannot create a temporary file", str(target.parent))


def _back_up(slots: list[_Slot], sync: bool) -> None:
    """Step 3: ``<target>.orig`` for every existing target that has none yet."""
    made = []
    for slot in slots:
        if slot.st is None:
            continue
        orig = slot.target.with_name(slot.target.name + ".orig")
        try:
            if _link_backup(slot, orig, sync):
                made.append(slot)
        except OSError as exc:
            raise _Fault(BackupFailed, slot, exc, f"cannot create the backup {orig}") from exc
    if made and sync:  # the backups must be on disk before anything is replaced
        for parent in _parents(made):
            try:
                _sync_dir(parent)
            except OSError as exc:
                slot = next(s for s in made if s.target.parent == parent)
                raise _Fault(BackupFailed, slot, exc, f"cannot create the backup {slot.backup}") from exc


def _link_backup(slot: _Slot, orig: Path, sync: bool) -> bool:
    """Link ``orig`` to the target, or to a synced copy where no link is possible; never
    overwrite an existing ``orig``.  Whether a backup was made."""
    held = HoldSignals()  # a signal must not come between the link and its record
    try:
        with held:
            linked = _link(slot.target, orig)
            if linked:
                slot.backup = orig
    finally:
        held.replay()
    if linked is not None:
        return linked
    assert slot.st is not None
    fd = _create(slot, "scratch", orig)
    try:
        _copy_file(slot.target, fd, slot.st)
        if sync:
            os.fsync(fd)
    except BaseException:
        _close_quietly(fd)
        raise
    os.close(fd)
    held = HoldSignals()
    try:
        with held:
            made = _place(slot, orig)
    finally:
        held.replay()
    if slot.scratch is not None:
        os.unlink(slot.scratch)
        slot.scratch = None
    return made


def _link(src: Path, dst: Path) -> bool | None:
    """Hard-link ``dst`` to ``src``, never overwriting: True when linked, False when ``dst``
    exists, None where this file system cannot link (the callers then copy)."""
    try:
        os.link(src, dst)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        return None


def _place(slot: _Slot, orig: Path) -> bool:
    """Give the scratch copy the name ``orig`` unless that exists: a link (atomic, never
    overwrites), else a rename after checking (the caller holds the target's lock)."""
    assert slot.scratch is not None
    linked = _link(slot.scratch, orig)
    if linked:
        slot.backup = orig
    if linked is not None:
        return linked
    try:
        os.lstat(orig)
        return False
    except FileNotFoundError:
        pass
    os.replace(slot.scratch, orig)
    slot.scratch, slot.backup = None, orig
    return True


def _keep_old(slot: _Slot) -> None:
    """Step 4: a hidden hard link to the file about to be replaced (a copy if no link is
    possible), so a later failure can put it back.  Not needed where this run made a backup:
    that is the same file (or a copy of it), and a failed run removes it anyway."""
    if slot.st is None or slot.backup is not None:
        return
    try:
        for _ in range(100):
            slot.old = temp_name(slot.target, OLD)
            try:
                linked = _link(slot.target, slot.old)
            except OSError:
                slot.old = None
                raise
            if linked:
                return
            slot.old = None
            if linked is None:
                break
        fd = _create(slot, "old", suffix=OLD)
        try:
            _copy_file(slot.target, fd, slot.st)
        except BaseException:
            _close_quietly(fd)
            raise
        os.close(fd)
    except OSError as exc:
        raise _Fault(ReplaceFailed, slot, exc) from exc


def _copy_file(src: Path, dst_fd: int, st: os.stat_result) -> None:
    """Copy ``src`` into ``dst_fd`` with its mode, owner (where permitted) and times."""
    fd = os.open(src, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    try:
        _copy_fd(fd, dst_fd, os.fstat(fd).st_size)
    finally:
        _close_quietly(fd)
    try:
        os.fchown(dst_fd, st.st_uid, st.st_gid)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EINVAL):
            raise
    os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
    os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_fd(src: int, dst: int, size: int) -> None:
    """``size`` bytes from offset 0 of ``src`` to ``dst``: copy_file_range (reflinks, no
    bytes through Python), else pread/pwrite."""
    offset, fast = 0, hasattr(os, "copy_file_range")
    while offset < size:
        n = 0
        if fast:
            try:
                n = os.copy_file_range(src, dst, min(_CHUNK, size - offset), offset, offset)
            except OSError as exc:
                if exc.errno not in _NO_FAST_COPY:
                    raise
                fast = False
        if n <= 0:
            data = os.pread(src, min(_CHUNK, size - offset), offset)
            if not data:
                raise OSError(errno.EIO, "the file got shorter while it was copied")
            view = memoryview(data)
            while view:
                done = os.pwrite(dst, view, offset)
                view, offset = view[done:], offset + done
            continue
        offset += n


def _switch(slots: list[_Slot], sync: bool, warnings: list[str],
            on_commit: Callable[[], None] | None) -> Committed:
    """Step 5, with signals held off: the renames, in order, then the directory syncs; undone
    on a failure.  A signal that came meanwhile is delivered at the end."""
    failure: _Fault | None = None
    with HoldSignals() as held:
        try:
            _rename_all(slots, sync)
        except _Fault as fault:
            failure, left = fault, _discard(slots)
        else:
            _drop_old(slots, warnings)
            if on_commit is not None:
                on_commit()
    if failure is not None:
        state = _state(slots)
        error = failure.build(slots, state, left)
        held.deliver(state, [s.name for s in slots], None, error)
        raise error from failure.cause
    result = _result(slots, warnings)
    held.deliver(State.COMMITTED, [s.name for s in slots], result, None)
    return result


def _result(slots: list[_Slot], warnings: list[str]) -> Committed:
    return Committed(tuple(s.target for s in slots), tuple(s.backup for s in slots if s.backup),
                     tuple(warnings))


def _rename_all(slots: list[_Slot], sync: bool) -> None:
    for slot in slots:
        assert slot.tmp is not None
        try:
            os.replace(slot.tmp, slot.target)
        except OSError as exc:
            _roll_back(slots)
            raise _Fault(ReplaceFailed, slot, exc) from exc
        slot.tmp, slot.replaced = None, True
    if sync:
        for parent in _parents(slots):
            try:
                _sync_dir(parent)
            except OSError as exc:
                first = next(s for s in slots if s.target.parent == parent)
                _roll_back(slots)
                raise _Fault(ReplaceFailed, first, exc, "cannot sync its directory") from exc


def _roll_back(slots: list[_Slot]) -> None:
    """Put back every replaced file, last first (so that a SIGKILL meanwhile still leaves a
    "new first, old last" pair): rename the kept old file (or this run's backup) back, or
    remove a file that did not exist before.  What cannot be put back stays ``replaced``."""
    restored = False
    for slot in reversed(slots):
        if not slot.replaced:
            continue
        try:
            if slot.old is not None:
                os.replace(slot.old, slot.target)
                slot.old = None
            elif slot.backup is not None:
                os.replace(slot.backup, slot.target)
                slot.backup = None
            else:
                os.unlink(slot.target)
        except OSError as exc:
            slot.undo_error = exc
            continue
        slot.replaced = False
        slot.put_back = restored = True
    if restored:
        for parent in _parents(slots):
            try:
                _sync_dir(parent)
            except OSError:
                pass  # best effort: the names are right for the running system


def _state(slots: list[_Slot]) -> State:
    if slots and all(s.replaced for s in slots):
        return State.COMMITTED  # only when a directory sync failed and nothing could be put back
    if any(s.replaced for s in slots):
        return State.MIXED
    return State.ROLLED_BACK if any(s.put_back for s in slots) else State.UNCHANGED


def _outcome(slots: list[_Slot], state: State) -> str:
    """The end of a failure's message: what the user's files hold now, and how to recover."""
    if state is State.UNCHANGED:
        return "nothing was changed"
    if state is State.ROLLED_BACK:
        put = [s.name for s in slots if s.put_back and s.st is not None]
        gone = [s.name for s in slots if s.put_back and s.st is None]  # new outputs: removed again
        done = [f"{_join(put)} {'was' if len(put) == 1 else 'were'} put back"] if put else []
        done += [f"{_join(gone)} {'was' if len(gone) == 1 else 'were'} removed again"] if gone else []
        return f"{' and '.join(done)}, so nothing was changed"
    new = [s.name for s in slots if s.replaced]
    old = [s.name for s in slots if not s.replaced]
    why = _why(next(s.undo_error for s in slots if s.replaced))
    if state is State.COMMITTED:
        return (f"putting the files back failed too ({why}): {_join(new)} {_is(new)} new, but "
                f"may not be safe on disk yet")
    recovery = "; ".join(_recovery(s) for s in slots if s.replaced)
    group = "the pair" if len(slots) == 2 else "the files"
    return (f"putting {_join(new)} back failed too ({why}), so {group} is mixed: {_join(new)} "
            f"{_is(new)} new, {_join(old)} {_is(old)} old; {recovery}")


def _recovery(slot: _Slot) -> str:
    orig = slot.target.with_name(slot.target.name + ".orig")
    if slot.backup is not None or _exists(orig):
        return f"restore {slot.name} from {orig}"
    if slot.old is not None:
        return f"the old {slot.name} is {slot.old}"
    return f"{slot.name} did not exist before"


def _discard(slots: list[_Slot]) -> list[str]:
    """Remove what a failed run made: temps, rollback links and backups of files that are old
    again.  A file still new keeps its old link and backup (the recovery).  Returns notes for
    the message about what could not be removed."""
    left: list[str] = []
    for slot in slots:
        names = [slot.tmp, slot.scratch] + ([] if slot.replaced else [slot.old, slot.backup])
        for name in names:
            if name is None:
                continue
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass
            except OSError as exc:
                left.append(_left_note(slot, name, exc))
        slot.tmp = slot.scratch = None
        if not slot.replaced:
            slot.old = slot.backup = None
    return left


def _drop_old(slots: list[_Slot], warnings: list[str]) -> None:
    """After success: the rollback links go; one that cannot is reported, not fatal (the pair
    is complete; :func:`sweep` removes it next time)."""
    for slot in slots:
        if slot.old is None:
            continue
        try:
            os.unlink(slot.old)
        except FileNotFoundError:
            pass
        except OSError as exc:
            warnings.append(f"{slot.name}: could not remove the rollback link {slot.old} "
                            f"({_why(exc)}); the next bnfix run there removes it")
        slot.old = None


def _left_note(slot: _Slot, name: Path, exc: OSError) -> str:
    if name == slot.backup:
        return f"; the backup {name} (a copy of the unchanged {slot.name}) was left ({_why(exc)})"
    return (f"; a temp file was left in {name.parent} ({_why(exc)}), the next bnfix run there "
            f"removes it")


# -- signals ---------------------------------------------------------------------------------


@final
class HoldSignals:
    """Hold SIGINT/SIGTERM/SIGHUP off for a critical section, then deliver them:
    ``with HoldSignals() as held: ...`` then ``held.replay()``.  (Also for callers: the
    CLI can hold them while it records that a commit is done.)

    Blocking them (``pthread_sigmask``) covers this thread; replacing their handlers by one
    that only records them covers a signal another thread receives (Python runs handlers in the
    main thread between any two bytecodes) and the default action (SIGTERM would kill at once).
    On exit the handlers are restored; :meth:`deliver` then raises the first signal again, to
    its own handler.
    """

    def __init__(self) -> None:
        self.caught: list[int] = []
        self._saved: list[tuple[int, signal.Handlers | int | Callable[..., object]]] = []
        self._mask: set[int] | None = None

    def __enter__(self) -> HoldSignals:
        if hasattr(signal, "pthread_sigmask"):
            self._mask = {int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)}
        try:
            for signum in SIGNALS:
                old = signal.getsignal(signum)
                if old is not None:
                    signal.signal(signum, self._record)
                    self._saved.append((signum, old))
        except ValueError:  # not the main thread: the mask alone
            pass
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.caught.append(signum)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)  # pending ones reach _record
        for signum, old in self._saved:
            signal.signal(signum, old)
        self._saved.clear()

    def replay(self) -> None:
        """Raise the first signal that came again, now that its own handler is back (which may
        raise KeyboardInterrupt; a default SIGTERM ends the process here)."""
        if self.caught:
            signal.raise_signal(self.caught[0])

    def deliver(self, state: State, names: list[Path], committed: Committed | None,
                error: CommitError | None) -> None:
        """:meth:`replay`, turning its KeyboardInterrupt into :class:`Interrupted`, which says
        what is on disk."""
        if not self.caught:
            return
        signum = self.caught[0]
        try:
            self.replay()
        except KeyboardInterrupt as exc:
            note = [] if error is None else [f" ({error})"]
            raise _interrupted(_signum(exc, signum), state, names, committed, note) from error


def _signum(exc: BaseException, default: int) -> int:
    return exc.signum if isinstance(exc, Terminated) else default


def _interrupted(signum: int, state: State, names: list[Path], committed: Committed | None,
                 notes: list[str]) -> Interrupted:
    name = signal.Signals(signum).name
    files = _join(names)
    if state is State.COMMITTED:
        text = f"interrupted by {name} after the commit: {files} {_is(names)} new"
    elif state is State.UNCHANGED:
        text = f"interrupted by {name}; nothing was changed: {files} {_is(names)} as before"
    else:
        text = f"interrupted by {name}"
    return Interrupted(text + "".join(notes), signum=signum, state=state, paths=tuple(names),
                       committed=committed)


# -- small helpers ---------------------------------------------------------------------------


def _parents(slots: list[_Slot]) -> list[Path]:
    return list(dict.fromkeys(s.target.parent for s in slots))


def _sync_dir(path: Path) -> None:
    """fsync a directory, so the renames in it survive a power cut; ignored where the
    platform cannot (Windows, some FUSE file systems)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        if exc.errno in _NO_DIR_SYNC or exc.errno == errno.EACCES or os.name == "nt":
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIR_SYNC:
            raise
    finally:
        _close_quietly(fd)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _exists(path: Path) -> bool:
    try:
        os.lstat(path)
    except OSError:
        return False
    return True


def _why(exc: BaseException | None) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _join(items: Sequence[object]) -> str:
    words = [str(i) for i in items]
    return words[0] if len(words) < 2 else ", ".join(words[:-1]) + " and " + words[-1]


def _is(items: Sequence[object]) -> str:
    return "is" if len(items) == 1 else "are"
