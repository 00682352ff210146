"""Issue 8's guarantees, end to end: what the ``bnfix`` command promises on a failure, a signal,
a SIGKILL and a concurrent run, and the exact messages of points 6-8.

1. Fault injection through the CLI (``bnfix.cli.main`` in process): for ``-o DIR`` (new
   nested directories, or over earlier outputs), ``--in-place`` (hard-linked backups, or no
   hard link possible) and ``--revert`` (``-o`` and in place), every system call that
   ``bnfix.commit`` and ``bnfix.copier`` (the caffemodel copy) make in a clean run fails in
   turn (``tests/faults.py``'s proxy), with ENOSPC, EPERM and EIO (and EISDIR where a path is
   opened, linked or renamed).  After each: exit 2 with one pinned ``bnfix: error:`` line
   naming the user's file, every byte and mode of the tree as before, no temp or lock file
   (or, where bnfix absorbs the fault, exit 0 with the correct pair and a pinned warning);
   then the next plain run leaves the reference tree and ``--check`` agrees.  A double fault
   (the rollback fails too) names the new file and the recovery.
2. SIGKILL of a real ``python -m bnfix`` saving a 113 MB model, at random points and between
   the two renames, ``-o`` and in place: only (old, old), (new, new) or (new prototxt, old
   caffemodel); ``--check`` exits 0 only for (new, new); the next run removes the leftovers,
   says so, and completes the pair; the originals and their ``.orig`` backups are never lost.
3. SIGINT, SIGTERM and SIGHUP mid-save: exit 128+N, a message that is true, no temp file; a
   Ctrl-C during start-up prints no traceback from bnfix's code.
4. Two writers on one ``-o`` pair; an in-place writer and a reader; ``--wait 0`` while busy.
5. Points 6-8: ``--json`` never overwrites an output or backup; permission bits, owner and
   group; symlinks; long names; exit 3 for a bug; ``--revert`` with patch options; a
   skipped layer's unknown error; a corrupt marker.

Random kill and signal points come from seeded generators (a different point each round, the
same rounds every run).  Exact moments (mid-copy, between the renames, while reporting) come
from a test hook in the child (``guarantees_helpers.install_hook``) that reports the moment
and waits for the test, so no assertion depends on how long anything takes.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import guarantees_helpers as gh
import pytest
from faults import Calls

import bnfix
from bnfix import commit, copier
from bnfix.cli import main

INPUTS = ("in/m.prototxt", "in/m.caffemodel")
USAGE_TAIL = "PATH [PATH ...]"


# -- fixtures and small helpers --------------------------------------------------------------


@pytest.fixture(autouse=True)
def _plain_process(monkeypatch):
    """No colour or debug settings from the developer's shell; wide lines (nothing compared
    is wrapped); and the signal handlers ``main`` installs are put back afterwards."""
    for var in ("NO_COLOR", "FORCE_COLOR", "LINES", "BNFIX_DEBUG", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("COLUMNS", "400")
    saved = {s: signal.getsignal(s) for s in commit.SIGNALS}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@contextlib.contextmanager
def scratch_dir(tmp_path: Path, tag: str) -> Iterator[Path]:
    """In memory (/dev/shm) where there is one: these tests check logic, not disks, and a
    shared disk should not take gigabytes of test writes; else tmp_path."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = shm / f"bnfix-guarantees-{os.getpid()}-{tag}"
    gh.remove(path)
    path.mkdir()
    try:
        yield path
    finally:
        gh.remove(path)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    with scratch_dir(tmp_path, tmp_path.name) as path:
        yield path


def cli(capsys, cwd: Path, *args: str) -> tuple[int, str, str]:
    """``main([...])`` in process, run from ``cwd`` so that messages show the paths as typed."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        code = main([str(a) for a in args])
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    return code, out, err


@contextlib.contextmanager
def faulty(calls: Calls) -> Iterator[None]:
    """Route every system call of the commit layer and of the caffemodel copy through ``calls``."""
    saved = commit.os, copier.os
    commit.os, copier.os = calls.os_for("commit"), calls.os_for("copier")  # type: ignore[assignment]
    try:
        yield
    finally:
        commit.os, copier.os = saved


def one_error(err: str) -> str:
    """stderr is exactly one ``bnfix: error:`` line and no traceback; return its message."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfix: error: "), err
    return lines[0][len("bnfix: error: "):]


def removed_notes(out: str) -> list[str]:
    return sorted(l for l in out.splitlines() if l.startswith("note: removed "))


def note_for(path: str) -> str:
    return f"note: removed {path}, left by an interrupted bnfix"


# -- 1. fault injection through the CLI -----------------------------------------------------


class Scenario(NamedTuple):
    name: str
    args: tuple[str, ...]  # after the two inputs
    outputs: tuple[str, str]
    earlier: bool = False  # the output directory holds an earlier run's pair (--source opencv)
    deny: tuple[tuple[str, int], ...] = ()  # every such call fails (no hard links here)
    patched: bool = False  # the inputs are a patched pair (for --revert)

    @property
    def in_place(self) -> bool:
        return "--in-place" in self.args

    @property
    def check(self) -> int:
        """What --check says of the pair written: done (0), or reverted: work to do (1)."""
        return 1 if "--revert" in self.args else 0

    @property
    def order(self) -> tuple[str, str]:
        """The order of the two renames: the prototxt first for a patch, the caffemodel first
        for a revert (what a SIGKILL between them can leave is then never "done")."""
        return self.outputs[::-1] if "--revert" in self.args else self.outputs


SCENARIOS = [
    Scenario("-o into new nested directories", ("-o", "out/sub"), ("out/sub/m.prototxt", "out/sub/m.caffemodel")),
    Scenario("-o over earlier outputs", ("-o", "out"), ("out/m.prototxt", "out/m.caffemodel"), earlier=True),
    Scenario("--in-place", ("--in-place",), INPUTS),
    Scenario("--in-place, no hard links", ("--in-place",), INPUTS, deny=(("link", errno.EPERM),)),
    Scenario("--revert -o", ("--revert", "-o", "out"), ("out/m.prototxt", "out/m.caffemodel"), patched=True),
    Scenario("--revert --in-place", ("--revert", "--in-place"), INPUTS, patched=True),
]
BASIC_ERRNOS = (errno.ENOSPC, errno.EPERM, errno.EIO)
PATH_CALLS = frozenset({"open", "replace", "rename", "link"})  # where EISDIR can come from


def errnos_for(call: str) -> tuple[int, ...]:
    return BASIC_ERRNOS + ((errno.EISDIR,) if call in PATH_CALLS else ())


def build(root: Path, sc: Scenario, capsys) -> None:
    """The scenario's starting tree: the tiny pair in ``in/`` (modes 0600 and 0640; for
    ``patched``, as a patch wrote it) and, for ``earlier``, the outputs of an earlier run for
    another source."""
    p, m = gh.write_tiny(root / ("src" if sc.patched else "in"))
    p.chmod(0o600)
    m.chmod(0o640)
    if sc.patched:
        assert cli(capsys, root, "src/m.prototxt", "src/m.caffemodel", "-o", "in", "-q") == (0, "", "")
        gh.remove(root / "src")
    if sc.earlier:
        assert cli(capsys, root, *INPUTS, *sc.args, "--source", "opencv", "-q") == (0, "", "")


