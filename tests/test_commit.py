"""The commit layer (``bnfix.commit``): an output pair is one unit (issue 8, points 2, 3 and 7).

- Fault injection in process: every system call a clean commit makes (``-o`` outputs, new or
  replacing earlier ones; ``--in-place`` with backups, with an old ``.orig``, without hard
  links), under the locks and the sweep the CLI will use, is made to fail in turn with ENOSPC,
  EPERM, EIO, EISDIR and EXDEV.  After each: the pair is entirely old (same bytes, mode and
  inode) or entirely new, as the exception's state says; nothing else is left in the
  directory; the message is one line naming the user's file; the next plain run succeeds.
- Real subprocesses saving a 200 MB pair: SIGKILL at random points (and between the two
  renames) leaves only (old, old), (new, new) or (new prototxt, old caffemodel), and ``sweep``
  removes what it left; SIGINT/SIGTERM/SIGHUP leave no temp file, and the report is true.
- Metadata, symlinks, long names, exact messages.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import faults_driver as driver
import pytest
from faults import Calls, signal_me

from bnfix import commit, lock
from bnfix.commit import Output, State
from bnfix.errors import BnfixError

DRIVER = Path(__file__).with_name("faults_driver.py")
ERRNOS = (errno.ENOSPC, errno.EPERM, errno.EIO, errno.EISDIR, errno.EXDEV)

P_OLD = b'name: "net"\nlayer { name: "bn1" type: "BatchNorm" }\n'
P_NEW = b'name: "net"\nlayer {  # bnfix: fitted\n  name: "bn1" type: "BatchNorm" }\n'
M_OLD = bytes(range(256)) * 256
PATCH_AT, PATCH = 1000, b"\xfe" * 32
M_NEW = M_OLD[:PATCH_AT] + PATCH + M_OLD[PATCH_AT + len(PATCH):] + b"tail"


def fill_from(source: Path):
    """A caffemodel writer like bnfix's: copy the input with copy_file_range, patch bytes with
    pwrite, all through ``bnfix.commit.os`` so that the faults reach it too."""

    def fill(fd: int) -> None:
        o = commit.os
        src = o.open(source, os.O_RDONLY)
        try:
            done = 0
            while done < len(M_OLD):
                done += o.copy_file_range(src, fd, len(M_OLD) - done, done, done)
        finally:
            o.close(src)
        o.pwrite(fd, PATCH, PATCH_AT)
        o.pwrite(fd, b"tail", len(M_OLD))

    return fill


# -- the fault matrix ------------------------------------------------------------------------


class Scenario(NamedTuple):
    name: str
    in_place: bool
    outputs_exist: bool = False  # -o over the outputs of an earlier run
    oldest_orig: bool = False  # in place, m.prototxt.orig exists already
    deny: tuple[tuple[str, int], ...] = ()  # every call of that name fails (no hard links possible)


SCENARIOS = [
    Scenario("-o, new outputs", False),
    Scenario("-o, replacing earlier outputs", False, outputs_exist=True),
    Scenario("in place with backups", True),
    Scenario("in place, .orig already there", True, oldest_orig=True),
    Scenario("in place, no hard links", True, deny=(("link", errno.EPERM),)),
]


class Layout(NamedTuple):
    root: Path
    p_in: Path
    m_in: Path
    p: Path  # outputs
    m: Path


def build(root: Path, sc: Scenario) -> Layout:
    ins = root / "in"
    ins.mkdir(parents=True)
    p_in, m_in = ins / "m.prototxt", ins / "m.caffemodel"
    p_in.write_bytes(P_OLD)
    m_in.write_bytes(M_OLD)
    p_in.chmod(0o600)
    m_in.chmod(0o640)
    if sc.in_place:
        if sc.oldest_orig:
            (ins / "m.prototxt.orig").write_bytes(b"the oldest original")
        return Layout(root, p_in, m_in, p_in, m_in)
    out = root / "out"
    out.mkdir()
    p, m = out / "m.prototxt", out / "m.caffemodel"
    if sc.outputs_exist:
        p.write_bytes(b"earlier p")
        m.write_bytes(b"earlier m")
    return Layout(root, p_in, m_in, p, m)


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under root: relative path -> (bytes, permission bits, inode)."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            st = path.lstat()
            files[str(path.relative_to(root))] = (path.read_bytes(), stat.S_IMODE(st.st_mode), st.st_ino)
    return files


def run(lay: Layout, sc: Scenario, calls: Calls | None) -> tuple[BnfixError | None, commit.Committed | None]:
    """What the CLI will do for one pair: lock (outputs EX, inputs SH), sweep, commit."""
    saved = commit.os, lock.os
    if calls is not None:
        commit.os, lock.os = calls.os_for("commit"), calls.os_for("lock")
    try:
        outs = [lay.p, lay.m]
        with lock.acquire(exclusive=outs, shared=[lay.p_in, lay.m_in], owner="writing the pair"):
            for path in outs:
                commit.sweep(path)
            outputs = [Output(lay.p, P_NEW, lay.p_in, sc.in_place),
                       Output(lay.m, fill_from(lay.m_in), lay.m_in, sc.in_place)]
            return None, commit.commit(outputs, backup=sc.in_place)
    except BnfixError as exc:
        return exc, None
    finally:
        commit.os, lock.os = saved


def content(files: dict[str, tuple[bytes, int, int]]) -> dict[str, tuple[bytes, int]]:
    return {k: v[:2] for k, v in files.items()}


def renamed_before(calls: Calls, number: int, lay: Layout) -> bool:
    """Whether a temp file was renamed onto an output before call ``number``."""
    targets = {str(lay.p), str(lay.m)}
    return any(mod == "commit" and name == "replace" and str(args[0]).endswith(commit.TMP)
               and str(args[1]) in targets for mod, name, args in calls.log[:number])


def check_failure(exc: BnfixError, err: int, lay: Layout, calls: Calls, number: int) -> None:
    msg, why = str(exc), re.escape(os.strerror(err))
    assert "\n" not in msg
    p, m, p_in, m_in = (re.escape(str(x)) for x in (lay.p, lay.m, lay.p_in, lay.m_in))
    if isinstance(exc, lock.LockFailed):
        assert re.fullmatch(rf"({p}|{m}): cannot lock it for writing: {why} \(lock file \S+\.bnfix-lock\)"
                            rf"|({p_in}|{m_in}): cannot lock it for reading: {why} \(lock file \S+\.bnfix-lock\)",
                            msg), msg
        return
    if isinstance(exc, commit.SweepFailed):
        assert re.fullmatch(rf"({p}|{m}): cannot look for temp files left by an earlier bnfix: {why}", msg), msg
        return
    assert isinstance(exc, commit.CommitError), (type(exc), msg)
    assert ".bnfix-" not in msg
    if exc.state is State.UNCHANGED:
        assert not renamed_before(calls, number, lay)
        assert re.fullmatch(rf"({p}|{m}): (cannot write|cannot replace|cannot create the backup "
                            rf"({p}|{m})\.orig): {why}; nothing was changed", msg), msg
    else:
        assert exc.state is State.ROLLED_BACK and renamed_before(calls, number, lay)
        assert re.fullmatch(rf"{m}: cannot replace: {why}; {p} was (put back|removed again), so nothing was changed"
                            rf"|{p}: cannot sync its directory: {why}; {p} and {m} were (put back|removed again), so "
                            rf"nothing was changed"
                            rf"|{p}: cannot sync its directory: {why}; ({p}|{m}) was put back and ({p}|{m}) was removed "
                            rf"again, so nothing was changed", msg), msg


def allowed_leftovers(calls: Calls, warnings: tuple[str, ...], root: Path) -> set[str]:
    """Names a fault may legitimately leave: a rollback link whose unlink failed after success
    (then a warning names it); an empty lock file when a call of the lock module itself failed
    (its unlink on release, or the fstat/stat that would prove the file is ours to remove).
    Such a lock file holds no lock; the next run takes it over and removes it."""
    left = set()
    for number, mod, name, _ in calls.injected:
        args = calls.log[number][2]
        if mod == "lock" and name != "open":
            left |= {f.name for f in root.rglob("*.bnfix-lock") if f.stat().st_size == 0 or name == "unlink"}
        if mod == "commit" and name == "unlink" and str(args[0]).endswith(commit.OLD):
            assert any(str(args[0]) in w for w in warnings), warnings
            left.add(os.path.basename(args[0]))
    return left


def without(files: dict[str, Any], names: set[str]) -> dict[str, Any]:
    return {k: v for k, v in files.items() if os.path.basename(k) not in names}


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A directory for many small runs: in memory (/dev/shm) where there is one, since the
    matrix checks logic, not disks (fsync is faked there too), else tmp_path."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = shm / f"bnfix-test-{os.getpid()}-{tmp_path.name}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_every_failing_call_leaves_the_pair_entirely_old_or_entirely_new(scratch, sc):
    tmp_path = scratch
    clean = Calls(deny=dict(sc.deny))
    lay = build(tmp_path / "clean", sc)
    exc, done = run(lay, sc, clean)
    assert exc is None and done is not None and done.warnings == ()
    new = content(snapshot(lay.root))
    assert new[str(lay.p.relative_to(lay.root))] == (P_NEW, 0o600)
    assert new[str(lay.m.relative_to(lay.root))] == (M_NEW, 0o640)
    assert len(clean.log) > 40, clean.names()
    checked = {"ok": 0, "unchanged": 0, "rolled back": 0}
    for number in range(len(clean.log)):
        for err in ERRNOS:
            where = f"call {number} {clean.names()[number]} failing with {errno.errorcode[err]}"
            lay = build(tmp_path / f"{number}-{err}", sc)
            old = snapshot(lay.root)
            calls = Calls({number: err}, deny=dict(sc.deny))
            exc, done = run(lay, sc, calls)
            assert calls.injected, where
            now = snapshot(lay.root)
            if exc is None:
                assert done is not None
                left = allowed_leftovers(calls, done.warnings, lay.root)
                assert content(without(now, left)) == new, where
                for w in done.warnings:
                    assert re.fullmatch(r".*: (owner and group \d+:\d+ not kept \(.*\); the new file belongs to \d+:\d+"
                                        r"|could not remove the rollback link .*)", w), (where, w)
                checked["ok"] += 1
            else:
                check_failure(exc, err, lay, calls, number)
                left = allowed_leftovers(calls, (), lay.root)
                state = getattr(exc, "state", State.UNCHANGED)
                if "no hard links" in sc.name and state is State.ROLLED_BACK:
                    # the rollback copy went back: same bytes and mode, a new inode
                    assert content(without(now, left)) == content(old), where
                else:
                    assert without(now, left) == old, where
                checked[State(state).value] += 1
            # The next plain run leaves a correct pair and nothing else.
            exc, _ = run(lay, sc, Calls(deny=dict(sc.deny)))
            assert exc is None, where
            assert content(snapshot(lay.root)) == new, where
            shutil.rmtree(lay.root)
    assert all(checked.values()), checked


def test_the_fault_matrix_covers_every_kind_of_call(tmp_path):
    """What the clean commits of the scenarios call: the lists the matrix walks."""
    kinds = set()
    for i, sc in enumerate(SCENARIOS):
        calls = Calls(deny=dict(sc.deny))
        run(build(tmp_path / str(i), sc), sc, calls)
        kinds |= {f"{mod}.{name}" for mod, name, _ in calls.log}
        renames = [args for mod, name, args in calls.log if name == "replace" and str(args[0]).endswith(commit.TMP)]
        assert [Path(dst).name for _, dst in renames][-2:] == ["m.prototxt", "m.caffemodel"]  # in the order given
    assert kinds >= {"commit.open", "commit.write", "commit.pwrite", "commit.copy_file_range", "commit.fchown",
                     "commit.fchmod", "commit.fsync", "commit.close", "commit.link", "commit.replace",
                     "commit.unlink", "commit.stat", "commit.lstat", "commit.scandir", "lock.open",
                     "lock.fstat", "lock.stat", "lock.ftruncate", "lock.pwrite", "lock.unlink", "lock.close",
                     "commit.utime"}


# -- exact messages --------------------------------------------------------------------------


def pair_in(tmp_path: Path, p_data: bytes = P_OLD, m_data: bytes = M_OLD) -> tuple[Path, Path]:
    p, m = tmp_path / "m.prototxt", tmp_path / "m.caffemodel"
    p.write_bytes(p_data)
    m.write_bytes(m_data)
    return p, m


def names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def with_calls(calls: Calls):
    class Swap:
        def __enter__(self):
            self.saved = commit.os
            commit.os = calls.os_for("commit")

        def __exit__(self, *exc):
            commit.os = self.saved

    return Swap()


def nth(calls_log: Calls, name: str, k: int, dst_suffix: str = "") -> int:
    """The call number of the k-th (1-based) call ``name`` (whose 2nd argument ends so)."""
    hits = [i for i, (_, n, args) in enumerate(calls_log.log)
            if n == name and (not dst_suffix or str(args[1]).endswith(dst_suffix))]
    return hits[k - 1]


def test_a_directory_in_the_way_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    (out / "m.caffemodel").mkdir(parents=True)
    with pytest.raises(commit.OutputIsDirectory) as info:
        commit.commit([Output(out / "m.prototxt", P_NEW), Output(out / "m.caffemodel", M_NEW)])
    assert str(info.value) == f"{out}/m.caffemodel: is a directory; nothing was changed"
    assert info.value.state is State.UNCHANGED
    assert names(out) == ["m.caffemodel"]


def test_a_full_disk_while_writing_changes_nothing(tmp_path):
    p, m = pair_in(tmp_path)

    def full(fd: int) -> None:
        os.write(fd, b"part of it")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(commit.WriteFailed) as info:
        commit.commit([Output(p, P_NEW, p, True), Output(m, full, m, True)], backup=True)
    assert str(info.value) == f"{m}: cannot write: No space left on device; nothing was changed"
    assert info.value.state is State.UNCHANGED and info.value.error.errno == errno.ENOSPC
    assert names(tmp_path) == ["m.caffemodel", "m.prototxt"]
    assert (p.read_bytes(), m.read_bytes()) == (P_OLD, M_OLD)


def test_an_error_that_is_not_an_os_error_propagates_after_cleanup(tmp_path):
    p, m = pair_in(tmp_path)

    def bad(fd: int) -> None:
        raise BnfixError(f"{m}: the file changed while bnfix was running")

    with pytest.raises(BnfixError, match="changed while bnfix was running"):
        commit.commit([Output(p, P_NEW), Output(m, bad)])
    assert names(tmp_path) == ["m.caffemodel", "m.prototxt"]


def test_a_failed_second_rename_puts_the_first_file_back(tmp_path):
    p, m = pair_in(tmp_path)
    p_ino = p.stat().st_ino
    probe = Calls()
    with with_calls(probe):
        commit.commit([Output(p, P_NEW), Output(m, M_NEW)])
    pair_in(tmp_path)
    p_ino = p.stat().st_ino
    calls = Calls({nth(probe, "replace", 2): errno.EPERM})
    with with_calls(calls), pytest.raises(commit.ReplaceFailed) as info:
        commit.commit([Output(p, P_NEW), Output(m, M_NEW)])
    assert str(info.value) == (f"{m}: cannot replace: Operation not permitted; {p} was put back, "
                               f"so nothing was changed")
    assert info.value.state is State.ROLLED_BACK and info.value.path == m
    assert (p.read_bytes(), m.read_bytes(), p.stat().st_ino) == (P_OLD, M_OLD, p_ino)
    assert names(tmp_path) == ["m.caffemodel", "m.prototxt"]


def test_a_failed_directory_sync_puts_both_files_back(tmp_path):
    p, m = pair_in(tmp_path)
    probe = Calls()
    with with_calls(probe):
        commit.commit([Output(p, P_NEW), Output(m, M_NEW)])
    dir_sync = [i for i, (_, n, args) in enumerate(probe.log) if n == "fsync"][-1]
    pair_in(tmp_path)
    with with_calls(Calls({dir_sync: errno.EIO})), pytest.raises(commit.ReplaceFailed) as info:
        commit.commit([Output(p, P_NEW), Output(m, M_NEW)])
    assert str(info.value) == (f"{p}: cannot sync its directory: Input/output error; {p} and {m} were put "
                               f"back, so nothing was changed")
    assert (p.read_bytes(), m.read_bytes()) == (P_OLD, M_OLD)
    assert names(tmp_path) == ["m.caffemodel", "m.prototxt"]


def test_an_immutable_caffemodel_in_place_leaves_both_files_old(tmp_path):
    """Issue 8's reproduction: ``chattr +i`` the caffemodel, then replace the pair in place."""
    p, m = pair_in(tmp_path)
    p_ino = p.stat().st_ino
    if os.geteuid() != 0 or shutil.which("chattr") is None or \
            subprocess.run(["chattr", "+i", str(m)], check=False, capture_output=True).returncode != 0:
        pytest.skip("needs root and chattr on a file system with the immutable flag")
    try:
        with pytest.raises(commit.ReplaceFailed) as info:
            commit.commit([Output(p, P_NEW, p, True), Output(m, M_NEW, m, True)], backup=True)
    finally:
        subprocess.run(["chattr", "-i", str(m)], check=True)
    assert str(info.value) == (f"{m}: cannot replace: Operation not permitted; {p} was put back, "
                               f"so nothing was changed")
    assert (p.read_bytes(), m.read_bytes(), p.stat().st_ino) == (P_OLD, M_OLD, p_ino)
    assert names(tmp_path) == ["m.caffemodel", "m.prototxt"]  # the backups it made are gone too


