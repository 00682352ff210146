"""All-or-nothing output: temp files beside the targets, fsync, then rename.

Both outputs of a run are written to temporary files first and renamed only when every one is
complete, so a failure (bad input found late, disk full, Ctrl-C) leaves no half-written file and
never touches an existing output.  Renaming within a directory is atomic on POSIX and Windows.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .errors import BnfixError


def write_all(outputs: list[tuple[Path, bytes | Callable[[int], None]]], *, backup: bool = False,
              sync: bool = True) -> None:
    """Write each ``(path, content)`` (bytes, or ``fill(fd)`` that writes them); rename all at
    the end.

    With ``backup``, an existing target is first copied to ``<target>.orig`` unless that file
    already exists (the oldest original is the one worth keeping).  ``sync=False`` skips the
    fsyncs: still all-or-nothing for the running system, but after a power cut a renamed file
    may be empty.  It saves the time of flushing the file to disk (0.4 s for 248 MB here).
    """
    temps: list[tuple[str, Path]] = []
    made: list[Path] = []  # directories created here, removed again if the write fails
    done = False
    try:
        for path, fill in outputs:
            made += _make_dirs(path.parent)
            fd, tmp = _temp_beside(path)
            temps.append((tmp, path))
            try:
                if isinstance(fill, bytes):
                    write_fd(fd, fill)
                else:
                    fill(fd)
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if path.exists():
                shutil.copymode(path, tmp)
            else:
                os.chmod(tmp, 0o666 & ~_umask())
        if backup:
            for _, path in temps:
                orig = path.with_name(path.name + ".orig")
                if path.exists() and not orig.exists():
                    _copy_atomic(path, orig, sync)
        for tmp, path in temps:
            os.replace(tmp, path)
        for parent in {path.parent for _, path in temps} if sync else ():
            _fsync_dir(parent)
        done = True
    except OSError as exc:
        target = exc.filename or (temps[-1][1] if temps else "")
        raise BnfixError(f"{target}: cannot write: {exc.strerror or exc}") from None
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        for d in reversed(made if not done else []):
            try:
                d.rmdir()
            except OSError:
                pass


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p``, returning the directories it created (outermost first)."""
    missing = []
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
    return list(reversed(missing))


def _copy_atomic(src: Path, dst: Path, sync: bool) -> None:
    fd, tmp = _temp_beside(dst)
    try:
        with open(src, "rb") as f, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(f, out, 1 << 22)
            out.flush()
            if sync:
                os.fsync(out.fileno())
        shutil.copystat(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_fd(fd: int, data: bytes) -> None:
    """``os.write`` until everything is written (it may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new private file next to ``path`` (same directory, so the rename is atomic).

    Like ``tempfile.mkstemp``, which is not used because importing tempfile costs more than
    this whole function.
    """
    for _ in range(100):
        tmp = str(path.with_name(f".{path.name}.{os.urandom(6).hex()}.bnfix-tmp"))
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: cannot create a temporary file")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