def message_patterns(sc: Scenario, err_no: int) -> dict[str, str]:
    """Every message a single failing call may give, by what it says happened."""
    p, m = (re.escape(x) for x in sc.outputs)
    first, second = (re.escape(x) for x in sc.order)
    either = f"(?:{p}|{m})"
    why = re.escape(os.strerror(err_no))
    parents = [Path(sc.outputs[0]).parent, *Path(sc.outputs[0]).parent.parents][:-1]
    new_dir = "|".join(re.escape(str(d)) for d in parents)
    return {
        "output directory not created": rf"(?:{new_dir}): cannot create the output directory: {why}",
        "write failed": rf"{either}: cannot write: {why}; nothing was changed",
        "first rename or rollback link failed": rf"{either}: cannot replace: {why}; nothing was changed",
        "backup failed": rf"{either}: cannot create the backup {either}\.orig: {why}; nothing was changed",
        "second rename failed, first undone": (rf"{second}: cannot replace: {why}; {first} was (?:put back|removed "
                                               rf"again), so nothing "
                                               rf"was changed"),
        "directory sync failed, both undone": (rf"{first}: cannot sync its directory: {why}; (?:{first} and {second} "
                                               rf"were (?:put back|removed again)|{either} was put back and {either} "
                                               rf"was removed again), so nothing was changed"),
        "sweep failed": rf"{either}: cannot look for temp files left by an earlier bnfix: {why}",
    }


def classify(message: str, sc: Scenario, err_no: int) -> str:
    for kind, pattern in message_patterns(sc, err_no).items():
        if re.fullmatch(pattern, message):
            return kind
    raise AssertionError(f"unexpected message: {message!r}")


ABSORBED_WARNINGS = (
    r"warning: (?:in/m\.prototxt|in/m\.caffemodel): owner and group \d+:\d+ not kept \(Operation not permitted\); "
    r"the new file belongs to \d+:\d+",
    r"warning: (?P<name>\S+): could not remove the rollback link (?P<link>\S+\.bnfix-old) \([^)]*\); the next "
    r"bnfix run there removes it",
)


def absorbed(out: str) -> list[str]:
    """The rollback links a successful run's warnings say it left (every warning must be one of
    the two a successful save may give)."""
    links = []
    for line in out.splitlines():
        if not line.startswith("warning:"):
            continue
        match = next((re.fullmatch(w, line) for w in ABSORBED_WARNINGS if re.fullmatch(w, line)), None)
        assert match is not None, line
        if match.groupdict().get("link"):
            links.append(match["link"])
    return links


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_every_failing_call_of_a_save_leaves_the_pair_old_or_new_and_the_next_run_fixes_it(scratch, capsys, sc):
    template = scratch / "template"
    build(template, sc, capsys)
    deny = dict(sc.deny)

    # The reference: a clean run, and its call log (the calls to fail in turn).
    ref = scratch / "ref"
    shutil.copytree(template, ref, symlinks=True)
    clean = Calls(deny=deny)
    with faulty(clean):
        code, out, err = cli(capsys, ref, *INPUTS, *sc.args)
    assert (code, err) == (0, ""), err
    new = gh.tree(ref)
    assert gh.leftovers(ref) == []
    assert cli(capsys, ref, *sc.outputs, "--check", "-q") == (sc.check, "", "")
    assert len(clean.log) > 20, clean.names()
    renamed = [Path(args[1]).name for _, call, args in clean.log if call == "replace" and str(args[0]).endswith(
        commit.TMP) and not str(args[1]).endswith(".orig")]
    assert renamed == [Path(x).name for x in sc.order]
    if sc.in_place:
        old = gh.tree(template)
        assert new["in/m.prototxt.orig"] == old["in/m.prototxt"] and new["in/m.caffemodel.orig"] == old["in/m.caffemodel"]
        assert new["in/m.prototxt"][1] == 0o600 and new["in/m.caffemodel"][1] == 0o640

    outcomes: collections.Counter[str] = collections.Counter()
    for number, (module, call, _) in enumerate(clean.log):
        for err_no in errnos_for(call):
            where = f"call {number} {module}.{call} failing with {errno.errorcode[err_no]}"
            root = scratch / "run"
            gh.remove(root)
            shutil.copytree(template, root, symlinks=True)
            before = gh.tree(root)
            calls = Calls({number: err_no}, deny=deny)
            with faulty(calls):
                code, out, err = cli(capsys, root, *INPUTS, *sc.args)
            assert calls.injected == [(number, module, call, err_no)], where
            links: list[str] = []
            if code == 0:  # a fault bnfix may absorb: a fallback copy, a warning
                assert err == "", (where, err)
                links = absorbed(out)
                left = gh.leftovers(root)
                assert left == sorted(links), (where, left, out)
                assert {k: v for k, v in gh.tree(root).items() if k not in left} == new, where
                outcomes["absorbed: the pair is new"] += 1
            else:
                assert code == 2, (where, code, out, err)
                kind = classify(one_error(err), sc, err_no)
                assert ".bnfix-" not in err, (where, err)  # never a temp, rollback or lock file
                assert out == "", (where, out)
                assert gh.tree(root) == before, where  # entirely old: every byte and mode as before
                assert gh.leftovers(root) == [], where
                outcomes[kind] += 1
            # The next plain run leaves the reference pair, and --check agrees.
            code, out, err = cli(capsys, root, *INPUTS, *sc.args)
            assert (code, err) == (0, ""), (where, err)
            assert removed_notes(out) == sorted(note_for(link) for link in links), (where, out)
            assert gh.tree(root) == new, where
            assert cli(capsys, root, *sc.outputs, "--check", "-q") == (sc.check, "", ""), where
    # every kind of outcome the scenario can produce was produced
    expected = {"write failed", "first rename or rollback link failed", "second rename failed, first undone",
                "directory sync failed, both undone", "sweep failed", "absorbed: the pair is new"}
    if sc.in_place:
        expected |= {"backup failed"}
    if "nested" in sc.name:
        expected |= {"output directory not created"}
    assert expected <= set(outcomes), outcomes


@pytest.mark.parametrize("sc", [SCENARIOS[1], SCENARIOS[2]], ids=[SCENARIOS[1].name, SCENARIOS[2].name])
def test_a_failed_rollback_names_the_new_file_and_the_recovery_and_the_next_run_completes_the_pair(
        scratch, capsys, sc):
    """Two faults: the second rename fails (EIO) and so does putting the first file back
    (EPERM).  The one message says which file is new and where the old one is (the only
    message allowed to name a bnfix file: the recovery); --check never calls it done."""
    root = scratch / "root"
    build(root, sc, capsys)
    before = gh.tree(root)
    probe_root = scratch / "probe"
    shutil.copytree(root, probe_root, symlinks=True)
    probe = Calls()
    with faulty(probe):
        assert cli(capsys, probe_root, *INPUTS, *sc.args, "-q")[0] == 0
    new = gh.tree(probe_root)
    renames = [i for i, (_, call, args) in enumerate(probe.log)
               if call == "replace" and str(args[0]).endswith(commit.TMP)]
    second = renames[1]
    calls = Calls({second: errno.EIO, second + 1: errno.EPERM})
    with faulty(calls):
        code, out, err = cli(capsys, root, *INPUTS, *sc.args)
    assert calls.log[second + 1][1] == "replace" and len(calls.injected) == 2
    p, m = sc.outputs
    message = one_error(err)
    assert code == 2 and out == ""
    if sc.in_place:
        assert message == (f"{m}: cannot replace: Input/output error; putting {p} back failed too (Operation not "
                           f"permitted), so the pair is mixed: {p} is new, {m} is old; restore {p} from {p}.orig")
        assert gh.tree(root)[f"{p}.orig"][0] == before[p][0]  # the original is safe
    else:
        link = re.fullmatch(rf"{re.escape(m)}: cannot replace: Input/output error; putting {re.escape(p)} back failed "
                            rf"too \(Operation not permitted\), so the pair is mixed: {re.escape(p)} is new, "
                            rf"{re.escape(m)} is old; the old {re.escape(p)} is (out/\.m\.prototxt\.[0-9a-f]{{12}}"
                            rf"\.bnfix-old)", message)
        assert link, message
        assert gh.tree(root)[link[1]][0] == before[p][0]  # the old prototxt is where it says
    now = gh.tree(root)
    assert now[p] == new[p] and now[m] == before[m]  # as the message says: p new, m old
    code, _, err = cli(capsys, root, p, m, "--check", "-q")
    if sc.in_place:  # the marked prototxt beside the original caffemodel: work to do
        assert (code, err) == (1, "")
    else:  # beside the earlier run's caffemodel: two different patches, refused
        assert code == 2 and re.fullmatch(
            rf"{re.escape(p)} and {re.escape(m)}: layer 'bn1' was patched by two different bnfix runs \(stats "
            r"[0-9a-f]{12} in the prototxt, [0-9a-f]{12} in the caffemodel\): restore both files from the same run "
            r"\(e\.g\. m\.prototxt\.orig and m\.caffemodel\.orig after --in-place\) and run bnfix again",
            one_error(err)), err
    # the next plain run completes the pair and removes the rollback link
    code, out, err = cli(capsys, root, *INPUTS, *sc.args)
    assert (code, err) == (0, "")
    assert removed_notes(out) == sorted(note_for(k) for k in now if k.endswith(commit.OLD))
    assert gh.tree(root) == new and gh.leftovers(root) == []
    assert cli(capsys, root, p, m, "--check", "-q") == (0, "", "")