def mixed(tmp_path: Path, in_place: bool) -> tuple[Path, Path, commit.ReplaceFailed]:
    """The second rename fails (EIO), and so does putting the first file back (EPERM)."""
    p, m = pair_in(tmp_path)
    outputs = [Output(p, P_NEW, p, in_place), Output(m, M_NEW, m, in_place)]
    probe = Calls()
    with with_calls(probe):
        commit.commit(outputs, backup=in_place)
    for leftover in tmp_path.glob("*.orig"):
        leftover.unlink()
    pair_in(tmp_path)
    second = nth(probe, "replace", 2)
    calls = Calls({second: errno.EIO, second + 1: errno.EPERM})
    with with_calls(calls), pytest.raises(commit.ReplaceFailed) as info:
        commit.commit(outputs, backup=in_place)
    assert calls.log[second + 1][1] == "replace"  # the rollback's rename
    assert info.value.state is State.MIXED
    assert (p.read_bytes(), m.read_bytes()) == (P_NEW, M_OLD)  # what the message says
    return p, m, info.value


def test_a_failed_rollback_in_place_says_which_file_is_new_and_how_to_recover(tmp_path):
    p, m, exc = mixed(tmp_path, in_place=True)
    assert str(exc) == (f"{m}: cannot replace: Input/output error; putting {p} back failed too "
                        f"(Operation not permitted), so the pair is mixed: {p} is new, {m} is old; "
                        f"restore {p} from {p}.orig")
    assert Path(f"{p}.orig").read_bytes() == P_OLD
    # the caffemodel is old again, so its backup went; the prototxt keeps its rollback link
    leftovers = [n for n in names(tmp_path) if n.endswith(commit.OLD)]
    assert names(tmp_path) == sorted(["m.caffemodel", "m.prototxt", "m.prototxt.orig", *leftovers])
    assert [Path(x).name for x in commit.sweep(p)] == leftovers


