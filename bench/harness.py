"""How contenders are timed: each as its own process, interleaved, with the OS's own numbers.

The machine is a noisy 2-core VM on a shared virtual disk: the same copy can take 60 ms or
450 ms a few seconds apart.  A comparison is only fair when the contenders share the noise, so
they run interleaved (A B, B A, A B, ...: the order rotates each round, so none always follows
the same neighbour), every run starts from the same state (inputs in the page cache, no output,
no dirty pages), and a ratio is taken *pair by pair* within a round, then the median over the
rounds.

Wall time runs from ``Popen`` to ``os.wait4`` with no shell in between; peak RSS is the child's
``ru_maxrss`` from the same ``wait4`` (the kernel's number, no external tool).  Linux folds the
spawning process's RSS high-water mark into a child's ``ru_maxrss`` at ``exec``, so a harness
with numpy loaded would inflate every child's number.  The contenders are therefore started by a
lean helper (``python -I -S -c SPAWNER``) that resets its own high-water mark through
``/proc/self/clear_refs`` before each spawn.  What remains (~11 MiB) is the floor, shown by the
``true`` contender; a value at the floor means "at most this".

This module knows nothing about bnfix: ``suite.py`` says what to run, ``goals.py`` what to
expect.  It imports only the standard library, and so does every module the harness process
loads, to keep that process small.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, TypeVar

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BENCH_PY = HERE / "bench.py"
MIB = 1 << 20
# Where the contenders import bnfix from: this checkout, or (bench.py --bnfix DIR) a directory
# holding another version of the package, e.g. an export of the last commit.
BNFIX_ROOT = REPO
T = TypeVar("T")

Log = Callable[[str], None]
Check = Callable[[Path], "str | None"]  # looks at a contender's output dir after the warm-up


@dataclass
class Contender:
    """One process to time, and what it measured."""

    key: str
    label: str
    argv: list[str]
    outdir: Path
    env: dict[str, str] | None = None
    check: Check | None = None
    times: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def peak_rss_mib(self) -> float | None:
        return max(self.rss_kib) / 1024 if self.rss_kib else None

    def summary(self) -> dict[str, object]:
        if not self.times:
            return {"label": self.label, "error": self.error or "not run", "argv": self.argv[:12]}
        return {"label": self.label, "median_s": self.median, "min_s": min(self.times),
                "peak_rss_mib": self.peak_rss_mib, "times_s": self.times,
                "rss_kib": self.rss_kib, "argv": self.argv[:12], "argc": len(self.argv)}


class Sample(NamedTuple):
    wall_s: float
    maxrss_kib: int
    exit_code: int


# The process that spawns the contenders runs this and nothing else.  One request per line on
# stdin: [argv, env, stderr path]; one reply per line on stdout: [wall seconds from Popen to
# os.wait4, the child's ru_maxrss in KiB, exit code].
SPAWNER = r"""
import json, os, subprocess, sys, time
while True:
    line = sys.stdin.readline()
    if not line:
        break
    argv, env, errpath = json.loads(line)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset our RSS high-water mark to the current RSS
    except OSError:
        pass
    with open(errpath, "wb") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=err)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    sys.stdout.write(json.dumps([wall, ru.ru_maxrss, os.waitstatus_to_exitcode(status)]) + "\n")
    sys.stdout.flush()
"""


class Spawner:
    """A lean child process that starts each contender with Popen and reaps it with wait4."""

    def __init__(self) -> None:
        # cwd "/": `python -m bnfix` puts the working directory first on sys.path, which must
        # not shadow BNFIX_ROOT (every path handed to a contender is absolute).
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", SPAWNER], cwd="/",
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, argv: list[str], env: dict[str, str] | None, errlog: Path) -> Sample:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps([argv, env or dict(os.environ), str(errlog)]) + "\n")
        self.proc.stdin.flush()
        wall, rss, rc = json.loads(self.proc.stdout.readline())
        return Sample(wall, rss, rc)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()


def rotation(items: Sequence[T], r: int) -> list[T]:
    """Round ``r``'s order: the starting item rotates, so nothing always follows the same item."""
    if r < 0 or not items:
        return list(items)
    k = r % len(items)
    return list(items[k:]) + list(items[:k])


def quiesce(settle_s: float | None) -> None:
    """Untimed, before every timed run: no dirty pages left from earlier runs.

    ``None`` skips it (``--no-sync``).  The pause after ``sync`` is there because this virtual
    disk keeps working briefly after sync returns.
    """
    if settle_s is None:
        return
    os.sync()
    if settle_s:
        time.sleep(settle_s)