@pytest.mark.parametrize("err_no", BASIC_ERRNOS, ids=errno.errorcode.get)
def test_a_failed_mkdir_of_the_output_directory_is_one_line_and_changes_nothing(scratch, capsys, err_no):
    gh.write_tiny(scratch / "in")
    before = gh.tree(scratch)
    calls = Calls({0: err_no})
    with faulty(calls):
        code, out, err = cli(capsys, scratch, *INPUTS, "-o", "out")
    assert calls.injected == [(0, "commit", "mkdir", err_no)]
    assert (code, out) == (2, "")
    assert one_error(err) == f"out: cannot create the output directory: {os.strerror(err_no)}"
    assert gh.tree(scratch) == before


def test_a_failed_mkdir_deep_in_new_output_directories_leaves_none_of_them(scratch, capsys):
    """Regression: out/ used to be left behind (fixed in 437ecda)."""
    gh.write_tiny(scratch / "in")
    before = gh.tree(scratch)
    calls = Calls({1: errno.ENOSPC})
    with faulty(calls):
        code, out, err = cli(capsys, scratch, *INPUTS, "-o", "out/sub")
    assert calls.injected == [(1, "commit", "mkdir", errno.ENOSPC)]
    assert (code, out) == (2, "")
    assert one_error(err) == "out/sub: cannot create the output directory: No space left on device"
    assert gh.tree(scratch) == before  # out/ is gone again


# -- a large model, for real processes -------------------------------------------------------


class Huge(NamedTuple):
    """The sample with its first convolution grown to 113 MB, and its reference patches."""

    base: Path
    pristine: Path  # m.prototxt, m.caffemodel: never written (linked into every round)
    raw: Path  # a copy of them (other inodes): a raw pair already where the outputs go
    ref: Path  # what `bnfix pristine/m.* -o ref` writes
    ref_opencv: Path  # ... with --source opencv
    digests: dict[str, str]  # "ref/m.caffemodel" -> sha1, for pristine, ref and ref_opencv


NAMES = ("m.prototxt", "m.caffemodel")


@pytest.fixture(scope="module")
def huge(tmp_path_factory) -> Iterator[Huge]:
    with scratch_dir(tmp_path_factory.mktemp("huge"), "huge") as base:
        pristine = base / "pristine"
        pristine.mkdir()
        (pristine / "m.prototxt").write_bytes(gh.SAMPLE_P.read_bytes())
        data = gh.huge_caffemodel(gh.SAMPLE_M.read_bytes(), "layer1-conv", 1 << 20)
        assert len(data) >= 100 << 20
        (pristine / "m.caffemodel").write_bytes(data)
        del data
        raw = base / "raw"
        raw.mkdir()
        for name in NAMES:
            shutil.copyfile(pristine / name, raw / name)
        saved = {s: signal.getsignal(s) for s in commit.SIGNALS}
        cwd = os.getcwd()
        os.chdir(base)
        try:
            assert main(["pristine/m.prototxt", "pristine/m.caffemodel", "-o", "ref", "-q"]) == 0
            assert main(["pristine/m.prototxt", "pristine/m.caffemodel", "-o", "ref_opencv", "--source", "opencv",
                         "-q"]) == 0
        finally:
            os.chdir(cwd)
            for s, h in saved.items():
                signal.signal(s, h)
        digests = {f"{d}/{n}": gh.digest(base / d / n) for d in ("pristine", "ref", "ref_opencv") for n in NAMES}
        assert len({digests[f"{d}/m.caffemodel"] for d in ("pristine", "ref", "ref_opencv")}) == 3
        yield Huge(base, pristine, raw, base / "ref", base / "ref_opencv", digests)


@pytest.fixture
def arena(huge: Huge, request) -> Iterator[Path]:
    """A directory beside the pristine files (hard links need the same file system); the test's
    children still running are killed (by their pids) and the directory removed afterwards."""
    path = huge.base / "arena" / re.sub(r"\W+", "_", request.node.name)[:100]
    gh.remove(path)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        for child in CHILDREN:
            if child.poll() is None:
                child.kill()
                child.communicate()
        CHILDREN.clear()
        gh.remove(path)


CHILDREN: list = []  # every child a test starts, so that a failing test leaves none running


def spawn(args, cwd: Path, **kwargs):
    child = gh.bnfix([str(a) for a in args], cwd, **kwargs)
    CHILDREN.append(child)
    return child


def fresh(arena: Path, name: str, huge: Huge, *, out: str | None = None) -> Path:
    """A round's tree: ``in/`` holding links to the pristine pair (and ``out``, if given,
    links to the raw copy: a raw pair already sitting where the outputs go)."""
    root = arena / name
    gh.link_tree(huge.pristine, root / "in")
    if out is not None:
        gh.link_tree(huge.raw, root / out)
    return root


def which(path: Path, huge: Huge) -> str:
    """What a file of the pair is: "old" (the pristine file or its raw copy itself), "new"
    (exactly the reference patch), "absent", or "other" (which must never be seen)."""
    if not path.exists():
        return "absent"
    if any(os.path.samefile(path, d / path.name) for d in (huge.pristine, huge.raw)):
        return "old"
    if path.stat().st_size == (huge.ref / path.name).stat().st_size and \
            gh.digest(path) == huge.digests[f"ref/{path.name}"]:
        return "new"
    return "other"


def originals_intact(root: Path, huge: Huge, in_place: bool) -> None:
    """The user's originals: the inputs (``-o``) or their ``.orig`` backups (in place) are
    the pristine files themselves."""
    for name in NAMES:
        keep = root / "in" / (name + ".orig" if in_place else name)
        if in_place and not keep.exists():
            continue
        assert os.path.samefile(keep, huge.pristine / name), keep


def pristine_unchanged(huge: Huge) -> None:
    """The files every round linked to still hold their bytes (bnfix never wrote into them)."""
    for name in NAMES:
        for d in (huge.pristine, huge.raw):
            assert gh.digest(d / name) == huge.digests[f"pristine/{name}"], d / name


def run_mode(mode: str) -> tuple[tuple[str, str], list[str], str]:
    """(the pair written, the arguments, the directory the temp files go to)."""
    if mode == "-o":
        return ("out/m.prototxt", "out/m.caffemodel"), [*INPUTS, "-o", "out"], "out"
    return INPUTS, [*INPUTS, "--in-place"], "in"


# -- 2. SIGKILL at random points -------------------------------------------------------------


KILL_PLAN = ["from the start"] * 6 + ["during the save"] * 6 + ["between the renames"] * 2