def test_a_failed_rollback_with_outputs_names_the_kept_old_file(tmp_path):
    p, m, exc = mixed(tmp_path, in_place=False)
    (old,) = [tmp_path / n for n in names(tmp_path) if n.endswith(commit.OLD)]
    assert str(exc) == (f"{m}: cannot replace: Input/output error; putting {p} back failed too "
                        f"(Operation not permitted), so the pair is mixed: {p} is new, {m} is old; "
                        f"the old {p} is {old}")
    assert old.read_bytes() == P_OLD
    assert commit.sweep(p) == [old] and names(tmp_path) == ["m.caffemodel", "m.prototxt"]


# -- backups ---------------------------------------------------------------------------------


def test_in_place_backups_are_hard_links_and_an_old_orig_is_never_overwritten(tmp_path):
    p, m = pair_in(tmp_path)
    Path(f"{p}.orig").write_bytes(b"the oldest original")
    m_ino = m.stat().st_ino
    done = commit.commit([Output(p, P_NEW, p, True), Output(m, M_NEW, m, True)], backup=True)
    assert done == commit.Committed((p, m), (Path(f"{m}.orig"),), ())
    assert Path(f"{p}.orig").read_bytes() == b"the oldest original"
    assert Path(f"{m}.orig").stat().st_ino == m_ino  # the original file itself, not a copy
    assert (p.read_bytes(), m.read_bytes()) == (P_NEW, M_NEW)


