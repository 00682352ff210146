"""Where a run's reports go: the terminal (a rich console, progress bars that appear only
there) and the ``--json`` report, streamed pair by pair into a temp file that is renamed into
place at the end.  What is said is built by ``report.py``; this module only writes it.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

    from rich.console import Console

EXIT_OK, EXIT_ERROR = 0, 2


def error(message: str) -> None:
    print(f"bnfix: error: {message}", file=sys.stderr)


def console(args: argparse.Namespace) -> Console:
    from rich.console import Console

    stream = sys.stderr if args.json == "-" else sys.stdout
    color = {"always": True, "never": False}.get(args.color)
    no_color = color is False or (color is None and bool(os.environ.get("NO_COLOR")))
    # NO_COLOR means no ANSI styling at all (rich's own no_color would keep bold and dim).
    extra: dict[str, Any] = {"color_system": None} if no_color else {}
    console = Console(file=stream, force_terminal=color, no_color=no_color, highlight=False,
                      soft_wrap=False, **extra)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 160
    return console


class Progress:
    """A transient bar over the pairs of a run, on a terminal only (never on a pipe, nor -q)."""

    def __init__(self, console: Console | None):
        self.console = console if console is not None and console.is_terminal else None
        self.bar: Any = None
        self.task: Any = None
        self.done = 0

    def step(self, path: Path) -> None:
        if self.console is None:
            return
        if self.bar is None:
            from rich.progress import Progress, SpinnerColumn, TextColumn

            self.bar = Progress(SpinnerColumn(), TextColumn("{task.completed} pair(s)"),
                                TextColumn("{task.description}"), console=self.console, transient=True)
            self.task = self.bar.add_task(str(path), total=None)
            self.bar.start()
        self.bar.update(self.task, completed=self.done, description=str(path))
        self.done += 1

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class BytesProgress:
    """A progress callback for one large copy: a bar on a terminal once the copy has taken more
    than a second.  :meth:`close` removes the bar whether the copy finished or failed."""

    def __init__(self, console: Console, total: int):
        import time

        self.console, self.total, self.start = console, total, time.monotonic()
        self.bar: Any = None
        self.task: Any = None

    @classmethod
    def on(cls, console: Console | None, path: Path) -> BytesProgress | None:
        if console is None or not console.is_terminal:
            return None
        return cls(console, path.stat().st_size)

    def __call__(self, done: int) -> None:
        if self.bar is None:
            import time

            if time.monotonic() - self.start < 1.0:
                return
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

            self.bar = Progress(TextColumn("writing"), BarColumn(), DownloadColumn(), console=self.console,
                                transient=True)
            self.task = self.bar.add_task("copy", total=self.total)
            self.bar.start()
        self.bar.update(self.task, completed=done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class JsonSink:
    """The ``--json`` report, streamed pair by pair (memory stays flat over a large tree) into a
    temp file renamed into place at the end (``-``: stdout)."""

    def __init__(self, target: str):
        self.target = target
        self.path = None if target == "-" else Path(target)
        self.errors: list[dict[str, Any]] = []
        self.unpaired_files: list[str] = []
        self.forbidden: set[str] = set()
        self.refused = False  # the report path was refused (said once, where it was found)
        self.failed = False  # writing the report failed (said once, when it happened)
        self.count = 0
        self._tmp: Any = None
        self._fd: int | None = None

    def refuse_overlap(self, paths: tuple[Path, ...]) -> None:
        """Refuse a report path that is an input, output or backup of a pair (checked for every
        pair before it is written, and once more before the report itself is)."""
        from .errors import UsageError

        if self.path is None:
            return
        for p in paths:
            self.forbidden.add(os.path.realpath(p))
            if _same(self.path, p) or os.path.realpath(self.path) == os.path.realpath(p):
                self.refused = True
                raise UsageError(f"{self.target}: the JSON report would overwrite {p}")

    def _write(self, text: str) -> None:
        if self.path is None:
            sys.stdout.write(text)
            return
        if self.failed:
            return
        try:
            if self._fd is None:
                from . import commit

                self._tmp = commit.temp_name(self.path)
                if self.path.parent.exists() and not self.path.parent.is_dir():  # mkdir says EEXIST
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            _write_all(self._fd, text.encode())
        except OSError as exc:
            # The pairs do not depend on their report: the run goes on, and exits 2 at the end.
            self.failed = True
            error(f"{self.target}: cannot write: {exc.strerror or exc}")
            self.discard()

    def _head(self) -> str:
        import json

        from . import __version__

        return f'{{"bnfix": {json.dumps(__version__)},\n"pairs": ['

    def pair(self, data: dict[str, Any]) -> None:
        import json

        self._write((self._head() + "\n" if self.count == 0 else ",\n") + json.dumps(data, indent=2))
        self.count += 1

    def error(self, message: str, prototxt: Path | None, caffemodel: Path | None) -> None:
        self.errors.append({"prototxt": None if prototxt is None else str(prototxt),
                            "caffemodel": None if caffemodel is None else str(caffemodel), "error": message})

    def unpaired(self, line: str) -> None:
        self.unpaired_files.append(line)

    def close(self, totals: Any, written: set[Path]) -> int:
        import json

        if self.path is not None and (self.refused or os.path.realpath(self.path) in self.forbidden
                                      or Path(os.path.realpath(self.path)) in written):
            if not self.refused:
                error(f"{self.target}: the JSON report would overwrite a file of this run")
            self.discard()
            return EXIT_ERROR
        if self.failed:
            return EXIT_ERROR
        tail = (("" if self.count else self._head()) + "\n],\n"
                f'"errors": {json.dumps(self.errors, indent=2)},\n'
                f'"unpaired": {json.dumps(self.unpaired_files, indent=2)},\n'
                f'"totals": {json.dumps(totals.as_dict(), indent=2)}}}\n')
        self._write(tail)
        if self.failed:
            return EXIT_ERROR
        try:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
                os.replace(self._tmp, self.path)  # type: ignore[arg-type]
        except OSError as exc:
            error(f"{self.target}: cannot write: {exc.strerror or exc}")
            self.discard()
            return EXIT_ERROR
        return EXIT_OK

    def discard(self) -> None:
        """Remove the unfinished report (a failed or interrupted run leaves none)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tmp is not None and os.path.exists(self._tmp):
            try:
                os.unlink(self._tmp)
            except OSError:
                pass  # the directory went read-only meanwhile: nothing more bnfix can do


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.realpath(a) == os.path.realpath(b) or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False