@pytest.mark.parametrize("mode", ["-o", "--in-place"])
def test_sigkill_at_random_points_never_leaves_a_pair_that_looks_done(huge, arena, capsys, mode):
    """A real ``python -m bnfix`` saving the 113 MB pair is SIGKILLed: at a random moment of
    its whole run, at a random moment after its first temp file appears, or between the two
    renames (a test hook pauses there).  ``-o`` rounds alternate between a new output
    directory and one holding a raw copy of the pair."""
    rng = random.Random(f"sigkill {mode}")
    outs, args, temp_dir = run_mode(mode)
    in_place = mode == "--in-place"

    root = fresh(arena, "calibration", huge)
    t0 = time.monotonic()
    child = spawn([*args, "-q"], root)
    assert gh.wait_for(lambda: gh.temps(root / temp_dir) or child.poll() is not None)
    t_save = time.monotonic() - t0
    assert child.communicate(timeout=120) == ("", "") and child.returncode == 0
    t_run = time.monotonic() - t0
    assert (which(root / outs[0], huge), which(root / outs[1], huge)) == ("new", "new")

    outcomes: collections.Counter[str] = collections.Counter()
    swept_total = 0
    for i, how in enumerate(KILL_PLAN):
        root = fresh(arena, f"round{i}", huge, out="out" if mode == "-o" and i % 2 else None)
        p, m = root / outs[0], root / outs[1]
        before = (which(p, huge), which(m, huge))
        assert before in {("old", "old"), ("absent", "absent")}
        pipe = None
        if how == "between the renames":
            pipe = gh.HookPipe()
            child = spawn([*args, "-q"], root, env=pipe.env("pause-after-rename", arena / "hook"), pass_fds=pipe.fds)
            pipe.started()
            assert pipe.line() == "renamed 1"
        elif how == "from the start":
            child = spawn([*args, "-q"], root)
            time.sleep(rng.uniform(0, t_run))
        else:
            child = spawn([*args, "-q"], root)
            assert gh.wait_for(lambda c=child, d=root / temp_dir: gh.temps(d) or c.poll() is not None)
            time.sleep(rng.uniform(0, max(t_run - t_save, 0.01)))
        child.kill()
        child.communicate(timeout=120)
        if pipe is not None:
            pipe.close()

        now = (which(p, huge), which(m, huge))
        state = {before: "old, old", ("new", "new"): "new, new", ("new", before[1]): "new prototxt, old caffemodel"}
        assert now in state, (how, before, now)  # never old prototxt + new caffemodel, never a torn file
        if how == "between the renames":
            assert now == ("new", before[1])
        outcomes[state[now]] += 1
        originals_intact(root, huge, in_place)

        # --check calls it done only when it is
        code, out, err = cli(capsys, root, *outs, "--check", "-q")
        if now == ("new", "new"):
            assert (code, out, err) == (0, "", ""), (how, err)
        else:
            assert code != 0, (how, now)
            if "absent" not in now:
                assert (code, out, err) == (1, "", ""), (how, now, err)

        # the next plain run removes what the killed one left, says so, and completes the pair
        left = gh.leftovers(root)
        swept = [x for x in left if not x.endswith(".bnfix-lock")]
        swept_total += len(swept)
        code, out, err = cli(capsys, root, *args)
        assert (code, err) == (0, ""), (how, err)
        assert removed_notes(out) == sorted(note_for(x) for x in swept), (how, left, out)
        assert (which(p, huge), which(m, huge)) == ("new", "new"), how
        assert gh.leftovers(root) == []
        originals_intact(root, huge, in_place)
        if in_place:
            assert all((root / "in" / (n + ".orig")).exists() for n in NAMES)
        assert cli(capsys, root, *outs, "--check", "-q") == (0, "", "")
        gh.remove(root)
    assert outcomes["new prototxt, old caffemodel"] >= 2 and outcomes["old, old"] >= 1, outcomes
    assert swept_total > 0
    pristine_unchanged(huge)


# -- 3. signals ------------------------------------------------------------------------------


SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
FIRST_PAIR = "no pair was finished before it"  # how a signal's message ends when it stops the first pair


def stopped(signum: int) -> str:
    """How the CLI names a signal that stopped it outside a commit."""
    return "interrupted" if signum == signal.SIGINT else f"stopped by signal {signum}"


def nothing_written(signum: int, inputs: tuple[str, str] = INPUTS) -> set[str]:
    """Every true message for a signal that came before anything was written: before the
    run began, before the first pair was read, while it was processed, or in the commit."""
    return {f"bnfix: error: {line}\n" for line in (
        "interrupted; nothing was written for the pair in progress",  # cli.main, before the run began
        "interrupted while starting; nothing was changed",  # while Python loads bnfix
        f"{stopped(signum)}; {FIRST_PAIR}",
        f"{stopped(signum)}: nothing was changed for {inputs[0]} and {inputs[1]}; {FIRST_PAIR}",
    )}


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_mid_save_exits_128_plus_n_with_a_true_message_and_no_temp_file(huge, arena, signum):
    """Per mode: the signal while the caffemodel is being copied (a hook pauses the copy:
    "nothing was changed"), at a random moment after the first temp file appears (whatever
    happened, the message must say it), and between the two renames (held off: "after the
    commit ... are new")."""
    name = signal.Signals(signum).name
    rng = random.Random(f"signal {name}")
    said: collections.Counter[str] = collections.Counter()
    for mode in ("-o", "--in-place"):
        outs, args, temp_dir = run_mode(mode)
        for how in ("while copying", "during the save", "between the renames"):
            root = fresh(arena, f"{mode}-{how}", huge)
            before = gh.inodes(root)
            pipe = None
            if how == "during the save":
                child = spawn([*args, "-q"], root)
                assert gh.wait_for(lambda c=child, d=root / temp_dir: gh.temps(d) or c.poll() is not None)
                time.sleep(rng.uniform(0, 0.05))
            else:
                pipe = gh.HookPipe()
                hook = "pause-in-copy" if how == "while copying" else "pause-after-rename"
                child = spawn([*args, "-q"], root, env=pipe.env(hook, arena / "hook"), pass_fds=pipe.fds)
                pipe.started()
                assert pipe.line() == ("copying" if how == "while copying" else "renamed 1")
            child.send_signal(signum)
            if pipe is not None:
                pipe.go()  # (a pause in the copy was interrupted by the signal already)
            out, err = child.communicate(timeout=120)
            if pipe is not None:
                pipe.close()
            p, m = outs
            now = (which(root / p, huge), which(root / m, huge))
            unchanged = (f"bnfix: error: interrupted by {name}; nothing was changed: {p} and {m} are as before; "
                         f"{FIRST_PAIR}\n")
            committed = f"bnfix: error: interrupted by {name} after the commit: {p} and {m} are new; {FIRST_PAIR}\n"
            saved = f"bnfix: error: {stopped(signum)} after {p} and {m} were saved; {FIRST_PAIR}\n"
            where = (mode, how, child.returncode, err)
            assert out == "", where
            if (child.returncode, err) == (128 + signum, unchanged):
                assert gh.inodes(root) == before, where
                said["nothing was changed"] += 1
            elif (child.returncode, err) == (128 + signum, committed):
                assert now == ("new", "new"), where
                said["after the commit"] += 1
            elif (child.returncode, err) == (128 + signum, saved):  # after the commit (about 1 round in 150)
                assert now == ("new", "new"), where
                said["after the pair was saved"] += 1
            else:
                # the signal came once bnfix's verdict was final (it ignores one then, also
                # while Python shuts down): the pair is complete and nothing is claimed
                assert child.returncode == 0 and err == "", where
                assert now == ("new", "new"), where
                said["it had finished"] += 1
            if how == "while copying":
                assert err == unchanged and child.returncode == 128 + signum, where
            if how == "between the renames":
                assert err == committed and child.returncode == 128 + signum, where
            assert gh.leftovers(root) == [], where  # no temp, rollback link or lock file
            originals_intact(root, huge, mode == "--in-place")
            gh.remove(root)
    assert said["nothing was changed"] >= 2 and said["after the commit"] >= 2, said
    pristine_unchanged(huge)