def test_without_hard_links_the_backup_is_a_copy_with_the_original_metadata(tmp_path):
    p, m = pair_in(tmp_path)
    os.chmod(m, 0o640)
    os.utime(m, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    with with_calls(Calls(deny={"link": errno.EPERM})):
        done = commit.commit([Output(p, P_NEW, p, True), Output(m, M_NEW, m, True)], backup=True)
    orig = Path(f"{m}.orig")
    assert done.backups == (Path(f"{p}.orig"), orig)
    st = orig.stat()
    assert (orig.read_bytes(), stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (M_OLD, 0o640, 1_600_000_000_000_000_000)
    assert names(tmp_path) == ["m.caffemodel", "m.caffemodel.orig", "m.prototxt", "m.prototxt.orig"]


def test_a_name_too_long_for_its_backup_is_refused_before_anything_changes(tmp_path):
    p = tmp_path / ("p" * (255 - len(".prototxt")) + ".prototxt")
    m = tmp_path / "m.caffemodel"
    p.write_bytes(P_OLD)
    m.write_bytes(M_OLD)
    with pytest.raises(commit.BackupFailed) as info:
        commit.commit([Output(p, P_NEW, p, True), Output(m, M_NEW, m, True)], backup=True)
    assert str(info.value) == f"{p}: cannot create the backup {p}.orig: File name too long; nothing was changed"
    assert names(tmp_path) == sorted([p.name, m.name])
    assert (p.read_bytes(), m.read_bytes()) == (P_OLD, M_OLD)


# -- metadata --------------------------------------------------------------------------------


def test_outputs_take_the_inputs_permission_bits(tmp_path):
    p_in, m_in = pair_in(tmp_path)
    p_in.chmod(0o600)
    m_in.chmod(0o640)
    out = tmp_path / "out"
    out.mkdir()
    commit.commit([Output(out / p_in.name, P_NEW, p_in), Output(out / m_in.name, M_NEW, m_in)])
    assert [stat.S_IMODE((out / n).stat().st_mode) for n in (p_in.name, m_in.name)] == [0o600, 0o640]


def test_a_new_output_without_like_gets_the_default_mode(tmp_path):
    mask = os.umask(0o027)
    try:
        commit.commit([Output(tmp_path / "x", b"x")])
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == 0o640


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_in_place_keeps_mode_owner_and_group(tmp_path):
    p, m = pair_in(tmp_path)
    for f in (p, m):
        os.chown(f, 65534, 65534)  # nobody:nogroup
        f.chmod(0o640)
    done = commit.commit([Output(p, P_NEW, p, True), Output(m, M_NEW, m, True)], backup=True)
    assert done.warnings == ()
    for f in (p, m):
        st = f.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o640)


def test_an_owner_that_cannot_be_kept_is_a_warning(tmp_path):
    p, m = pair_in(tmp_path)
    st = p.stat()
    with with_calls(Calls(deny={"fchown": errno.EPERM})):
        done = commit.commit([Output(p, P_NEW, p, True), Output(m, M_NEW, m, True)])
    assert done.warnings == tuple(
        f"{f}: owner and group {st.st_uid}:{st.st_gid} not kept (Operation not permitted); "
        f"the new file belongs to {os.geteuid()}:{os.getegid()}" for f in (p, m))
    assert (p.read_bytes(), m.read_bytes()) == (P_NEW, M_NEW)


def test_in_place_on_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    real_p, real_m = pair_in(store)
    real_m.chmod(0o600)
    link_dir = tmp_path / "models"
    link_dir.mkdir()
    p, m = link_dir / "yolo.prototxt", link_dir / "yolo.caffemodel"
    p.symlink_to(real_p)
    m.symlink_to(os.path.relpath(real_m, link_dir))
    done = commit.commit([Output(p, P_NEW, p, True), Output(m, M_NEW, m, True)], backup=True)
    assert done.outputs == (real_p, real_m)
    assert done.backups == (Path(f"{real_p}.orig"), Path(f"{real_m}.orig"))
    assert p.is_symlink() and m.is_symlink() and os.readlink(m) == "../store/m.caffemodel"
    assert (p.read_bytes(), m.read_bytes()) == (P_NEW, M_NEW)
    assert stat.S_IMODE(real_m.stat().st_mode) == 0o600
    assert names(store) == ["m.caffemodel", "m.caffemodel.orig", "m.prototxt", "m.prototxt.orig"]
    assert names(link_dir) == ["yolo.caffemodel", "yolo.prototxt"]


def test_without_in_place_a_symlinked_output_is_replaced_by_the_file(tmp_path):
    real = tmp_path / "real"
    real.write_bytes(b"keep me")
    out = tmp_path / "out.prototxt"
    out.symlink_to(real)
    commit.commit([Output(out, P_NEW)])
    assert not out.is_symlink() and out.read_bytes() == P_NEW and real.read_bytes() == b"keep me"


# -- names -----------------------------------------------------------------------------------


LONG = {
    "232 bytes": "a" * (232 - len(".caffemodel")) + ".caffemodel",
    "255 bytes": "b" * (255 - len(".caffemodel")) + ".caffemodel",
    "255 bytes of UTF-8": "é" * 122 + ".caffemodel",
}


@pytest.mark.parametrize("name", LONG.values(), ids=LONG.keys())
def test_long_names_work_and_their_temp_files_fit_in_name_max(tmp_path, name):
    assert len(os.fsencode(name)) in (232, 255)
    src = tmp_path / name
    src.write_bytes(M_OLD)
    out = tmp_path / "out"
    out.mkdir()
    calls = Calls()
    with with_calls(calls):
        commit.commit([Output(out / "x.prototxt", P_NEW), Output(out / name, M_NEW, src)])  # -o
        commit.commit([Output(src, M_NEW, src, True)])  # in place (its .orig could not fit)
    created = [Path(args[0]) for _, n, args in calls.log if n in ("open", "link")]
    assert created and all(len(os.fsencode(c.name)) <= 255 for c in created)
    assert (out / name).read_bytes() == M_NEW and src.read_bytes() == M_NEW
    assert names(out) == sorted(["x.prototxt", name])
    # a killed run's leftovers are recognised for these names too
    leftovers = sorted([commit.temp_name(src), commit.temp_name(src, commit.OLD)])
    for path in leftovers:
        path.write_bytes(b"left by a killed bnfix")
    assert sorted(commit.sweep(src)) == leftovers


def test_temp_names_are_recognisable_and_distinct_for_long_names_sharing_a_start():
    a, b = Path("/d/" + "x" * 240 + "1"), Path("/d/" + "x" * 240 + "2")
    ta, tb = commit.temp_name(a), commit.temp_name(b)
    assert re.fullmatch(r"\.x+~[0-9a-f]{8}\.[0-9a-f]{12}\.bnfix-tmp", ta.name)
    assert len(ta.name) == 255 and ta.name.split(".")[1] != tb.name.split(".")[1]
    assert commit.temp_name(Path("/d/m.caffemodel")).name[:len(".m.caffemodel.")] == ".m.caffemodel."


def test_sweep_removes_only_what_bnfix_left_for_that_target(tmp_path):
    p = tmp_path / "m.prototxt"
    p.write_bytes(P_OLD)
    ours = [commit.temp_name(p), commit.temp_name(p, commit.OLD), commit.temp_name(Path(f"{p}.orig"))]
    others = [commit.temp_name(tmp_path / "m.prototxt2"), commit.temp_name(tmp_path / "n.prototxt"),
              tmp_path / ".m.prototxt.zzzzzzzzzzzz.bnfix-tmp", tmp_path / ".m.prototxt.swp",
              tmp_path / ".m.prototxt.bnfix-lock"]
    for f in ours + others:
        f.write_bytes(b"x")
    assert sorted(commit.sweep(p)) == sorted(ours)
    assert names(tmp_path) == sorted(["m.prototxt"] + [f.name for f in others])
    assert commit.sweep(tmp_path / "missing" / "m.prototxt") == []


def test_a_leftover_that_cannot_be_removed_is_one_line_naming_it(tmp_path):
    p = tmp_path / "m.prototxt"
    leftover = commit.temp_name(p)
    leftover.write_bytes(b"x")
    with with_calls(Calls(deny={"unlink": errno.EPERM})), pytest.raises(commit.SweepFailed) as info:
        commit.sweep(p)
    assert str(info.value) == f"{p}: cannot remove {leftover}, left by an earlier bnfix: Operation not permitted"


def test_make_dirs_reports_what_it_created(tmp_path):
    made = commit.make_dirs(tmp_path / "a" / "b")
    assert made == [tmp_path / "a", tmp_path / "a" / "b"] and commit.make_dirs(tmp_path / "a") == []
    commit.remove_dirs(made)
    assert names(tmp_path) == []


# -- signals in process ----------------------------------------------------------------------


@pytest.fixture
def handlers() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in commit.SIGNALS}
    hook = sys.unraisablehook
    commit.install_signal_handlers()
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        sys.unraisablehook = hook
        commit._swallowed.clear()


