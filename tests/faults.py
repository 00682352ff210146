"""Fault injection for the commit layer: a stand-in for the ``os`` module of ``bnfix.commit`` and
``bnfix.lock`` that counts every system call and makes chosen ones fail.

``bnfix.commit`` and ``bnfix.lock`` call ``os.fsync`` etc. through their module attribute ``os``,
so ``monkeypatch.setattr(commit, "os", FaultyOS(...))`` routes every call through here.  One
counter is shared by all stand-ins of a :class:`Calls` log, so "call number k" means the same
call however the modules interleave.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

# The calls that reach the kernel and can fail with an errno.
SYSCALLS = frozenset({
    "open", "close", "read", "write", "pread", "pwrite", "copy_file_range", "sendfile", "fsync",
    "fchmod", "fchown", "chmod", "chown", "link", "rename", "replace", "unlink", "stat", "lstat",
    "fstat", "scandir", "mkdir", "rmdir", "utime", "ftruncate",
})


class Calls:
    """The shared log: ``(module, call name, arguments)`` per system call, in order; the faults
    to inject, ``{call number: errno}``; and ``hook(number, module, name, args)``, run before
    each call (e.g. to send a signal at a chosen call)."""

    def __init__(self, fail: dict[int, int] | None = None, *, deny: dict[str, int] | None = None,
                 fake_fsync: bool = True,
                 hook: Callable[[int, str, str, tuple[Any, ...]], None] | None = None):
        self.log: list[tuple[str, str, tuple[Any, ...]]] = []
        self.hook = hook
        self.fail = dict(fail or {})
        self.deny = dict(deny or {})  # call name -> errno for every such call (e.g. no hard links)
        self.fake_fsync = fake_fsync  # skip the real fsync (the tests check logic, not disks)
        self.injected: list[tuple[int, str, str, int]] = []  # (number, module, call, errno)

    def os_for(self, module: str) -> FaultyOS:
        return FaultyOS(self, module)

    def names(self) -> list[str]:
        return [f"{mod}.{name}" for mod, name, _ in self.log]


class FaultyOS:
    """Forwards everything to ``os``; system calls are logged, and the chosen ones raise
    ``OSError(errno)`` instead of running (``close`` runs first: the kernel frees the
    descriptor even when close reports an error)."""

    def __init__(self, calls: Calls, module: str):
        self._calls, self._module = calls, module

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if name not in SYSCALLS:
            return real
        calls, module = self._calls, self._module

        def call(*args: Any, **kwargs: Any) -> Any:
            number = len(calls.log)
            calls.log.append((module, name, args))
            if calls.hook is not None:
                calls.hook(number, module, name, args)
            err = calls.fail.get(number, calls.deny.get(name))
            if err is not None:
                if number in calls.fail:
                    calls.injected.append((number, module, name, err))
                if name == "close":
                    real(*args, **kwargs)
                filename = args[0] if args and isinstance(args[0], (str, os.PathLike)) else None
                raise OSError(err, os.strerror(err), filename)
            if name == "fsync" and calls.fake_fsync:
                os.fstat(args[0])  # still fails for a bad descriptor, like fsync would
                return None
            return real(*args, **kwargs)

        return call


def signal_me(signum: int) -> None:
    """Send ``signum`` to the calling thread, now.

    ``os.kill(os.getpid(), ...)`` lets the kernel hand it to any thread that does not block it.
    numpy starts an OpenBLAS thread; while bnfix holds signals off (blocked in the main thread)
    the kernel gives the signal to that thread, and Python runs the handler whenever that
    thread's C handler has run: here about 3% of the time, up to 90 µs later, after the section
    the test meant (CI, 2026-12-01: a SIGHUP sent during the held-off renames was handled after
    the commit returned).  A signal sent to the thread stays pending there until unblocked."""
    signal.pthread_kill(threading.get_ident(), signum)