def cpu_busy(interval_s: float = 1.0) -> float:
    """Fraction of all CPUs' time spent not idle over ``interval_s`` (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    t0, i0 = sample()
    time.sleep(interval_s)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def wait_idle(max_s: float, log: Log, busy_below: float = 0.1) -> None:
    """Wait until the machine is quiet (< 10% CPU busy over a second), at most ``max_s``."""
    deadline = time.monotonic() + max_s
    busy = cpu_busy()
    if busy < busy_below:
        return
    log(f"  waiting for the machine to go quiet ({busy:.0%} busy)")
    while busy >= busy_below and time.monotonic() < deadline:
        busy = cpu_busy(2.0)
    log(f"  {'quiet' if busy < busy_below else 'still busy'} ({busy:.0%} busy)")


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages, recorded with each measurement."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def clear_dir(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for p in d.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def run_phases(phases: Sequence[Sequence[Contender]], rounds: int, settle_s: float | None,
               errdir: Path, log: Log, idle_wait_s: float = 0) -> None:
    """Each phase is interleaved on its own, after an untimed warm-up pass.

    Phases keep a pair of contenders (``cp`` / ``bnfix --no-sync``) next to each other in time.
    The contenders that fsync get their own phase: an fsync of 1.9 GB leaves this virtual disk
    busy after it returns, and in one shared rotation the contender that followed it was
    measured up to 3x slower.  With ``idle_wait_s``, each phase first waits (up to that long)
    for the CPUs to be idle, since other work on the machine is the largest source of noise.
    """
    spawner = Spawner()
    errdir.mkdir(parents=True, exist_ok=True)
    try:
        for phase in phases:
            if idle_wait_s:
                wait_idle(idle_wait_s, log)
            _run_rounds(spawner, list(phase), rounds, settle_s, errdir, log)
    finally:
        spawner.close()


def _run_rounds(spawner: Spawner, contenders: list[Contender], rounds: int,
                settle_s: float | None, errdir: Path, log: Log) -> None:
    live = [c for c in contenders if c.error is None]
    for r in range(-1, rounds):  # round -1: untimed warm-up (also checks every exit code)
        for c in rotation(live, r):
            if c.error is None:
                for other in live:  # every run starts from the same state: only the inputs
                    clear_dir(other.outdir)
                quiesce(settle_s)
                _run_one(spawner, c, errdir, warmup=r < 0, log=log)
        done = [c for c in live if c.times and not c.error]
        if r < 0:
            log("  warm-up pass done (inputs are now in the page cache)")
        elif done:
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{c.key} {c.times[-1]:.3f}s" for c in done))
    for c in live:
        clear_dir(c.outdir)


def _run_one(spawner: Spawner, c: Contender, errdir: Path, *, warmup: bool, log: Log) -> None:
    errlog = errdir / f"{c.key}.stderr"
    s = spawner.run(c.argv, c.env, errlog)
    if s.exit_code != 0:
        tail = errlog.read_text(errors="replace").strip().splitlines()[-3:]
        c.error = f"exit {s.exit_code}: " + " | ".join(tail)
    elif warmup and c.check:
        c.error = c.check(c.outdir)
    if c.error:
        log(f"  {c.label}: FAILED ({c.error})")
    elif not warmup:
        c.times.append(s.wall_s)
        c.rss_kib.append(s.maxrss_kib)


def expect_output(files: int, biggest: int) -> Check:
    """A warm-up check: at least ``files`` files, the largest at least 99% of ``biggest`` bytes."""
    def check(outdir: Path) -> str | None:
        found = [p for p in outdir.rglob("*") if p.is_file()]
        size = max((p.stat().st_size for p in found), default=0)
        if len(found) < files or size < 0.99 * biggest:
            return (f"exit 0 but {len(found)} files in {outdir} (want {files}), largest "
                    f"{size} bytes (want ~{biggest})")
        return None
    return check


def paired_ratio(num: Contender, den: Contender) -> float | None:
    """Median over the rounds of num/den within each round (both ran in the same rounds)."""
    if not num.times or not den.times or len(num.times) != len(den.times):
        return None
    return statistics.median(a / b for a, b in zip(num.times, den.times, strict=True))


def interleave(ops: dict[str, Callable[[], T]], rounds: int,
               before: Callable[[], None]) -> dict[str, list[T]]:
    """In-process counterpart of :func:`run_phases`: warm-up, then ``rounds`` rotations."""
    names = list(ops)
    samples: dict[str, list[T]] = {n: [] for n in names}
    for r in range(-1, rounds):
        for name in rotation(names, r):
            before()
            value = ops[name]()
            if r >= 0:
                samples[name].append(value)
    return samples


def pairwise_medians(samples: dict[str, list[float]], base: str) -> dict[str, float]:
    """For each op, the median over rounds of its time / ``base``'s time in the same round."""
    return {k: statistics.median(a / b for a, b in zip(v, samples[base], strict=True))
            for k, v in samples.items()}