def _sample_pair(tmp_path: Path, capsys) -> tuple[Path, dict[str, str]]:
    """The sample in tmp_path/in and the digests of its reference patch."""
    (tmp_path / "in").mkdir()
    for name, src in zip(NAMES, (gh.SAMPLE_P, gh.SAMPLE_M)):
        shutil.copyfile(src, tmp_path / "in" / name)
    assert cli(capsys, tmp_path, *INPUTS, "-o", "ref", "-q") == (0, "", "")
    return tmp_path, {n: gh.digest(tmp_path / "ref" / n) for n in NAMES}


@pytest.mark.parametrize("mode", [
    "--in-place",
    "-o",
])
def test_a_signal_after_the_pair_was_saved_says_which_files_are_new(tmp_path, capsys, mode):
    """SIGTERM while the summary is printed (a hook pauses there), after the commit: the pair is
    new and the message names the new files.  (Regression: it said "nothing was written for
    the pair in progress" until 437ecda.)"""
    root, ref = _sample_pair(tmp_path, capsys)
    outs, args, _ = run_mode(mode)
    pipe = gh.HookPipe()
    child = gh.bnfix(args, root, env=pipe.env("pause-in-report", tmp_path / "hook"), pass_fds=pipe.fds)
    try:
        pipe.started()
        assert pipe.line() == "reporting"
        child.send_signal(signal.SIGTERM)
        pipe.go()
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
        pipe.close()
    assert {n: gh.digest(root / o) for n, o in zip(NAMES, outs)} == ref  # the pair is new ...
    assert gh.leftovers(root) == [] and child.returncode == 143
    assert err == f"bnfix: error: stopped by signal 15 after {outs[0]} and {outs[1]} were saved; {FIRST_PAIR}\n"


@pytest.mark.parametrize("mode", ["-o", "--in-place"])
def test_a_signal_the_moment_the_commit_returns_says_the_pair_is_new(tmp_path, capsys, monkeypatch, mode):
    """A Ctrl-C on the very bytecode after ``commit.commit`` returned.  (Regression: the CLI
    recorded the save only after ``save()`` returned, so this said "nothing was changed" of a
    pair that was new; now the commit records it with signals still held off.)"""
    root, ref = _sample_pair(tmp_path, capsys)
    outs, args, _ = run_mode(mode)
    real = commit.commit

    def commit_then_ctrl_c(*a, **kw):
        real(*a, **kw)
        raise commit.Terminated(signal.SIGINT)

    monkeypatch.setattr(commit, "commit", commit_then_ctrl_c)
    assert cli(capsys, root, *args) == (
        130, "", f"bnfix: error: interrupted after {outs[0]} and {outs[1]} were saved; {FIRST_PAIR}\n")
    assert {n: gh.digest(root / o) for n, o in zip(NAMES, outs)} == ref and gh.leftovers(root) == []


def _hooked(root: Path, args: list[str], hook: str, event: str) -> tuple[int, str, str]:
    """``python -m bnfix ARGS`` in ``root`` with test HOOK, which must report EVENT; returns
    (exit code, stdout, stderr)."""
    pipe = gh.HookPipe()
    child = gh.bnfix(args, root, env=pipe.env(hook, root / "hook"), pass_fds=pipe.fds)
    try:
        pipe.started()
        assert pipe.line() == event
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
        pipe.close()
    return child.returncode, out, err


@pytest.mark.parametrize("hook", ["sigint-after:bnfix.cli.main", "sigint-at-exit"])
def test_a_signal_once_the_verdict_is_final_changes_nothing(tmp_path, capsys, hook):
    """A Ctrl-C as ``main`` returns, or while Python shuts down.  (Regression: the first raised
    KeyboardInterrupt outside every handler, a traceback; the second, after Python had reset
    its handlers, killed the finished run: a clean-clone CI run, 2026-12-01, saw -SIGINT with
    the new pair on disk.)  The run's verdict stands: exit 0, nothing on stderr."""
    root, ref = _sample_pair(tmp_path, capsys)
    event = "after main" if "after" in hook else "exiting"
    assert _hooked(root, [*INPUTS, "-o", "out", "-q"], hook, event) == (0, "", "")
    assert {n: gh.digest(root / "out" / n) for n in NAMES} == ref and gh.leftovers(root) == []


def test_a_second_signal_while_the_first_is_handled_is_ignored(tmp_path, capsys):
    """Ctrl-C mid-copy, then another while bnfix cleans up (removing the output directory it
    made).  The second must not cut the cleanup short or replace the first one's message."""
    root, _ = _sample_pair(tmp_path, capsys)
    pipe = gh.HookPipe()
    env = pipe.env("pause-in-copy,sigint-in:bnfix.commit.remove_dirs", tmp_path / "hook")
    child = gh.bnfix([*INPUTS, "-o", "out"], root, env=env, pass_fds=pipe.fds)
    try:
        pipe.started()
        assert pipe.line() == "copying"
        child.send_signal(signal.SIGINT)
        assert pipe.line() == "in remove_dirs"
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
        pipe.close()
    assert (child.returncode, out) == (130, "")
    assert err == ("bnfix: error: interrupted by SIGINT; nothing was changed: out/m.prototxt and out/m.caffemodel "
                   f"are as before; {FIRST_PAIR}\n")
    assert not (root / "out").exists() and gh.leftovers(root) == []


def _bnfix_frames(err: str) -> list[str]:
    """The frames of a traceback that lie in bnfix's own code."""
    package = str(Path(commit.__file__).parent)
    return [f for f in re.findall(r'File "([^"]+)", line \d+', err) if f.startswith(package)]


IMPORT_BUG = ("BUG: Ctrl-C while bnfix/__main__.py runs `from .cli import main` (outside main()'s "
              "KeyboardInterrupt handler) prints a KeyboardInterrupt traceback")
INIT_BUG = ("BUG: Ctrl-C while bnfix/__init__.py runs `from typing import ...` (imported by runpy before "
            "__main__) prints a KeyboardInterrupt traceback")


@pytest.mark.parametrize("module", [
    pytest.param("bnfix.cli@bnfix/__main__.py", id="bnfix.cli"),
    pytest.param("typing@bnfix/__init__.py", id="typing-from-bnfix-init"),
])
def test_ctrl_c_while_python_loads_bnfix_prints_no_traceback(tmp_path, capsys, module):
    """A Ctrl-C at an exact moment of start-up (a hook sends it while bnfix's own code imports
    MODULE).  Where bnfix no longer imports it there, there is no such moment: it just runs."""
    root, _ = _sample_pair(tmp_path, capsys)
    pipe = gh.HookPipe()
    child = gh.bnfix([*INPUTS, "-o", "out"], root, env=pipe.env(f"sigint-on-import:{module}", tmp_path / "hook"),
                     pass_fds=pipe.fds)
    pipe.started()
    event = pipe.line()
    _, err = child.communicate(timeout=120)
    pipe.close()
    assert _bnfix_frames(err) == [] and "Traceback" not in err, err
    if event == "":  # not imported from there (any more): no window
        assert child.returncode == 0 and err == "", err
        return
    assert event == f"importing {module.partition('@')[0]}"
    assert not (root / "out").exists() and gh.leftovers(root) == []
    assert child.returncode == 130 and err in {"", *nothing_written(signal.SIGINT)}, (child.returncode, err)


def test_ctrl_c_while_a_class_is_created_mid_run_is_an_interrupt_not_a_bug(tmp_path, capsys):
    """A Ctrl-C inside a ``__set_name__`` while bnfix first imports its caffemodel module, after
    the run began.  Python 3.10 and 3.11 wrap it in a RuntimeError, which bnfix once reported as
    "internal error ... (a bug in bnfix)" with exit 3 (CI, 2026-12-01, on Python 3.11)."""
    root, _ = _sample_pair(tmp_path, capsys)
    assert _hooked(root, [*INPUTS, "-o", "out"], "sigint-in-set-name:bnfix.caffemodel", "creating Blob") == (
        130, "", f"bnfix: error: interrupted: nothing was changed for {INPUTS[0]} and {INPUTS[1]}; {FIRST_PAIR}\n")
    assert not (root / "out").exists() and gh.leftovers(root) == []