class _Dropped:
    """Raises ``error`` from ``__del__``, where Python cannot raise it (as in a weakref callback)."""

    def __init__(self, error: BaseException):
        self.error = error

    def __del__(self) -> None:
        raise self.error


def test_a_signal_that_python_swallows_is_kept_and_raised_once_later(handlers):
    _Dropped(commit.Terminated(signal.SIGTERM))  # without bnfix's hook: "Exception ignored in ..."
    with pytest.raises(commit.Terminated) as info:
        commit.raise_swallowed()
    assert info.value.signum == signal.SIGTERM
    commit.raise_swallowed()  # raised once: nothing left


def test_other_exceptions_python_cannot_raise_still_reach_the_hook_before_bnfixs():
    seen: list[BaseException | None] = []
    saved, handlers = sys.unraisablehook, {s: signal.getsignal(s) for s in commit.SIGNALS}
    sys.unraisablehook = lambda unraisable: seen.append(unraisable.exc_value)
    try:
        commit.install_signal_handlers()
        commit.install_signal_handlers()  # a second call does not wrap bnfix's hook in itself
        _Dropped(ValueError("a bug in a __del__"))
        commit.raise_swallowed()
    finally:
        sys.unraisablehook = saved
        for s, h in handlers.items():
            signal.signal(s, h)
    assert [repr(e) for e in seen] == ["ValueError('a bug in a __del__')"]


