"""A run over many pairs: find them (explicit pairs, single files, whole trees), then lock,
process, save and report each as soon as it is found, so that memory stays flat however many
there are.  The command line (``cli.py``) builds one :class:`Batch` and returns its exit code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from . import output

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator

    from .pipeline import Result

EXIT_OK, EXIT_WORK, EXIT_ERROR = 0, 1, 2


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



class Batch:
    """One invocation: the pairs it finds, each processed and reported as soon as it is found."""

    def __init__(self, args: argparse.Namespace, options: Any):
        self.args, self.options = args, options
        self.out_dir = Path(args.output_dir) if args.output_dir else None
        self.console = None if args.quiet else output.console(args)
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
        self.json = output.JsonSink(args.json) if args.json else None
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
        progress = output.Progress(self.console) if self.single is None else None
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

    def _each(self, progress: output.Progress | None) -> None:
        from . import commit

        for job in self.jobs():
            commit.raise_swallowed()  # a signal Python dropped (commit._keep_swallowed): stop here
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
        commit.raise_swallowed()

    def _unpaired(self, note: Note) -> None:
        key = (os.path.realpath(note.path), note.reason)
        if key in self.reported:  # the same file reached twice (bnfix a a/b)
            return
        self.reported.add(key)
        line, is_error = f"{note.path}: {note.reason}", note.error
        if is_error:
            output.error(line)
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
        output.error(message)
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
        progress = output.BytesProgress.on(self.console, job.caffemodel) if self.single else None
        try:
            result.save(*outs, backup=args.in_place, sync=not args.no_sync, progress=progress, lock=False,
                        on_commit=self._saved)
        finally:
            if progress is not None:
                progress.close()
        self.written.update(Path(os.path.realpath(o)) for o in outs)
        self._tag_output_dir()

    def _saved(self) -> None:
        """Called by the commit, signals held off, as soon as the pair is new: a signal from
        here on is reported as coming after the save."""
        self.current_saved = True

    def _tag_output_dir(self) -> None:
        """Mark ``-o DIR`` as a tree of outputs (discover.OUTPUT_TAG) when it lies inside a tree
        this run walks, once it holds a pair, so that a later walk of that tree skips it."""
        if self.out_dir is None or self._tagged:
            return
        self._tagged = True
        out = os.path.realpath(self.out_dir)
        trees = [os.path.realpath(p) for p in self.args.paths if os.path.isdir(p)]
        if not any(out.startswith(t.rstrip(os.sep) + os.sep) for t in trees):
            return
        from . import discover

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