def test_ctrl_c_that_python_swallows_still_stops_bnfix_before_it_writes(tmp_path, capsys):
    """A Ctrl-C inside a ``__del__`` while bnfix first imports its caffemodel module (for the
    first pair).  Python cannot raise it there; it printed "Exception ignored in ..." with a
    traceback through bnfix's signal handler, and the run went on (CI, 2026-12-01, in the
    import system's module-lock weakref callback).  bnfix keeps it and stops at the commit."""
    root, _ = _sample_pair(tmp_path, capsys)
    assert _hooked(root, [*INPUTS, "-o", "out"], "sigint-in-del:bnfix.caffemodel", "importing bnfix.caffemodel") == (
        130, "", "bnfix: error: interrupted by SIGINT; nothing was changed: out/m.prototxt and out/m.caffemodel "
        f"are as before; {FIRST_PAIR}\n")
    assert gh.leftovers(root) == [] and not (root / "out").exists()


def test_ctrl_c_at_random_moments_of_start_up_prints_no_traceback_from_bnfix(huge, arena):
    """SIGINT right after spawning (up to 1.5 times as long as ``bnfix --version`` takes),
    many times.  A traceback from bnfix's code is a failure.  One without a bnfix frame comes
    from the interpreter itself, before any bnfix code runs (importing ``site`` or the
    ``-m`` package: "Fatal Python error: init_import_site", runpy's ``_get_module_details``),
    which bnfix cannot catch; those are only counted.  Stops at the first bnfix traceback."""
    rng = random.Random("ctrl-c at start-up")
    root = fresh(arena, "start-up", huge)
    t_version = 0.0
    for _ in range(3):
        t0 = time.monotonic()
        child = spawn(["--version"], root)
        assert child.communicate(timeout=60)[0] == f"bnfix {bnfix.__version__}\n"
        t_version = max(t_version, time.monotonic() - t0)
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(60):
        child = spawn([*INPUTS, "-o", "out", "-q"], root)
        time.sleep(rng.uniform(0, 1.5 * t_version))
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=120)
        frames = _bnfix_frames(err)
        assert frames == [], (child.returncode, err)
        assert out == ""
        saved = f"bnfix: error: interrupted after out/m.prototxt and out/m.caffemodel were saved; {FIRST_PAIR}\n"
        if child.returncode == 130 and err == saved:  # the pair is new, whole: checked below
            assert [which(root / "out" / n, huge) for n in NAMES] == ["new", "new"]
            seen["bnfix: interrupted after the save"] += 1
        elif child.returncode == 130:
            assert err in nothing_written(signal.SIGINT) | {
                f"bnfix: error: interrupted by SIGINT; nothing was changed: out/m.prototxt and out/m.caffemodel are "
                f"as before; {FIRST_PAIR}\n"}, err
            seen["bnfix: interrupted"] += 1
        elif "Traceback" in err:
            seen["interpreter start-up traceback (no bnfix frame)"] += 1
        elif child.returncode == 0:
            seen["finished first"] += 1
        else:
            assert (child.returncode, err) == (-signal.SIGINT, ""), (child.returncode, err)
            seen["killed before Python's handler"] += 1
        if child.returncode != 0 and err != saved:  # nothing was written: no output pair, no temp, no lock file
            assert not any((root / "out" / n).exists() for n in NAMES), err
        assert gh.leftovers(root) == []
        gh.remove(root / "out")
    assert seen["bnfix: interrupted"] > 0, seen


# -- 4. concurrency --------------------------------------------------------------------------


def _needs_proc() -> None:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to see which lock a process waits for")


@contextlib.contextmanager
def paused_mid_save(args: list[str], root: Path, hook_dir: Path) -> Iterator[tuple[object, gh.HookPipe]]:
    """A real ``python -m bnfix ARGS`` paused in the middle of its caffemodel copy (a test
    hook), holding its locks, until the caller calls ``pipe.go()`` (or the block ends)."""
    pipe = gh.HookPipe()
    child = spawn(args, root, env=pipe.env("pause-in-copy", hook_dir), pass_fds=pipe.fds)
    pipe.started()
    try:
        assert pipe.line() == "copying"
        yield child, pipe
    finally:
        pipe.close()


def wait_blocked(child, lock_of: Path) -> None:
    """Until ``child`` waits for the lock of ``lock_of`` (it has the lock file open)."""
    from bnfix import lock

    file = lock.lock_file(lock_of)
    assert gh.wait_for(lambda: gh.has_open(child.pid, file) or child.poll() is not None)
    assert child.poll() is None, child.communicate()


def exact_pair(root: Path, out: str, huge: Huge) -> str | None:
    """Which reference the pair in ``root/out`` is exactly ("ref" or "ref_opencv"), else None."""
    got = {n: gh.digest(root / out / n) for n in NAMES}
    for ref in ("ref", "ref_opencv"):
        if got == {n: huge.digests[f"{ref}/{n}"] for n in NAMES}:
            return ref
    return None


SOURCE_OF = {"ref": "pjreddie-cpu", "ref_opencv": "opencv"}


def test_two_writers_on_one_output_pair_end_with_exactly_one_of_them(huge, arena, capsys):
    """Many rounds of two ``bnfix -o out`` with different ``--source`` values, started together
    (a seeded stagger, either first), on one tree; plus rounds where the first is paused
    mid-save, holding its locks, until the second is seen waiting for them: then the
    second's pair must be the one left (it cannot have written while the first held it)."""
    rng = random.Random("two writers")
    root = fresh(arena, "writers", huge)
    cmd = {ref: [*INPUTS, "-o", "out", "-q", "--source", source] for ref, source in SOURCE_OF.items()}
    won: collections.Counter[str] = collections.Counter()
    for i, how in enumerate(["race"] * 8 + ["second waits"] * 2):
        first, second = ("ref", "ref_opencv") if i % 2 else ("ref_opencv", "ref")
        if how == "race":
            a = spawn(cmd[first], root)
            time.sleep(rng.uniform(0, 0.05))
            b = spawn(cmd[second], root)
        else:
            _needs_proc()
            with paused_mid_save(cmd[first], root, arena / "hook") as (a, pipe):
                b = spawn(cmd[second], root)
                wait_blocked(b, root / "out" / "m.caffemodel")
                pipe.go()
        results = [(c.communicate(timeout=120), c.returncode) for c in (a, b)]
        assert results == [(("", ""), 0), (("", ""), 0)], (how, results)
        winner = exact_pair(root, "out", huge)
        assert winner is not None, how  # entirely one of them: both files from the same run
        if how == "second waits":
            assert winner == second
        won[winner] += 1
        assert gh.leftovers(root) == []
        assert cli(capsys, root, "out/m.prototxt", "out/m.caffemodel", "--check", "--source", SOURCE_OF[winner],
                   "-q") == (0, "", "")
        # the prototxt marker and the caffemodel record agree: every layer is "up to date"
        result = bnfix.patch(root / "out/m.prototxt", root / "out/m.caffemodel", source=SOURCE_OF[winner])
        try:
            assert {l.status.value for l in result.layers} == {"up to date"}
        finally:
            result.close()
    assert set(won) == {"ref", "ref_opencv"}, won
    originals_intact(root, huge, False)
    pristine_unchanged(huge)


READERS = {"--check": ["--check", "-q"], "-o elsewhere": ["-o", "elsewhere", "-q"]}