def test_a_swallowed_signal_stops_a_commit_before_it_writes(tmp_path, handlers):
    p, m = pair_in(tmp_path)
    _Dropped(KeyboardInterrupt())
    with pytest.raises(commit.Interrupted) as info:
        commit.commit([Output(p, P_NEW), Output(m, M_NEW)])
    assert str(info.value) == f"interrupted by SIGINT; nothing was changed: {p} and {m} are as before"
    assert names(tmp_path) == ["m.caffemodel", "m.prototxt"] and p.read_bytes() == P_OLD


def test_ctrl_c_while_writing_removes_the_temps(tmp_path):
    p, m = pair_in(tmp_path)

    def interrupted(fd: int) -> None:
        os.write(fd, b"half")
        raise KeyboardInterrupt

    with pytest.raises(commit.Interrupted) as info:
        commit.commit([Output(p, P_NEW), Output(m, interrupted)])
    assert str(info.value) == f"interrupted by SIGINT; nothing was changed: {p} and {m} are as before"
    assert (info.value.state, info.value.exit_code, info.value.committed) == (State.UNCHANGED, 130, None)
    assert names(tmp_path) == ["m.caffemodel", "m.prototxt"]


class _InterruptingDescriptor:
    def __set_name__(self, owner: type, name: str) -> None:
        raise KeyboardInterrupt


