"""A child process for the commit layer's kill, signal and concurrency tests (not a test itself).

    python faults_driver.py commit DIR VERSION SIZE [--sync] [--handlers] [--lock] [--slow-rename S]
    python faults_driver.py writer DIR NAME ROUNDS [--reverse]
    python faults_driver.py reader DIR ROUNDS   (until stdin closes)
    python faults_driver.py hold DIR OWNER

``commit`` writes version VERSION of the pair ``DIR/m.prototxt`` + ``DIR/m.caffemodel`` (the
caffemodel SIZE bytes plus a header, written by ``fill(fd)``), prototxt first.  It prints
``ready`` once set up, with ``--slow-rename`` ``renamed N`` after the N-th rename of a target
(sleeping S seconds before each, so a test can hit the gap between them), and at the end one
JSON line saying what it thinks happened.  ``writer``/``reader`` loop under ``bnfix.lock`` and
count the inconsistent pairs they see; ``hold`` keeps the pair's exclusive lock until stdin
closes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from bnfix import commit, lock

BLOCK = 1 << 22


def prototxt(version: int) -> bytes:
    return f"prototxt version {version}\n".encode()


def header(version: int) -> bytes:
    return f"caffemodel version {version:08d}\n".encode()


def block(version: int) -> bytes:
    """The caffemodel body is this block repeated (and cut to the size)."""
    return bytes([version % 251]) * BLOCK


def fill_model(version: int, size: int):
    def fill(fd: int) -> None:
        head, body = header(version), block(version)
        os.pwrite(fd, head, 0)
        for offset in range(0, size, BLOCK):
            view = memoryview(body)[:min(BLOCK, size - offset)]
            while view:
                n = os.pwrite(fd, view, len(head) + offset)
                view, offset = view[n:], offset + n

    return fill


def pair(directory: str) -> tuple[Path, Path]:
    d = Path(directory)
    return d / "m.prototxt", d / "m.caffemodel"


class SlowRenames:
    """Stands in for ``bnfix.commit.os``: sleeps before each rename onto a target and prints
    ``renamed N`` after it."""

    def __init__(self, delay: float, targets: tuple[Path, ...]):
        self.delay, self.targets, self.count = delay, {str(t) for t in targets}, 0

    def __getattr__(self, name: str):
        real = getattr(os, name)
        if name != "replace":
            return real

        def replace(src, dst):
            onto_target = str(dst) in self.targets and str(src).endswith(commit.TMP)
            if onto_target:
                time.sleep(self.delay)
            real(src, dst)
            if onto_target:
                self.count += 1
                print(f"renamed {self.count}", flush=True)

        return replace


def run_commit(args: list[str]) -> int:
    directory, version, size = args[0], int(args[1]), int(args[2])
    p, m = pair(directory)
    if "--handlers" in args:
        commit.install_signal_handlers()
    if "--slow-rename" in args:
        commit.os = SlowRenames(float(args[args.index("--slow-rename") + 1]), (p, m))  # type: ignore[assignment]
    outputs = [commit.Output(p, prototxt(version)), commit.Output(m, fill_model(version, size))]
    report: dict[str, object]
    done = None
    try:
        held = lock.acquire(exclusive=[p, m], wait=30, owner=f"writing {p} and {m}") \
            if "--lock" in args else lock.Held(())
        with held:
            for path in (p, m):
                commit.sweep(path)
            print("ready", flush=True)
            done = commit.commit(outputs, sync="--sync" in args)
        report, code = {"result": "committed"}, 0
    except commit.Interrupted as exc:
        report = {"result": "interrupted", "state": exc.state.value, "signal": exc.signum,
                  "message": str(exc)}
        code = exc.exit_code
    except commit.CommitError as exc:
        report, code = {"result": "error", "state": exc.state.value, "message": str(exc)}, 2
    except KeyboardInterrupt as exc:  # came before commit() was entered, or after it returned
        signum = getattr(exc, "signum", 2)
        when, state = ("after", "committed") if done is not None else ("before", "unchanged")
        report = {"result": f"interrupted {when} the commit", "state": state, "signal": signum}
        code = 128 + signum
    print(json.dumps(report), flush=True)
    return code


def tag(data: bytes) -> bytes:
    return data.split(b"\n", 1)[0]


def run_writer(args: list[str]) -> int:
    directory, name, rounds = args[0], args[1], int(args[2])
    p, m = pair(directory)
    order = [m, p] if "--reverse" in args else [p, m]
    bad = 0
    for r in range(rounds):
        text = f"{name} {r}".encode()
        with lock.acquire(exclusive=order, wait=60, owner=f"writing {p} and {m} as {name}"):
            commit.commit([commit.Output(p, text + b"\n"), commit.Output(m, text + b"\n" + b"w" * 65536)],
                          sync=False)
            # Under the lock nobody else may change the pair: it must be entirely ours.
            if tag(p.read_bytes()) != text or tag(m.read_bytes()) != text:
                bad += 1
    print(json.dumps({"rounds": rounds, "bad": bad}), flush=True)
    return 0


def run_reader(args: list[str]) -> int:
    """Reads the pair under shared locks: prints ``ready`` after its first read, then goes on
    until stdin closes (the test closes it once the writers are done), ROUNDS reads at least,
    so its reads overlap the writers' commits from the first to the last."""
    import select

    directory, rounds = args[0], int(args[1])
    p, m = pair(directory)
    bad, seen, done = 0, set(), 0
    while done < rounds or not select.select([sys.stdin], [], [], 0)[0]:
        done += 1
        with lock.acquire(shared=[p, m], wait=60):
            pt, mt = tag(p.read_bytes()), tag(m.read_bytes())
        if pt != mt:
            bad += 1
        seen.add(pt)
        if done == 1:
            print("ready", flush=True)
        time.sleep(0.0005)
    print(json.dumps({"rounds": done, "bad": bad, "seen": len(seen)}), flush=True)
    return 0


def run_hold(args: list[str]) -> int:
    p, m = pair(args[0])
    with lock.acquire(exclusive=[p, m], owner=args[1]):
        print("locked", flush=True)
        sys.stdin.read()
    return 0


def main() -> int:
    mode, rest = sys.argv[1], sys.argv[2:]
    return {"commit": run_commit, "writer": run_writer, "reader": run_reader, "hold": run_hold}[mode](rest)


if __name__ == "__main__":
    sys.exit(main())