@pytest.mark.parametrize("reader", READERS, ids=READERS.keys())
def test_an_in_place_writer_and_a_reader_at_once_never_double_correct(huge, arena, capsys, reader):
    """``--in-place`` and a reader of the same pair at once: the reader sees the pair before or
    after, never half of it; an ``-o elsewhere`` copy is exactly the reference patch either way
    (patching the patched pair changes nothing; a double correction would).  Seeded races
    (either first), then the writer paused mid-save until the reader waits for it, then
    (``-o``) the reader paused mid-save until the writer waits for it."""
    rng = random.Random(f"writer and {reader}")
    writer_cmd = [*INPUTS, "--in-place", "-q"]
    reader_cmd = [*INPUTS, *READERS[reader]]
    rounds = ["race"] * 6 + ["reader waits"] + (["writer waits"] if reader == "-o elsewhere" else [])
    for i, how in enumerate(rounds):
        root = fresh(arena, f"round{i}", huge)
        if how == "race":
            order = [writer_cmd, reader_cmd] if i % 2 else [reader_cmd, writer_cmd]
            x = spawn(order[0], root)
            time.sleep(rng.uniform(0, 0.05))
            y = spawn(order[1], root)
            w, r = (x, y) if i % 2 else (y, x)
        else:
            _needs_proc()
            paused, other = (writer_cmd, reader_cmd) if how == "reader waits" else (reader_cmd, writer_cmd)
            with paused_mid_save(paused, root, arena / "hook") as (first, pipe):
                second = spawn(other, root)
                wait_blocked(second, root / "in" / "m.caffemodel")
                pipe.go()
            w, r = (first, second) if how == "reader waits" else (second, first)
        (w_out, w_err), (r_out, r_err) = w.communicate(timeout=120), r.communicate(timeout=120)
        assert (w.returncode, w_out, w_err) == (0, "", ""), how
        assert (r_out, r_err) == ("", ""), (how, r_err)  # never an inconsistent pair
        assert (which(root / INPUTS[0], huge), which(root / INPUTS[1], huge)) == ("new", "new")
        originals_intact(root, huge, True)
        if reader == "--check":
            assert r.returncode in (0, 1), how  # after the write, or before it
            if how == "reader waits":
                assert r.returncode == 0
        else:
            assert r.returncode == 0 and exact_pair(root, "elsewhere", huge) == "ref", how
        assert gh.leftovers(root) == []
        gh.remove(root)
    pristine_unchanged(huge)


def test_wait_0_while_another_bnfix_writes_the_pair_is_busy_naming_its_files(huge, arena, capsys):
    root = fresh(arena, "busy", huge)
    # another writer on the same -o pair
    with paused_mid_save([*INPUTS, "-o", "out", "-q"], root, arena / "hook") as (a, _):
        b = spawn([*INPUTS, "-o", "out", "--wait", "0", "-q"], root)
        assert b.communicate(timeout=120) == (
            "", f"bnfix: error: out/m.caffemodel: busy: another bnfix (pid {a.pid}) is writing out/m.prototxt "
                f"and out/m.caffemodel\n")
        assert b.returncode == 2
    assert a.communicate(timeout=120) == ("", "") and a.returncode == 0
    # a reader of a pair being replaced in place
    with paused_mid_save([*INPUTS, "--in-place", "-q"], root, arena / "hook") as (c, _):
        d = spawn([*INPUTS, "--check", "--wait", "0", "-q"], root)
        assert d.communicate(timeout=120) == (
            "", f"bnfix: error: in/m.caffemodel: busy: another bnfix (pid {c.pid}) is writing in/m.prototxt and "
                f"in/m.caffemodel\n")
        assert d.returncode == 2
    assert c.communicate(timeout=120) == ("", "") and c.returncode == 0
    assert exact_pair(root, "out", huge) == "ref"
    assert (which(root / INPUTS[0], huge), which(root / INPUTS[1], huge)) == ("new", "new")
    assert gh.leftovers(root) == []


# -- 5. points 6-8 of the issue --------------------------------------------------------------


JSON_OVERLAPS = {
    "--in-place --json in/m.caffemodel.orig": (("--in-place",), "in/m.caffemodel.orig", False),
    "--in-place --json in/m.prototxt.orig, the .orig there already": (("--in-place",), "in/m.prototxt.orig", True),
    "-o o --json o/m.prototxt": (("-o", "o"), "o/m.prototxt", False),
    "-o o --json o/m.caffemodel, an earlier output there": (("-o", "o"), "o/m.caffemodel", True),
}


@pytest.mark.parametrize("args,report,existing", JSON_OVERLAPS.values(), ids=JSON_OVERLAPS.keys())
def test_json_equal_to_an_output_or_backup_is_refused_before_anything_is_written(scratch, capsys, args, report,
                                                                                  existing):
    gh.write_tiny(scratch / "in")
    if existing:  # an earlier run made the backups / outputs: the only copy of the originals
        assert cli(capsys, scratch, *INPUTS, *args, "-q")[0] == 0
    before = gh.tree(scratch)
    code, out, err = cli(capsys, scratch, *INPUTS, *args, "--json", report)
    assert (code, out) == (2, "")
    assert err.splitlines()[0] == f"bnfix: error: {report}: the JSON report would overwrite {report}"
    assert "Traceback" not in err
    assert gh.tree(scratch) == before  # nothing written, the backup intact


@pytest.mark.parametrize("args,report", [(("--in-place",), "in/m.caffemodel.orig"), (("-o", "o"), "o/m.prototxt")],
                         ids=["in-place", "-o"])
def test_json_equal_to_an_output_or_backup_is_one_error_line(scratch, capsys, args, report):
    gh.write_tiny(scratch / "in")
    code, _, err = cli(capsys, scratch, *INPUTS, *args, "--json", report)
    assert code == 2
    assert one_error(err) == f"{report}: the JSON report would overwrite {report}"


@pytest.mark.parametrize("modes", [(0o600, 0o600), (0o640, 0o604), (0o644, 0o400)],
                         ids=lambda ms: "-".join(f"{x:o}" for x in ms))
def test_outputs_keep_the_inputs_permission_bits(scratch, capsys, modes):
    p, m = gh.write_tiny(scratch / "in")
    p.chmod(modes[0])
    m.chmod(modes[1])
    assert cli(capsys, scratch, *INPUTS, "-o", "out", "-q") == (0, "", "")
    assert cli(capsys, scratch, *INPUTS, "-q") == (0, "", "")  # beside the inputs, as <stem>.bnfix<ext>
    for out in (("out/m.prototxt", "out/m.caffemodel"), ("in/m.bnfix.prototxt", "in/m.bnfix.caffemodel")):
        assert tuple(stat.S_IMODE((scratch / o).stat().st_mode) for o in out) == modes, out


def test_in_place_keeps_mode_owner_and_group(scratch, capsys):
    if os.geteuid() != 0:
        pytest.skip("needs root, to give the inputs another owner")
    import grp
    import pwd

    try:
        uid, gid = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    except KeyError:
        uid = gid = 65534
    p, m = gh.write_tiny(scratch / "in")
    for f in (p, m):
        os.chown(f, uid, gid)
        f.chmod(0o640)
    code, out, err = cli(capsys, scratch, *INPUTS, "--in-place", "-q")
    assert (code, out, err) == (0, "", "")
    for f in (p, m, Path(f"{p}.orig"), Path(f"{m}.orig")):
        st = f.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o640), f
    assert p.read_text() != gh.tiny_prototxt()  # it was patched