def _create_a_class() -> None:
    """Ctrl-C while a class is created: on Python 3.10 and 3.11 it arrives as a RuntimeError."""
    type("Late", (), {"d": _InterruptingDescriptor()})


def test_ctrl_c_that_python_wrapped_in_a_runtime_error_is_still_an_interrupt():
    with pytest.raises(BaseException) as info:
        _create_a_class()
    interrupt = commit.interrupt_in(info.value)
    assert isinstance(interrupt, KeyboardInterrupt)
    assert interrupt is (info.value if isinstance(info.value, KeyboardInterrupt) else info.value.__cause__)
    assert commit.interrupt_in(RuntimeError("other")) is None
    caused = ValueError("a bug while handling a Ctrl-C")
    caused.__cause__ = KeyboardInterrupt()
    assert commit.interrupt_in(caused) is None  # only Python's own RuntimeError wrapper counts


def test_ctrl_c_while_a_class_is_created_in_a_fill_is_an_interrupt_that_removes_the_temps(tmp_path):
    p, m = pair_in(tmp_path)

    def interrupted(fd: int) -> None:
        os.write(fd, b"half")
        _create_a_class()

    with pytest.raises(commit.Interrupted) as info:
        commit.commit([Output(p, P_NEW), Output(m, interrupted)])
    assert str(info.value) == f"interrupted by SIGINT; nothing was changed: {p} and {m} are as before"
    assert (info.value.state, info.value.exit_code) == (State.UNCHANGED, 130)
    assert names(tmp_path) == ["m.caffemodel", "m.prototxt"] and p.read_bytes() == P_OLD


