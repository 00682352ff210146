"""The ``bnfix`` command: arguments, which pairs, output paths, locks, exit codes.

Exit codes: 0 success (also ``--dry-run``, and ``--check`` finding nothing to do); 1 only for
``--check`` finding work; 2 for any usage or input error (one ``bnfix: error: ...`` line each);
3 for a bug in bnfix (one line asking for a report; ``BNFIX_DEBUG=1`` adds the traceback);
128 + N when signal N (SIGINT, SIGTERM, SIGHUP) stopped it, with a line saying what is on disk.

This module imports almost nothing at start-up, so that a Ctrl-C while Python is still loading
bnfix is caught here too; rich is imported only when something is rendered.
"""

from __future__ import annotations

import sys

try:
    import os
    from pathlib import Path
    from typing import TYPE_CHECKING, Any, NamedTuple
except KeyboardInterrupt:  # Ctrl-C while the ``bnfix`` command starts: one line, no traceback
    sys.stderr.write("bnfix: error: interrupted while starting; nothing was changed\n")
    raise SystemExit(130) from None

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator

    from rich.console import Console

    from .pipeline import Result

EXIT_OK, EXIT_WORK, EXIT_ERROR, EXIT_BUG = 0, 1, 2, 3


def main(argv: list[str] | None = None) -> int:
    """Run bnfix; never raises (every outcome is an exit code and at most a few lines)."""
    try:
        from . import commit

        commit.install_signal_handlers()
        return _main(argv)
    except KeyboardInterrupt as exc:  # also SIGTERM/SIGHUP, turned into this by commit
        return _interrupted(exc)
    except BrokenPipeError:  # stdout closed early (bnfix ... | head): as SIGPIPE would
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        except OSError:
            pass
        return 128 + 13
    except Exception as exc:  # a bug: say so in one line, keep the traceback for BNFIX_DEBUG
        if os.environ.get("BNFIX_DEBUG"):
            import traceback

            traceback.print_exc()
        print(f"bnfix: internal error: {type(exc).__name__}: {exc} (a bug in bnfix: please report it to its "
              "maintainers with the command you ran; BNFIX_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_BUG


def _interrupted(exc: KeyboardInterrupt) -> int:
    from . import commit

    if isinstance(exc, commit.Interrupted):
        _error(str(exc))
        return exc.exit_code
    signum = getattr(exc, "signum", 2)
    _error("interrupted; nothing was written for the pair in progress")
    return 128 + signum


def _parser() -> argparse.ArgumentParser:
    import argparse

    from . import __version__, targets

    epilog = (
        "paths: a directory (every model pair under it), a .prototxt followed by its .caffemodel,\n"
        "or one file of a pair (its partner is found by the directory rules; see the README)\n\n"
        "targets (the runtime the model will run in; --strategy/--target-eps override):\n"
        + "".join(f"  {t.name:11} {t.strategy.value:5}  {t.runtime}\n" for t in targets.TARGETS.values())
        + "\nsources (the Darknet whose output the Caffe model must reproduce):\n"
        "  pjreddie-cpu  sqrt(var) + 1e-6    pjreddie/darknet CPU build (default)\n"
        "  pjreddie-gpu  sqrt(var + 1e-5)    pjreddie/darknet GPU build (since 2017-03)\n"
        "  alexeyab      sqrt(var + 1e-5)    AlexeyAB / hank-ai darknet today, CPU and GPU\n"
        "  opencv        sqrt(var + 1e-6)    OpenCV's readNetFromDarknet\n"
        "  \"sqrt(var+A)+B\"                    any other build, by hand\n\n"
        "exit codes: 0 success, 1 --check found work, 2 usage or input error, 3 bug in bnfix,\n"
        "128+N stopped by signal N\n"
    )
    p = argparse.ArgumentParser(
        prog="bnfix", description="Fix BatchNorm eps/variance in Caffe models converted from Darknet, losslessly.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="directories, PROTOTXT CAFFEMODEL pairs, or single files")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-o", "--output-dir", metavar="DIR",
                       help="write outputs into DIR (mirroring the tree for directory arguments)")
    where.add_argument("--in-place", action="store_true", help="replace the inputs, keeping <file>.orig backups")
    where.add_argument("--check", action="store_true",
                       help="write nothing; exit 1 if any pair needs work (one line per such pair), else 0")
    where.add_argument("--dry-run", action="store_true", help="print the full summary, write nothing")
    p.add_argument("--target", metavar="NAME", help=f"runtime the model will run in (default {targets.DEFAULT_TARGET})")
    p.add_argument("--strategy", metavar="NAME", help="eps (refit the variance) or scale (fold into the Scale layer)")
    p.add_argument("--source", metavar="NAME", help="Darknet formula to reproduce (default pjreddie-cpu)")
    p.add_argument("--target-eps", type=float, metavar="EPS", help="eps to store (eps strategy default 1e-6)")
    p.add_argument("--force", action="store_true",
                   help="patch layers that look already patched or not converted from Darknet")
    p.add_argument("--revert", action="store_true", help="undo an earlier bnfix patch, from its markers")
    p.add_argument("--find-partners", action="store_true",
                   help="every file argument stands alone: find its partner by the directory rules "
                        "(for hooks that pass the changed files)")
    p.add_argument("--darknet-weights", metavar="FILE",
                   help="the original .weights: report its writer and warn if --source does not fit it")
    p.add_argument("--darknet-cfg", metavar="FILE",
                   help="with --darknet-weights: compare every BatchNorm layer's statistics with Darknet's")
    p.add_argument("--no-sync", action="store_true",
                   help="do not fsync outputs before renaming them (faster; a power cut may leave them empty)")
    p.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for another bnfix working on the same files (default 60; 0: fail at once)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH ('-' for stdout)")
    p.add_argument("-v", "--verbose", action="store_true", help="the per-layer table for every pair")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour the summary (auto: only on a terminal, never under NO_COLOR)")
    p.add_argument("--version", action="version", version=f"bnfix {__version__}")
    return p


def _conflict(args: argparse.Namespace) -> str | None:
    """Combinations argparse cannot express, as the one-line usage error to print."""
    if args.darknet_cfg and not args.darknet_weights:
        return "--darknet-cfg needs --darknet-weights"
    if args.revert:
        given = [flag for flag, value in (("--source", args.source), ("--target-eps", args.target_eps),
                                          ("--force", args.force), ("--target", args.target),
                                          ("--strategy", args.strategy), ("--check", args.check),
                                          ("--darknet-weights", args.darknet_weights)) if value not in (None, False)]
        if given:
            return (f"--revert cannot be combined with {', '.join(given)}: a revert restores what the "
                    "markers recorded")
    if args.wait < 0 or args.wait != args.wait:
        return "--wait must be a number of seconds >= 0"
    return None


class Note(NamedTuple):
    """A file left unpaired (or that could not be examined: ``error``), and why."""

    path: Path
    reason: str
    error: bool


class Job(NamedTuple):
    """One pair to process, and where its outputs go (None: --check/--dry-run)."""

    prototxt: Path
    caffemodel: Path
    outputs: tuple[Path, Path] | None


def _main(argv: list[str] | None) -> int:
    from . import targets
    from .errors import BnfixError

    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help/--version 0
        return int(exc.code or 0)
    conflict = _conflict(args)
    if conflict:
        parser.print_usage(sys.stderr)
        _error(conflict)
        return EXIT_ERROR
    try:
        from .formulas import DEFAULT_SOURCE, parse_source

        try:
            source = parse_source(args.source or DEFAULT_SOURCE)
        except ValueError as exc:
            raise BnfixError(str(exc)) from None
        options = targets.resolve(args.target, args.strategy, args.target_eps, source, args.force)
        run = _Run(args, options)
        if args.darknet_weights and run.single is None:
            raise BnfixError("--darknet-weights/--darknet-cfg check one pair at a time")
        try:
            return run.all()
        except KeyboardInterrupt as exc:
            _error(run.stopped(exc))
            return getattr(exc, "exit_code", 128 + getattr(exc, "signum", 2))
    except BnfixError as exc:
        _error(str(exc))
        return EXIT_ERROR


class _Run:
    """One invocation: the pairs it finds, each processed and reported as soon as it is found."""

    def __init__(self, args: argparse.Namespace, options: Any):
        self.args, self.options = args, options
        self.out_dir = Path(args.output_dir) if args.output_dir else None
        self.console = None if args.quiet else _console(args)
        self.written: set[Path] = set()
        self.seen: set[tuple[str, str]] = set()
        self.reported: set[tuple[str, str]] = set()
        self.current: Job | None = None  # the pair in progress, and whether it was saved
        self.current_saved = False
        self.done = 0
        self._tagged = False
        self._listed: dict[Path, list[str]] = {}  # per output directory: leftovers of killed runs
        self.code = EXIT_OK
        self.failed = self.unpaired = 0
        from . import report

        self.totals = report.Totals()
        self.json = _JsonSink(args.json) if args.json else None
        if self.json is not None:  # the files named on the command line, before any work
            self.json.refuse_overlap(tuple(Path(p) for p in args.paths if not Path(p).is_dir()))
        self.single = self._single()

    def _single(self) -> tuple[Path, Path] | None:
        """The one explicit pair when the command line names exactly one (a table is shown)."""
        paths = [Path(p) for p in self.args.paths]
        if len(paths) == 2 and not self.args.find_partners and not any(p.is_dir() for p in paths):
            return paths[0], paths[1]
        if len(paths) == 1 and not paths[0].is_dir():
            return None if not paths[0].exists() else self._lone_partner(paths[0])
        return None

    def _lone_partner(self, path: Path) -> tuple[Path, Path] | None:
        from . import discover

        found = discover.pair_of(path)
        return (found.prototxt, found.caffemodel) if isinstance(found, discover.Pair) else None

    # -- finding the pairs ---------------------------------------------------------------
    def jobs(self) -> Iterator[Job | Note]:
        """Pairs in command-line order; unpaired files as notes."""
        exclude = [self.out_dir] if self.out_dir is not None else []
        files: list[Path] = []
        walked: list[str] = []
        for raw in self.args.paths:
            path = Path(raw)
            if path.is_dir():
                yield from self._files(files)
                files = []
                real = os.path.realpath(path)
                if any(real == w or real.startswith(w.rstrip(os.sep) + os.sep) for w in walked):
                    continue  # inside a tree walked already (bnfix a a/b): every pair was found
                walked.append(real)
                from . import discover  # only for directories (and lone files): explicit pairs skip it

                for found in discover.walk(path, exclude=exclude):
                    if isinstance(found, discover.Pair):
                        yield self._job(found.prototxt, found.caffemodel, found.rel)
                    else:
                        yield Note(found.path, found.reason, found.kind is discover.Why.ERROR)
            else:
                files.append(path)
        yield from self._files(files)

    def _files(self, files: list[Path]) -> Iterator[Job | Note]:
        """File arguments two at a time (PROTOTXT CAFFEMODEL); a file alone (or every file with
        --find-partners) gets its partner from the directory rules."""
        step = 1 if self.args.find_partners else 2
        i = 0
        while i < len(files):
            if step == 2 and i + 1 < len(files):
                yield self._job(files[i], files[i + 1], None)
                i += 2
                continue
            from . import discover

            if not os.path.lexists(files[i]):
                yield Note(files[i], "no such file", True)
                i += 1
                continue
            # A hook runs at the repository root: links inside it (git-annex, DVC) count as inside.
            found = discover.pair_of(files[i], root=Path.cwd() if self.args.find_partners else None)
            if isinstance(found, discover.Pair):
                yield self._job(found.prototxt, found.caffemodel, None)
            elif self.args.find_partners:  # a hook passes every changed file: a solver is no error
                yield Note(found.path, found.reason, found.kind is discover.Why.ERROR)
            else:  # a file named alone must have a partner
                yield Note(found.path, found.reason, found.kind is not discover.Why.SKIPPED)
            i += 1

    def _job(self, pp: Path, mp: Path, rel: Path | None) -> Job:
        return Job(pp, mp, None if self.args.check or self.args.dry_run else self._outputs(pp, mp, rel))

    def _outputs(self, pp: Path, mp: Path, rel: Path | None) -> tuple[Path, Path]:
        """Where a pair goes: beside the inputs as ``<stem>.bnfix<ext>``, into DIR (mirroring
        ``rel``), or in place."""
        if self.args.in_place:
            return pp, mp
        if self.out_dir is not None:
            base = self.out_dir / rel if rel is not None else self.out_dir
            return base / pp.name, base / mp.name
        return pp.with_name(f"{pp.stem}.bnfix{pp.suffix}"), mp.with_name(f"{mp.stem}.bnfix{mp.suffix}")

    # -- the run -------------------------------------------------------------------------
    def all(self) -> int:
        from .errors import BnfixError

        if self.out_dir is not None and self.out_dir.exists() and not self.out_dir.is_dir():
            raise BnfixError(f"{self.out_dir}: exists and is not a directory")
        progress = _Progress(self.console) if self.single is None else None
        try:
            self._each(progress)
        except BaseException:
            if self.json is not None:
                self.json.discard()
            raise
        finally:
            if progress is not None:
                progress.stop()
        if self.console is not None and self.single is None:
            from . import report

            self._print(report.run_line(self.totals, self.failed, self.unpaired))
        if self.json is not None:
            self.code = max(self.code, self.json.close(self.totals, self.written))
        return self.code

    def _each(self, progress: _Progress | None) -> None:
        for job in self.jobs():
            if not isinstance(job, Job):
                self._unpaired(job)
                continue
            key = (os.path.realpath(job.prototxt), os.path.realpath(job.caffemodel))
            if key in self.seen:
                continue
            self.seen.add(key)
            if progress is not None:
                progress.step(job.prototxt)
            self._one(job)

    def _unpaired(self, note: Note) -> None:
        key = (os.path.realpath(note.path), note.reason)
        if key in self.reported:  # the same file reached twice (bnfix a a/b)
            return
        self.reported.add(key)
        line, is_error = f"{note.path}: {note.reason}", note.error
        if is_error:
            _error(line)
            self.code = max(self.code, EXIT_ERROR)
            self.failed += 1
            if self.json is not None:
                self.json.error(line, None, None)
            return
        self.unpaired += 1
        if self.json is not None:
            self.json.unpaired(line)
        if self.console is not None and not self.args.check:
            self._print(f"unpaired: {line}")

    def stopped(self, exc: KeyboardInterrupt) -> str:
        """What is on disk when a signal stopped the run, in one true sentence."""
        from . import commit

        done = f"{self.done} pair(s) before it are done" if self.done else "no pair was finished before it"
        if isinstance(exc, commit.Interrupted):
            return f"{exc}; {done}"
        name = "interrupted" if getattr(exc, "signum", 2) == 2 else f"stopped by signal {exc.signum}"  # type: ignore[attr-defined]
        if self.current is None:
            return f"{name}; {done}"
        if self.current_saved:
            p, m = self.current.outputs or (self.current.prototxt, self.current.caffemodel)
            return f"{name} after {p} and {m} were saved; {done}"
        return f"{name}: nothing was changed for {self.current.prototxt} and {self.current.caffemodel}; {done}"

    def _one(self, job: Job) -> None:
        from .errors import BnfixError

        self.current, self.current_saved = job, False
        try:
            result = self._process(job)
        except BnfixError as exc:
            self._failed(job, str(exc))
            return
        except OSError as exc:
            self._failed(job, f"{exc.filename or job.caffemodel}: {exc.strerror or exc}")
            return
        try:
            self._report(result)
        finally:
            result.close()
        self.done += 1
        self.current = None

    def _failed(self, job: Job, message: str) -> None:
        self.current = None
        _error(message)
        self.failed += 1
        self.code = max(self.code, EXIT_ERROR)
        if self.json is not None:
            self.json.error(message, job.prototxt, job.caffemodel)

    def _process(self, job: Job) -> Result:
        from . import commit, lock, pipeline
        from .errors import BnfixError
        from .result import Mode

        args = self.args
        outs = job.outputs
        inputs = (job.prototxt, job.caffemodel)
        ids = {p: _Ident.of(p) for p in inputs + (outs or ())}
        if outs is not None:
            self._check_outputs(job, outs, ids)
        if self.json is not None:
            self.json.refuse_overlap(inputs + (outs or ()) + _backups(outs, args.in_place))
        exclusive = outs or ()
        shared = [p for p in inputs if outs is None or not any(ids[p].same(ids[o]) for o in outs)]
        owner = f"writing {outs[0]} and {outs[1]}" if outs else f"reading {inputs[0]} and {inputs[1]}"
        created: list[Path] = []  # output directories made here: removed again if the pair fails
        try:
            for out in outs or ():
                try:
                    created += commit.make_dirs(out.parent)
                except OSError as exc:
                    raise BnfixError(f"{out.parent}: cannot create the output directory: "
                                     f"{exc.strerror or exc}") from None
            with lock.acquire(exclusive=exclusive, shared=shared, wait=args.wait, owner=owner):
                for out in outs or ():
                    for stale in commit.sweep(out, self._leftovers):
                        self._note(f"removed {stale}, left by an interrupted bnfix")
                        self._listed[stale.parent].remove(stale.name)
                result = pipeline.revert(*inputs) if args.revert else pipeline.run(*inputs, self.options, Mode.PATCH)
                try:
                    self._finish(job, result, outs)
                except BaseException:
                    result.close()
                    raise
        except BaseException:
            commit.remove_dirs(created)
            raise
        return result

    def _finish(self, job: Job, result: Result, outs: tuple[Path, Path] | None) -> None:
        """Cross-check, then save (or, for --check and --dry-run, only apply and verify)."""
        args = self.args
        if args.darknet_weights:
            from .crosscheck import crosscheck

            result.darknet = crosscheck(job.prototxt, job.caffemodel, Path(args.darknet_weights),
                                        Path(args.darknet_cfg) if args.darknet_cfg else None, self.options.source)
        if outs is None:
            result.apply()  # bad statistics are errors in --check and --dry-run too
            return
        if args.in_place and not result.changed:
            return  # the inputs are the outputs already: rewriting them would only make .orig copies
        result.save(*outs, backup=args.in_place, sync=not args.no_sync,
                    progress=_bytes_progress(self.console, job.caffemodel) if self.single else None, lock=False)
        self.current_saved = True
        self.written.update(Path(os.path.realpath(o)) for o in outs)
        self._tag_output_dir()

    def _tag_output_dir(self) -> None:
        """Mark ``-o DIR`` as a tree of outputs (discover.OUTPUT_TAG) when it lies inside a tree
        this run walks, once it holds a pair, so that a later walk of that tree skips it."""
        from . import discover

        if self.out_dir is None or self._tagged:
            return
        self._tagged = True
        out = os.path.realpath(self.out_dir)
        trees = [os.path.realpath(p) for p in self.args.paths if os.path.isdir(p)]
        if not any(out.startswith(t.rstrip(os.sep) + os.sep) for t in trees):
            return
        try:
            fd = os.open(self.out_dir / discover.OUTPUT_TAG, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return
        except OSError as exc:
            self._note(f"{self.out_dir}: cannot write {discover.OUTPUT_TAG} ({exc.strerror}): later walks of "
                       "a tree that contains it will take its outputs for inputs")
            return
        try:
            os.write(fd, b"bnfix output directory: a walk of a tree that contains it skips it.\n")
        finally:
            os.close(fd)

    def _leftovers(self, directory: Path) -> list[str]:
        """commit.leftovers, listed once per directory and run (a tree's output directory may
        hold thousands of pairs: listing it per pair would cost time quadratic in them)."""
        from . import commit

        if directory not in self._listed:
            self._listed[directory] = commit.leftovers(directory)
        return self._listed[directory]

    def _check_outputs(self, job: Job, outs: tuple[Path, Path], ids: dict[Path, _Ident]) -> None:
        from .errors import UsageError

        for out in outs:
            if Path(ids[out].real) in self.written:
                raise UsageError(f"{out}: already written by an earlier pair of this run")
            if not self.args.in_place:
                for src in (job.prototxt, job.caffemodel):
                    if ids[out].same(ids[src]):
                        raise UsageError(f"{out}: output path is an input file (use --in-place to replace inputs)")
        if ids[outs[0]].same(ids[outs[1]]):
            raise UsageError(f"{outs[0]}: both outputs would get the same path")

    def _report(self, result: Result) -> None:
        from . import report

        args = self.args
        layers = result.layers if (self.console is not None or self.json is not None) else []
        if self.console is not None or self.json is not None:
            self.totals.add(layers)
        else:
            self.totals.counts["pairs"] += 1
        if args.check and result.needs_work:
            self.code = max(self.code, EXIT_WORK)
        if self.json is not None:
            self.json.pair(report.pair_dict(result))
        if self.console is None:
            return
        if self.single is not None or args.verbose:
            self.console.print(report.table(result))
            self.console.print()
        elif not args.check or result.needs_work:
            self._print(report.pair_line(result))

    def _print(self, line: str) -> None:
        from rich.markup import escape

        assert self.console is not None
        self.console.print(escape(line), highlight=False, soft_wrap=True)  # one line, never wrapped

    def _note(self, line: str) -> None:
        if self.console is not None:
            self._print(f"note: {line}")


def _backups(outs: tuple[Path, Path] | None, in_place: bool) -> tuple[Path, ...]:
    if outs is None or not in_place:
        return ()
    return tuple(o.with_name(o.name + ".orig") for o in outs)


class _Ident(NamedTuple):
    """A path's real path and, if it exists, its inode: two paths name the same file when
    either matches (hard links share an inode, a file to be created only a path)."""

    real: str
    inode: tuple[int, int] | None

    @classmethod
    def of(cls, path: Path) -> _Ident:
        real = os.path.realpath(path)
        try:
            st = os.stat(real)
        except OSError:
            return cls(real, None)
        return cls(real, (st.st_dev, st.st_ino))

    def same(self, other: _Ident) -> bool:
        return self.real == other.real or (self.inode is not None and self.inode == other.inode)


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.realpath(a) == os.path.realpath(b) or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _error(message: str) -> None:
    print(f"bnfix: error: {message}", file=sys.stderr)


def _console(args: argparse.Namespace) -> Console:
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


class _Progress:
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


def _bytes_progress(console: Console | None, path: Path) -> Any:
    """A progress callback that shows a bar only on a terminal once the copy has taken > 1 s."""
    if console is None or not console.is_terminal:
        return None
    import time

    total = path.stat().st_size
    start = time.monotonic()
    state: dict[str, Any] = {}

    def update(done: int) -> None:
        if "bar" not in state:
            if time.monotonic() - start < 1.0:
                return
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

            bar = Progress(TextColumn("writing"), BarColumn(), DownloadColumn(), console=console, transient=True)
            state["bar"], state["task"] = bar, bar.add_task("copy", total=total)
            bar.start()
        state["bar"].update(state["task"], completed=done)
        if done >= total:
            state["bar"].stop()

    return update


class _JsonSink:
    """The ``--json`` report, streamed pair by pair (memory stays flat over a large tree) into a
    temp file renamed into place at the end (``-``: stdout)."""

    def __init__(self, target: str):
        self.target = target
        self.path = None if target == "-" else Path(target)
        self.errors: list[dict[str, Any]] = []
        self.unpaired_files: list[str] = []
        self.forbidden: set[str] = set()
        self.refused = False  # the report path was refused (said once, where it was found)
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
        if self._fd is None:
            from . import commit

            self._tmp = commit.temp_name(self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        _write_all(self._fd, text.encode())

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
                _error(f"{self.target}: the JSON report would overwrite a file of this run")
            self.discard()
            return EXIT_ERROR
        tail = (("" if self.count else self._head()) + "\n],\n"
                f'"errors": {json.dumps(self.errors, indent=2)},\n'
                f'"unpaired": {json.dumps(self.unpaired_files, indent=2)},\n'
                f'"totals": {json.dumps(totals.as_dict(), indent=2)}}}\n')
        try:
            self._write(tail)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
                os.replace(self._tmp, self.path)  # type: ignore[arg-type]
        except OSError as exc:
            _error(f"{self.target}: cannot write: {exc.strerror or exc}")
            self.discard()
            return EXIT_ERROR
        return EXIT_OK

    def discard(self) -> None:
        """Remove the unfinished report (a failed or interrupted run leaves none)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tmp is not None and os.path.exists(self._tmp):
            os.unlink(self._tmp)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
