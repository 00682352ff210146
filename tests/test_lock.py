"""Advisory locks (``bnfix.lock``): two bnfix processes never interleave on one pair (issue 8,
point 4).  Exact Busy messages, lock files that do not accumulate, the unlink race, read-only
stores, and real processes: two writers (taking the pair's locks in opposite orders) and a
reader, many rounds each."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from faults import Calls, signal_me

from bnfix import commit, lock

DRIVER = Path(__file__).with_name("faults_driver.py")
OWNER = "writing out/m.prototxt and out/m.caffemodel"


def names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    p, m = tmp_path / "m.prototxt", tmp_path / "m.caffemodel"
    p.write_bytes(b"p")
    m.write_bytes(b"m")
    return p, m


def child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(DRIVER.parent), *sys.path]))


def test_an_exclusive_lock_file_names_its_holder_and_goes_on_release(pair):
    p, _ = pair
    with lock.acquire(exclusive=[p], owner=OWNER) as held:
        (only,) = held.locks
        assert only == lock.Lock(p, p.with_name(".m.prototxt.bnfix-lock"), only.fd, True)
        assert only.file.read_text() == f"{os.getpid()} {OWNER}\n"
    assert names(p.parent) == ["m.caffemodel", "m.prototxt"]


def test_busy_names_the_other_writer(pair):
    p, m = pair
    with lock.acquire(exclusive=[p, m], owner=OWNER):
        with pytest.raises(lock.Busy) as info:
            lock.acquire(exclusive=[p, m], wait=0)
        assert str(info.value) == f"{m}: busy: another bnfix (pid {os.getpid()}) is {OWNER}"
        assert (info.value.path, info.value.pid, info.value.owner) == (m, os.getpid(), OWNER)
        with pytest.raises(lock.Busy) as info:
            lock.acquire(shared=[p], wait=0)  # a reader waits for a writer too
        assert str(info.value) == f"{p}: busy: another bnfix (pid {os.getpid()}) is {OWNER}"
    assert names(p.parent) == ["m.caffemodel", "m.prototxt"]


def test_busy_says_when_the_holder_is_a_reader(pair):
    p, _ = pair
    with lock.acquire(shared=[p]), pytest.raises(lock.Busy) as info:
        lock.acquire(exclusive=[p], wait=0)
    assert str(info.value) == f"{p}: busy: another bnfix is reading it"
    assert info.value.pid is None


def test_busy_names_a_writer_in_another_process(pair):
    p, m = pair
    holder = subprocess.Popen([sys.executable, str(DRIVER), "hold", str(p.parent), f"writing {p} and {m}"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(lock.Busy) as info:
            lock.acquire(exclusive=[p, m], wait=0)
        assert str(info.value) == f"{m}: busy: another bnfix (pid {holder.pid}) is writing {p} and {m}"
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0
    assert names(p.parent) == ["m.caffemodel", "m.prototxt"]
    with lock.acquire(exclusive=[p, m], wait=0):
        pass


def test_a_killed_holder_leaves_a_lock_file_that_the_next_run_takes_over(pair):
    p, m = pair
    holder = subprocess.Popen([sys.executable, str(DRIVER), "hold", str(p.parent), OWNER],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env())
    assert holder.stdout.readline() == "locked\n"
    holder.kill()
    holder.communicate(timeout=30)
    assert ".m.prototxt.bnfix-lock" in names(p.parent)
    with lock.acquire(exclusive=[p, m], wait=0, owner="me"):
        assert p.with_name(".m.prototxt.bnfix-lock").read_text() == f"{os.getpid()} me\n"
    assert names(p.parent) == ["m.caffemodel", "m.prototxt"]


def test_waiting_gives_up_after_the_time_asked(pair):
    p, _ = pair
    with lock.acquire(exclusive=[p], owner=OWNER):
        t0 = time.monotonic()
        with pytest.raises(lock.Busy) as info:
            lock.acquire(exclusive=[p], wait=0.3)
        waited = time.monotonic() - t0
    assert str(info.value) == f"{p}: busy: another bnfix (pid {os.getpid()}) is {OWNER} (waited 0.3 s)"
    assert 0.3 <= waited < 2.0


def test_waiting_gets_the_lock_once_the_holder_is_done(pair):
    p, _ = pair
    first = lock.acquire(exclusive=[p])
    timer = threading.Timer(0.2, first.release)
    timer.start()
    t0 = time.monotonic()
    with lock.acquire(exclusive=[p], wait=10) as held:
        assert time.monotonic() - t0 >= 0.15
        assert os.fstat(held.locks[0].fd).st_ino == held.locks[0].file.stat().st_ino
    timer.join()


def test_readers_share_and_the_last_one_removes_the_lock_file(pair):
    p, _ = pair
    file = p.with_name(".m.prototxt.bnfix-lock")
    a = lock.acquire(shared=[p], wait=0)
    b = lock.acquire(shared=[p], wait=0)
    assert file.read_bytes() == b""  # readers write nothing
    a.release()
    assert file.exists()  # b still reads
    b.release()
    assert not file.exists()


def test_a_path_both_read_and_written_is_locked_exclusively_and_the_order_is_global(tmp_path):
    paths = [tmp_path / n for n in ("z.caffemodel", "a.prototxt", "m.caffemodel")]
    with lock.acquire(exclusive=[paths[0]], shared=paths) as held:
        assert [lk.file.name for lk in held.locks] == [".a.prototxt.bnfix-lock", ".m.caffemodel.bnfix-lock",
                                                        ".z.caffemodel.bnfix-lock"]
        assert [lk.exclusive for lk in held.locks] == [False, False, True]
    with lock.acquire(exclusive=[paths[1]], shared=[paths[1]]) as held:
        assert held.locks[0].exclusive


def test_every_name_of_a_file_shares_its_lock(tmp_path):
    real = tmp_path / "store" / "m.caffemodel"
    real.parent.mkdir()
    real.write_bytes(b"m")
    link = tmp_path / "m.caffemodel"
    link.symlink_to(real)
    with lock.acquire(exclusive=[link], owner=OWNER), pytest.raises(lock.Busy):
        lock.acquire(shared=[real], wait=0)
    assert names(real.parent) == ["m.caffemodel"]


def test_lock_file_names_fit_in_name_max(tmp_path):
    p = tmp_path / ("x" * 250 + ".pro")
    with lock.acquire(exclusive=[p]) as held:
        assert len(held.locks[0].file.name) == 255 and held.locks[0].file.name.endswith(".bnfix-lock")


@pytest.mark.parametrize("err", [errno.EACCES, errno.EROFS], ids=errno.errorcode.get)
def test_a_read_only_store_skips_the_shared_lock_but_refuses_a_write(pair, monkeypatch, err):
    p, _ = pair
    monkeypatch.setattr(lock, "os", Calls(deny={"open": err}).os_for("lock"))
    with lock.acquire(shared=[p]) as held:
        assert held.locks == ()
    with pytest.raises(lock.LockFailed) as info:
        lock.acquire(exclusive=[p])
    assert str(info.value) == (f"{p}: cannot lock it for writing: {os.strerror(err)} "
                               f"(lock file {p.with_name('.m.prototxt.bnfix-lock')})")


def test_a_failure_midway_releases_the_locks_already_taken(pair, monkeypatch):
    p, m = pair
    probe = Calls()
    monkeypatch.setattr(lock, "os", probe.os_for("lock"))
    lock.acquire(exclusive=[p, m]).release()
    second_open = [i for i, (_, n, _) in enumerate(probe.log) if n == "open"][1]
    calls = Calls({second_open: errno.EIO})
    monkeypatch.setattr(lock, "os", calls.os_for("lock"))
    with pytest.raises(lock.LockFailed) as info:
        lock.acquire(exclusive=[p, m])
    assert calls.names() == ["lock.open", "lock.fstat", "lock.stat", "lock.ftruncate", "lock.pwrite",
                             "lock.open", "lock.unlink", "lock.close"]  # m's lock, p's fails, m's goes
    assert str(info.value) == (f"{p}: cannot lock it for writing: Input/output error "
                               f"(lock file {p.with_name('.m.prototxt.bnfix-lock')})")
    monkeypatch.undo()
    assert names(p.parent) == ["m.caffemodel", "m.prototxt"]
    with lock.acquire(exclusive=[p, m], wait=0):
        pass


@pytest.mark.parametrize("kind", ["exclusive", "shared"])
def test_a_ctrl_c_at_any_call_of_acquire_leaves_no_lock_file(pair, monkeypatch, kind):
    """SIGINT just before each system call of an acquire, in turn.  (Regression: one that came
    after the lock file was locked, before acquire had recorded it, left the file behind; CI
    saw ``.m.caffemodel.bnfix-lock`` after a Ctrl-C, 2026-12-01.)"""
    p, m = pair
    paths = {kind: [p, m]}
    probe = Calls()
    monkeypatch.setattr(lock, "os", probe.os_for("lock"))
    lock.acquire(**paths).release()
    count = [name for _, name, _ in probe.log].index("unlink")  # the calls before the release
    assert count >= 4
    for k in range(count):
        def hook(number, module, name, args, k=k):
            if number == k:
                signal_me(signal.SIGINT)

        calls = Calls(hook=hook)
        monkeypatch.setattr(lock, "os", calls.os_for("lock"))
        with pytest.raises(KeyboardInterrupt):
            lock.acquire(**paths)
        assert names(p.parent) == ["m.caffemodel", "m.prototxt"], (k, calls.names())
        monkeypatch.setattr(lock, "os", os)
        lock.acquire(exclusive=[p, m], wait=0).release()  # nothing is still locked


def test_a_waiter_that_locked_a_removed_lock_file_starts_again(pair, monkeypatch):
    """The unlink race: the waiter opened the lock file, the holder removed it on release; the
    waiter's flock then succeeds on a file no longer at that path, so it must retry."""
    p, _ = pair
    file = p.with_name(".m.prototxt.bnfix-lock")
    holder = lock.acquire(exclusive=[p])
    calls = Calls()
    monkeypatch.setattr(lock, "os", calls.os_for("lock"))
    busy, go = threading.Event(), threading.Event()

    class Clock:
        """lock's ``time``: its first sleep comes after the waiter's first flock failed; it
        waits there until the holder has released (and removed) the file."""

        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def sleep(seconds: float) -> None:
            if not busy.is_set():
                busy.set()
                go.wait(10)
            time.sleep(seconds)

    monkeypatch.setattr(lock, "time", Clock)
    got: list[lock.Held] = []
    waiter = threading.Thread(target=lambda: got.append(lock.acquire(exclusive=[p], wait=10)))
    waiter.start()
    assert busy.wait(10)
    holder.release()
    go.set()
    waiter.join(10)
    (held,) = got
    opens = [args[0] for _, n, args in calls.log if n == "open"]
    assert opens == [file, file]  # it opened the removed file, then the new one
    assert os.fstat(held.locks[0].fd).st_ino == file.stat().st_ino  # (the number may be reused)
    monkeypatch.undo()
    with pytest.raises(lock.Busy):
        lock.acquire(exclusive=[p], wait=0)
    held.release()
    assert not file.exists()