def test_sigterm_while_writing_removes_the_temps(tmp_path, handlers):
    p, m = pair_in(tmp_path)

    def terminated(fd: int) -> None:
        signal_me(signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this

    with pytest.raises(commit.Interrupted) as info:
        commit.commit([Output(p, P_NEW), Output(m, terminated)])
    assert str(info.value) == f"interrupted by SIGTERM; nothing was changed: {p} and {m} are as before"
    assert info.value.exit_code == 143
    assert names(tmp_path) == ["m.caffemodel", "m.prototxt"] and p.read_bytes() == P_OLD


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_between_the_renames_is_delivered_after_the_commit(tmp_path, handlers, signum):
    p, m = pair_in(tmp_path)
    seen = []

    def hook(number, module, name, args):
        if name == "replace" and str(args[1]) == str(p):
            signal_me(signum)  # right before the first rename
            seen.append(number)

    with with_calls(Calls(hook=hook)), pytest.raises(commit.Interrupted) as info:
        commit.commit([Output(p, P_NEW), Output(m, M_NEW)])
    name = signal.Signals(signum).name
    assert seen and str(info.value) == f"interrupted by {name} after the commit: {p} and {m} are new"
    assert info.value.state is State.COMMITTED and info.value.committed == commit.Committed((p, m), (), ())
    assert (p.read_bytes(), m.read_bytes()) == (P_NEW, M_NEW)
    assert names(tmp_path) == ["m.caffemodel", "m.prototxt"]
    assert signal.getsignal(signum) is commit._raise_terminated  # the handlers are back


def test_a_signal_just_after_the_renames_is_reported_as_committed(tmp_path, monkeypatch):
    """A signal whose handler runs right after the held-off section, before commit returns."""
    p, m = pair_in(tmp_path)

    def lands_now(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(commit.HoldSignals, "deliver", lands_now)
    with pytest.raises(commit.Interrupted) as info:
        commit.commit([Output(p, P_NEW), Output(m, M_NEW)])
    assert str(info.value) == f"interrupted by SIGINT after the commit: {p} and {m} are new"
    assert info.value.committed == commit.Committed((p, m), (), ())
    assert (p.read_bytes(), m.read_bytes()) == (P_NEW, M_NEW) and names(tmp_path) == ["m.caffemodel", "m.prototxt"]


def test_an_ignored_signal_stays_ignored(tmp_path):
    saved = {s: signal.getsignal(s) for s in commit.SIGNALS}
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        commit.install_signal_handlers()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        p, m = pair_in(tmp_path)

        def hook(number, module, name, args):
            if name == "replace":
                signal_me(signal.SIGHUP)

        with with_calls(Calls(hook=hook)):
            done = commit.commit([Output(p, P_NEW), Output(m, M_NEW)])  # nohup: no interruption
        assert done.outputs == (p, m)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


# -- real processes: SIGKILL and signals while saving a large pair ---------------------------


SIZE = 200 << 20


def start(directory: Path, version: int, *extra: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(DRIVER.parent), *sys.path]))
    child = subprocess.Popen([sys.executable, str(DRIVER), "commit", str(directory), str(version), str(SIZE), *extra],
                             stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    return child


def versions(directory: Path) -> tuple[int, int]:
    """The version of each file of the pair, checking that each holds exactly that version."""
    p, m = driver.pair(str(directory))
    pv = int(p.read_bytes().split()[-1])
    assert p.read_bytes() == driver.prototxt(pv)
    with open(m, "rb") as f:
        head = f.readline()
        mv = int(head.split()[-1])
        assert head == driver.header(mv)
        body, left = driver.block(mv), SIZE
        while left:
            chunk = f.read(min(left, len(body)))
            assert chunk == body[:len(chunk)], f"{m}: not exactly version {mv}"
            left -= len(chunk)
        assert f.read() == b""
    return pv, mv


def seed(directory: Path) -> None:
    directory.mkdir()
    p, m = driver.pair(str(directory))
    p.write_bytes(driver.prototxt(0))
    with open(m, "wb") as f:
        driver.fill_model(0, SIZE)(f.fileno())


def sweep_under_lock(directory: Path) -> list[str]:
    p, m = driver.pair(str(directory))
    with lock.acquire(exclusive=[p, m]):
        return sorted(x.name for path in (p, m) for x in commit.sweep(path))


def test_sigkill_at_any_moment_leaves_old_new_or_new_prototxt_with_old_caffemodel(tmp_path):
    d = tmp_path / "pair"
    seed(d)
    rng = random.Random(8)
    child = start(d, 1, "--lock")
    t0 = time.monotonic()  # from "ready" to the end: the time a kill can hit
    assert child.wait(60) == 0
    duration = time.monotonic() - t0
    assert versions(d) == (1, 1)
    outcomes = {"old": 0, "new": 0, "new prototxt, old caffemodel": 0}
    left_total = 0
    rounds = [("random", ())] * 14 + [("between the renames", ("--slow-rename", "0.2"))] * 3 + \
             [("random, synced", ("--sync",))] * 3
    for version, (how, extra) in enumerate(rounds, start=2):
        before = versions(d)
        child = start(d, version, "--lock", *extra)
        if how == "between the renames":
            assert child.stdout.readline() == "renamed 1\n"
        else:
            time.sleep(rng.uniform(0, duration * (2.5 if "synced" in how else 1.0)))
        child.kill()
        child.wait(30)
        now = versions(d)
        if now == before:
            outcomes["old"] += 1
        elif now == (version, version):
            outcomes["new"] += 1
        else:
            assert now == (version, before[1]), (how, before, now)  # never old prototxt + new caffemodel
            outcomes["new prototxt, old caffemodel"] += 1
        if how == "between the renames":
            assert now == (version, before[1])
        left = sweep_under_lock(d)
        assert all(re.fullmatch(r"\.m\.(prototxt|caffemodel)\.[0-9a-f]{12}\.bnfix-(tmp|old)", n) for n in left)
        left_total += len(left)
        assert set(names(d)) - {".m.prototxt.bnfix-lock", ".m.caffemodel.bnfix-lock"} == {"m.caffemodel", "m.prototxt"}
    assert outcomes["new prototxt, old caffemodel"] >= 3 and left_total > 0, outcomes
    # and the next plain run completes the pair
    assert start(d, 99, "--lock").wait(60) == 0 and versions(d) == (99, 99)
    assert names(d) == ["m.caffemodel", "m.prototxt"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_mid_save_leaves_no_temp_and_the_report_is_true(tmp_path, signum):
    d = tmp_path / "pair"
    seed(d)
    p, m = driver.pair(str(d))
    name = signal.Signals(signum).name
    rng = random.Random(signum)
    reports = set()
    plan = [(0.0, ()), (rng.uniform(0, 0.05), ()), (rng.uniform(0, 0.2), ()),
            ("between the renames", ("--slow-rename", "0.2"))]
    for version, (when, extra) in enumerate(plan, start=1):
        before = versions(d)
        child = start(d, version, "--handlers", "--lock", *extra)
        if isinstance(when, float):
            time.sleep(when)
        else:
            assert child.stdout.readline() == "renamed 1\n"
        child.send_signal(signum)
        out, _ = child.communicate(timeout=60)
        report = json.loads(out.splitlines()[-1])
        now = versions(d)
        assert names(d) == ["m.caffemodel", "m.prototxt"]  # no temp, rollback link or lock file
        if report["result"] == "committed":  # it had finished before the signal came
            assert now == (version, version) and child.returncode in (0, -signum, 128 + signum)
        elif report["result"] == "interrupted before the commit":
            assert now == before and child.returncode == 128 + signum
        elif report["result"] == "interrupted after the commit":  # e.g. while releasing the locks
            assert now == (version, version) and child.returncode == 128 + signum
        elif report["state"] == "unchanged":
            assert now == before and child.returncode == 128 + signum
            assert report["message"] == f"interrupted by {name}; nothing was changed: {p} and {m} are as before"
        else:
            assert report["state"] == "committed" and now == (version, version)
            assert report["message"] == f"interrupted by {name} after the commit: {p} and {m} are new"
            assert child.returncode == 128 + signum
        if when == "between the renames":
            assert report["result"] == "interrupted" and report["state"] == "committed"
        reports.add(report.get("state", "finished"))
    assert "unchanged" in reports, reports


def test_a_default_sigterm_between_the_renames_still_completes_the_pair(tmp_path):
    """Without handlers SIGTERM kills at once, but not between the renames: held off there."""
    d = tmp_path / "pair"
    seed(d)
    child = start(d, 1, "--slow-rename", "0.2")
    assert child.stdout.readline() == "renamed 1\n"
    child.send_signal(signal.SIGTERM)
    child.wait(30)
    assert child.returncode == -signal.SIGTERM
    assert versions(d) == (1, 1) and names(d) == ["m.caffemodel", "m.prototxt"]