def use_bnfix_from(root: Path) -> None:
    global BNFIX_ROOT
    if not (root / "bnfix" / "__init__.py").is_file():
        raise SystemExit(f"{root}: no bnfix package in this directory")
    BNFIX_ROOT = root.resolve()


def child_env(**extra: str) -> dict[str, str]:
    """The environment every contender gets: bnfix from BNFIX_ROOT first, upb protobuf."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BNFIX_ROOT), env.get("PYTHONPATH")]))
    env.pop("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", None)
    env.update(extra)
    return env


def compile_bnfix() -> None:
    """Byte-compile the bnfix package timed, as ``pip install`` does for an installed one:
    without it every run would compile bnfix from source (PYTHONDONTWRITEBYTECODE=1, as set on
    some machines, keeps Python from caching it) and the start-up measured would be no user's."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(BNFIX_ROOT / "bnfix")], check=True,
                   stdout=subprocess.DEVNULL)


def bnfix_available() -> str | None:
    """None when `import bnfix; bnfix.patch` works from the checkout, else the reason."""
    r = subprocess.run([sys.executable, "-c", "import bnfix; bnfix.patch"],
                       env=child_env(), check=False, capture_output=True, text=True, cwd="/")
    if r.returncode == 0:
        return None
    return (r.stderr.strip().splitlines() or ["unknown error"])[-1]


def machine_info(workdir: Path) -> dict[str, object]:
    info: dict[str, object] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "nproc": os.cpu_count(),
        "python": platform.python_version(), "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
            info["cpu"] = m.group(1).strip() if m else "unknown"
    except OSError:
        info["cpu"] = "unknown"
    info["mem_gib"] = round(_meminfo("MemTotal") / 2**30, 1)
    probe = ("import google.protobuf as p; from google.protobuf.internal import "
             "api_implementation as a; print(p.__version__, a.Type())")
    for key, env in (("protobuf", child_env()),
                     ("protobuf_pure_python", child_env(PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python"))):
        r = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, env=env)
        info[key] = r.stdout.strip() if r.returncode == 0 else "not available"
    r = subprocess.run([sys.executable, "-c", "import numpy; print(numpy.__version__)"],
                       check=False, capture_output=True, text=True)
    info["numpy"] = r.stdout.strip() if r.returncode == 0 else "not installed"
    r = subprocess.run(["cp", "--version"], check=False, capture_output=True, text=True)
    info["cp"] = (r.stdout.splitlines() or ["unknown"])[0]
    info["filesystem"] = _filesystem(workdir)
    info["bnfix"] = bnfix_version()
    return info


def bnfix_version() -> str:
    """Where bnfix comes from: its directory, and for this checkout the commit and whether
    ``bnfix/`` has uncommitted changes (read-only git commands)."""
    where = str(BNFIX_ROOT)
    if BNFIX_ROOT != REPO:
        return where

    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(REPO), *args], check=False, capture_output=True,
                           text=True)
        return r.stdout.strip() if r.returncode == 0 else ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = " + uncommitted changes in bnfix/" if git("status", "--porcelain", "--", "bnfix") else ""
    return f"{where} at {commit}{dirty}"


def _filesystem(path: Path) -> str:
    """``ext4 on /dev/vda (rw,relatime,...)`` for the mount holding ``path``."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    best = max((m for m in mounts if len(m) > 3 and str(path).startswith(m[1])),
               key=lambda m: len(m[1]), default=None)
    return f"{best[2]} on {best[0]} ({best[3]})" if best else "unknown"


def _meminfo(key: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
            return int(m.group(1)) * 1024 if m else 0
    except OSError:
        return 0


def mem_available() -> int:
    return _meminfo("MemAvailable")