def test_two_writers_and_a_reader_never_see_a_mixed_pair(tmp_path):
    """Many rounds: each writer commits its own pair under the pair's exclusive locks (one
    names them in the other order) and checks, still under the lock, that the pair on disk is
    entirely its own; the reader, under shared locks, checks that both files carry one tag."""
    d = tmp_path / "pair"
    d.mkdir()
    (d / "m.prototxt").write_bytes(b"seed\n")
    (d / "m.caffemodel").write_bytes(b"seed\n")
    run = [sys.executable, str(DRIVER)]
    reader = subprocess.Popen(run + ["reader", str(d), "300"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=child_env())
    assert reader.stdout is not None and reader.stdout.readline() == "ready\n"  # reading before they write
    writers = [subprocess.Popen(run + args, stdout=subprocess.PIPE, text=True, env=child_env())
               for args in (["writer", str(d), "A", "150"], ["writer", str(d), "B", "150", "--reverse"])]
    reports = [json.loads(proc.communicate(timeout=120)[0]) for proc in writers]
    reports.append(json.loads(reader.communicate(timeout=120)[0]))  # closes its stdin: it stops
    assert [proc.returncode for proc in (*writers, reader)] == [0, 0, 0]
    assert reports[0] == {"rounds": 150, "bad": 0} and reports[1] == {"rounds": 150, "bad": 0}
    assert reports[2]["bad"] == 0 and reports[2]["rounds"] >= 300 and reports[2]["seen"] >= 3, reports[2]
    final_p, final_m = (d / "m.prototxt").read_bytes(), (d / "m.caffemodel").read_bytes()
    assert final_p.split(b"\n")[0] == final_m.split(b"\n")[0] in (b"A 149", b"B 149")
    assert names(d) == ["m.caffemodel", "m.prototxt"]  # no lock file, no temp file


def test_commit_under_a_lock_leaves_nothing_behind(pair):
    p, m = pair
    with lock.acquire(exclusive=[p, m], owner=OWNER):
        for path in (p, m):
            assert commit.sweep(path) == []
        commit.commit([commit.Output(p, b"P"), commit.Output(m, b"M")], sync=False)
    assert names(p.parent) == ["m.caffemodel", "m.prototxt"]