def test_in_place_on_symlinks_replaces_the_files_they_point_to_and_keeps_the_links(scratch, capsys):
    """Decided (commit.py): ``--in-place`` follows a symlink; the backups go beside the target."""
    gh.write_tiny(scratch / "store")
    ref_root = scratch / "ref"
    gh.write_tiny(ref_root / "in")
    assert cli(capsys, ref_root, *INPUTS, "--in-place", "-q") == (0, "", "")
    links = scratch / "models"
    links.mkdir()
    (links / "yolo.prototxt").symlink_to("../store/m.prototxt")
    (links / "yolo.caffemodel").symlink_to(scratch / "store" / "m.caffemodel")
    args = ("models/yolo.prototxt", "models/yolo.caffemodel")
    assert cli(capsys, scratch, *args, "--in-place", "-q") == (0, "", "")
    assert gh.tree(links) == {"yolo.prototxt": ("-> ../store/m.prototxt", 0o777),
                              "yolo.caffemodel": (f"-> {scratch}/store/m.caffemodel", 0o777)}
    assert gh.tree(scratch / "store") == gh.tree(ref_root / "in")  # patched, with the .orig backups
    assert cli(capsys, scratch, *args, "--check", "-q") == (0, "", "")


@pytest.mark.parametrize("length", [232, 250])
def test_long_input_names_work_with_o_and_in_place(scratch, capsys, length):
    ref_root = scratch / "ref"
    gh.write_tiny(ref_root / "in")
    assert cli(capsys, ref_root, *INPUTS, "-o", "out", "-q") == (0, "", "")
    ref = {n: gh.digest(ref_root / "out" / f"m{n[1:]}") for n in ("p.prototxt", "m.caffemodel")}
    p_name, m_name = "p" * (length - 9) + ".prototxt", "m" * (length - 11) + ".caffemodel"
    assert len(os.fsencode(p_name)) == len(os.fsencode(m_name)) == length
    d = scratch / "in"
    d.mkdir()
    (d / p_name).write_text(gh.tiny_prototxt())
    (d / m_name).write_bytes(gh.tiny_model())
    args = (f"in/{p_name}", f"in/{m_name}")
    assert cli(capsys, scratch, *args, "-o", "out", "-q") == (0, "", "")
    assert cli(capsys, scratch, *args, "--in-place", "-q") == (0, "", "")
    for directory in ("out", "in"):
        assert gh.digest(scratch / directory / p_name) == ref["p.prototxt"]
        assert gh.digest(scratch / directory / m_name) == ref["m.caffemodel"]
    assert sorted(os.listdir(scratch / "out")) == sorted([p_name, m_name])
    assert sorted(os.listdir(d)) == sorted([p_name, m_name, f"{p_name}.orig", f"{m_name}.orig"])
    assert gh.leftovers(scratch) == []
    assert cli(capsys, scratch, *args, "--check", "-q") == (0, "", "")


BUG_LINE = ("bnfix: internal error: AssertionError: boom (a bug in bnfix: please report it to its maintainers with "
            "the command you ran; BNFIX_DEBUG=1 shows the traceback)")


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "BNFIX_DEBUG=1"])
def test_an_internal_error_exits_3_with_one_line_asking_for_a_bug_report(scratch, capsys, monkeypatch, debug):
    import bnfix.pipeline

    def broken(*args, **kwargs):
        raise AssertionError("boom")

    monkeypatch.setattr(bnfix.pipeline, "plan_patch", broken)
    if debug:
        monkeypatch.setenv("BNFIX_DEBUG", "1")
    gh.write_tiny(scratch / "in")
    before = gh.tree(scratch)
    code, out, err = cli(capsys, scratch, *INPUTS, "-o", "out")
    assert (code, out) == (3, "")
    if debug:
        assert err.startswith("Traceback (most recent call last):\n") and err.endswith(f"\n{BUG_LINE}\n")
        assert "AssertionError: boom\n" in err and "in broken" in err
    else:
        assert err == BUG_LINE + "\n"
    assert gh.tree(scratch) == before


REVERT_CONFLICTS = {
    "--source": (["--source", "opencv"], "--source"),
    "--target-eps": (["--target-eps", "1e-6"], "--target-eps"),
    "--force": (["--force"], "--force"),
    "all three": (["--force", "--target-eps", "1e-6", "--source", "opencv"], "--source, --target-eps, --force"),
}


@pytest.mark.parametrize("extra,named", REVERT_CONFLICTS.values(), ids=REVERT_CONFLICTS.keys())
def test_revert_with_patch_options_is_a_usage_error(scratch, capsys, extra, named):
    gh.write_tiny(scratch / "in")
    before = gh.tree(scratch)
    code, out, err = cli(capsys, scratch, *INPUTS, "--revert", "-o", "out", *extra)
    assert (code, out) == (2, "")
    lines = err.splitlines()
    assert lines[0].startswith("usage: bnfix ") and lines[-2].strip().endswith(USAGE_TAIL), err
    assert all(l.startswith(" ") for l in lines[1:-1]), err
    assert lines[-1] == (f"bnfix: error: --revert cannot be combined with {named}: a revert restores what the "
                         "markers recorded")
    assert gh.tree(scratch) == before


def test_a_layer_skipped_for_a_bad_blob_layout_reports_its_error_as_unknown(scratch, capsys):
    d = scratch / "in"
    d.mkdir()
    (d / "m.prototxt").write_text(gh.tiny_prototxt())
    (d / "m.caffemodel").write_bytes(gh.tiny_model(extra_blobs=([1.0],)))
    code, out, err = cli(capsys, scratch, *INPUTS, "-o", "out", "--json", "report.json")
    assert (code, err) == (0, "")
    layers = {l["name"]: l for l in json.loads((scratch / "report.json").read_text())["pairs"][0]["layers"]}
    bn2 = layers["bn2"]
    assert (bn2["status"], bn2["reason"]) == ("skipped", "4 blobs: not the 3-blob BVLC or 5-blob NVCaffe layout")
    assert {k: bn2[k] for k in ("err_before", "err_after", "max_rel_change", "worst_channel")} == dict.fromkeys(
        ("err_before", "err_after", "max_rel_change", "worst_channel"))  # null, not 0
    assert layers["bn1"]["status"] == "patched" and layers["bn1"]["err_after"] > 0
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.split("│")[1:-1]]
                                          for line in out.splitlines() if line.startswith("│"))}
    assert rows["bn2"] == ["bn2", "3", "1e-05", "skipped: 4 blobs: not the 3-blob BVLC or 5-blob NVCaffe layout",
                           "-", "0", "n/a"]
    assert rows["bn1"][-1] != "n/a" and re.fullmatch(r"\S+ → \S+", rows["bn1"][-1])


def test_a_corrupt_marker_is_exit_2_naming_the_file_and_the_layer(scratch, capsys):
    gh.write_tiny(scratch / "in")
    assert cli(capsys, scratch, *INPUTS, "-o", "out", "-q") == (0, "", "")
    text = (scratch / "out/m.prototxt").read_text()
    undo = re.search(r"\[undo[^\]]*\]", text)
    assert undo and undo[0] == "[undo eps=none]"
    (scratch / "out/bad.prototxt").write_text(text[:undo.start()] + "[undo eps=abc]" + text[undo.end():])
    legacy = gh.tiny_prototxt().replace("layer {\n  name: \"bn1\"",
                                        "layer {  # bnfix: fitted to sqrt(var) + 1e-06, eps 1e-06 [undo model.eps=abc]"
                                        "\n  name: \"bn1\"", 1)
    (scratch / "in/legacy.prototxt").write_text(legacy)
    before = gh.tree(scratch)
    for pair, bad in ((("out/bad.prototxt", "out/m.caffemodel"), "'eps=abc'"),
                      (("in/legacy.prototxt", "in/m.caffemodel"), "'model.eps=abc'")):
        body = (scratch / pair[0]).read_text()
        at = body.index("# bnfix:")
        line, col = body.count("\n", 0, at) + 1, at - body.rfind("\n", 0, at)
        expected = f"{pair[0]}:{line}:{col}: layer 'bn1': corrupt bnfix marker: undo entry {bad}"
        for args in (("--check",), ("-o", "fixed"), ("--in-place",), ("--revert", "-o", "fixed")):
            code, out, err = cli(capsys, scratch, *pair, *args)
            assert (code, out) == (2, ""), (pair, args, err)
            assert one_error(err) == expected, args
    assert gh.tree(scratch) == before
