"""What the bench runs: the contenders for each model size and for many small pairs.

Each goal of issue 10 compares two processes, so they are timed as a pair in a phase of their
own (``harness.run_phases``): ``cp`` against ``bnfix --no-sync``, then ``cp && sync`` against
plain ``bnfix``, then the contenders that are shown for reference only (the naive protobuf
round trip and bnfix under the pure-Python protobuf backend).  The floors (spawning ``true``,
``python -c pass``, ``bnfix --help``) do not depend on the model and run once.

:func:`bnfix_pairs_args` is the one place that says how many pairs are handed to bnfix: today
as explicit ``PROTOTXT CAFFEMODEL ...`` arguments; when bnfix accepts a directory it becomes
``[pairs_dir]``.  The in-process comparison and the copy anatomy run as subprocesses
(``bench.py inproc`` / ``anatomy``) so that nothing heavy is loaded in the harness.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import generate
from harness import (
    BENCH_PY,
    Contender,
    Log,
    child_env,
    expect_output,
    loadavg,
    mem_available,
    paired_ratio,
    run_phases,
)

PY = sys.executable


class Settings(NamedTuple):
    workdir: Path
    rounds: int
    settle_s: float | None  # None: no sync before the runs (--no-sync)
    idle_wait_s: float
    bnfix_missing: str | None
    naive_large: bool
    inproc: bool
    anatomy_rounds: int  # 0: no anatomy
    regen: bool
    verify: bool
    log: Log


# --------------------------------------------------------------------------------------------
# how each contender is invoked
# --------------------------------------------------------------------------------------------

def bnfix_argv(inputs: Sequence[str], out: Path, *extra: str) -> list[str]:
    return [PY, "-m", "bnfix", *inputs, "-o", str(out), "--quiet", *extra]


def bnfix_pairs_args(pairs: Sequence[tuple[Path, Path]], pairs_dir: Path) -> list[str]:
    """The inputs of one bnfix call over many pairs: explicit pairs, so that the per-pair cost is
    bnfix's work and not the tree walk.  ``[str(pairs_dir)]`` measures ``bnfix DIR`` instead
    (the directory holds exactly these pairs, see generate.small_pairs)."""
    return [str(p) for pair in pairs for p in pair]


def cp_argv(files: Sequence[str], out: Path, durable: bool) -> list[str]:
    """``cp FILES OUT``; durable: then ``sync`` the copies and the directory (coreutils' ``sync
    FILE`` fsyncs each named file), as bnfix fsyncs both outputs and their directory."""
    if not durable:
        return ["cp", *files, str(out)]
    script = 'out=$1; shift; cp "$@" "$out" && sync "$out"/* "$out"'
    return ["sh", "-c", script, "sh", str(out), *files]


def _skip_without_bnfix(cs: Sequence[Contender], missing: str | None) -> None:
    for c in cs:
        if missing and ("bnfix" in c.key or c.key == "startup"):
            c.error = f"skipped: bnfix not importable ({missing})"


# --------------------------------------------------------------------------------------------
# the floors
# --------------------------------------------------------------------------------------------

def run_floors(s: Settings) -> dict[str, object]:
    """Spawn floor (also the RSS floor), interpreter start-up, bnfix start-up: once."""
    out = s.workdir / "out"
    cs = [Contender("true", "true (spawn and RSS floor)", ["true"], out / "true"),
          Contender("python", "python -c pass (interpreter start-up)", [PY, "-c", "pass"],
                    out / "python"),
          Contender("startup", "python -m bnfix --help (bnfix start-up)",
                    [PY, "-m", "bnfix", "--help"], out / "startup", env=child_env())]
    script = shutil.which("bnfix")
    if script:
        cs.append(Contender("startup_script", "bnfix --help (console script)", [script, "--help"],
                            out / "startup_script", env=child_env()))
    _skip_without_bnfix(cs, s.bnfix_missing)
    s.log("\n== floors ==")
    run_phases([cs], s.rounds, s.settle_s, s.workdir / "logs", s.log, s.idle_wait_s)
    return {"contenders": {c.key: c.summary() for c in cs}}


# --------------------------------------------------------------------------------------------
# one model of each size
# --------------------------------------------------------------------------------------------

def prepare_size(size: str, s: Settings) -> dict[str, object]:
    """Generate (or reuse) the pair in a subprocess (numpy stays out of the harness)."""
    gdir = s.workdir / size
    expected = generate.model_size(generate.SIZES[size].width)
    have = gdir / "yolov3.caffemodel"
    need = expected * (1 if have.exists() else 2) + (1 << 30)  # inputs + one output at a time
    free = shutil.disk_usage(s.workdir).free
    if free < need:
        raise SystemExit(f"not enough disk in {s.workdir}: {free / 2**30:.1f} GiB free, "
                         f"{need / 2**30:.1f} GiB needed")
    argv = [PY, str(BENCH_PY), "gen", "--size", size, "--out", str(gdir)]
    argv += ["--regen"] if s.regen else []
    argv += ["--verify"] if s.verify else []
    gen = subprocess.run(argv, check=False, capture_output=True, text=True)
    if gen.returncode != 0:
        raise SystemExit(f"generation failed:\n{gen.stdout}{gen.stderr}")
    lines = gen.stdout.strip().splitlines()
    for line in lines[:-1]:
        s.log("  " + line)
    m: dict[str, object] = json.loads(lines[-1])
    how = "reusing" if m["reused"] else "generated"
    s.log(f"  {how} {m['caffemodel']}: {int(m['bytes']) / 1e6:.1f} MB "  # type: ignore[call-overload]
          f"({m['convolution']} conv, {m['batchnorm']} BN) in {m['gen_seconds']} s")
    os.sync()
    return m


def size_phases(manifest: dict[str, object], s: Settings) -> list[list[Contender]]:
    proto, model = str(manifest["prototxt"]), str(manifest["caffemodel"])
    size_b = int(manifest["bytes"])  # type: ignore[call-overload]
    out = s.workdir / "out"
    check = expect_output(2, size_b)
    env = child_env()
    plain = [Contender("cp", "cp", cp_argv([proto, model], out / "cp", False), out / "cp",
                       check=check),
             Contender("bnfix", "python -m bnfix --no-sync",
                       bnfix_argv([proto, model], out / "bnfix", "--no-sync"), out / "bnfix",
                       env=env, check=check)]
    durable = [Contender("cp_sync", "cp && sync", cp_argv([proto, model], out / "cp_sync", True),
                         out / "cp_sync", check=check),
               Contender("bnfix_sync", "python -m bnfix (durable default)",
                         bnfix_argv([proto, model], out / "bnfix_sync"), out / "bnfix_sync",
                         env=env, check=check)]
    info = [Contender("bnfix_pyproto", "python -m bnfix --no-sync, pure-Python protobuf",
                      bnfix_argv([proto, model], out / "bnfix_pyproto", "--no-sync"),
                      out / "bnfix_pyproto", check=check,
                      env=child_env(PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python"))]
    if manifest["size"] != "1.9gb" or s.naive_large:
        need = 4 * size_b + (1 << 30)
        naive = Contender("naive", "naive protobuf round trip (upb)",
                          [PY, str(BENCH_PY), "naive", model, str(out / "naive" / "m.caffemodel"),
                           proto, str(out / "naive" / "m.prototxt")], out / "naive", env=env,
                          check=check)
        if mem_available() < need:
            naive.error = (f"skipped: needs ~{need / 2**30:.1f} GiB free memory, "
                           f"{mem_available() / 2**30:.1f} GiB available")
        info.append(naive)
    phases = [plain, durable, info]
    _skip_without_bnfix([c for p in phases for c in p], s.bnfix_missing)
    return phases


def run_size(size: str, s: Settings) -> dict[str, object]:
    s.log(f"\n== {size}: {generate.SIZES[size].label} ==")
    manifest = prepare_size(size, s)
    phases = size_phases(manifest, s)
    for c in (c for p in phases for c in p if c.error):
        s.log(f"  {c.label}: {c.error}")
    s.log(f"  timing {s.rounds} rounds; each pair interleaved, the order alternating")
    load = [loadavg()]
    run_phases(phases, s.rounds, s.settle_s, s.workdir / "logs", s.log, s.idle_wait_s)
    load.append(loadavg())
    cs = {c.key: c for p in phases for c in p}
    res: dict[str, object] = {
        "manifest": manifest, "rounds": s.rounds, "loadavg": load,
        "contenders": {k: c.summary() for k, c in cs.items()},
        "ratios": _ratios(cs), "rss_mib": _max_rss(cs["bnfix"], cs["bnfix_sync"])}
    res["ratios"]["naive_over_bnfix"] = _ratio_of_medians(cs.get("naive"), cs["bnfix"])  # type: ignore[index]
    res["ratios"]["pyproto_over_upb"] = _ratio_of_medians(cs["bnfix_pyproto"], cs["bnfix"])  # type: ignore[index]
    if s.inproc and not s.bnfix_missing:
        res["inproc"] = _subcommand(
            ["inproc", str(manifest["prototxt"]), str(manifest["caffemodel"]),
             str(s.workdir / "out" / "inproc"), "--rounds", str(s.rounds), *_settle_args(s)],
            "in-process bnfix.patch+save vs copy_file_range", s)
    if s.anatomy_rounds:
        res["anatomy"] = _subcommand(
            ["anatomy", str(manifest["caffemodel"]), str(s.workdir / "out" / "anatomy"),
             "--rounds", str(s.anatomy_rounds), *_settle_args(s)],
            f"copy anatomy, {s.anatomy_rounds} rounds", s)
    shutil.rmtree(s.workdir / "out", ignore_errors=True)
    return res


# --------------------------------------------------------------------------------------------
# many small pairs in one call
# --------------------------------------------------------------------------------------------

def run_pairs(n: int, s: Settings) -> dict[str, object]:
    s.log(f"\n== {n} small pairs (copies of yoloface-50k) in one call ==")
    pairs_dir = s.workdir / f"pairs-{n}"
    pairs = generate.small_pairs(n, pairs_dir)
    os.sync()
    files = [str(p) for pair in pairs for p in pair]
    inputs = bnfix_pairs_args(pairs, pairs_dir)
    biggest = generate.SAMPLE[1].stat().st_size
    check = expect_output(2 * n, biggest)
    out = s.workdir / "out"
    env = child_env()
    phases = [
        [Contender("cp", f"cp of {2 * n} files", cp_argv(files, out / "cp", False), out / "cp",
                   check=check),
         Contender("bnfix", f"python -m bnfix --no-sync, {n} pairs",
                   bnfix_argv(inputs, out / "bnfix", "--no-sync"), out / "bnfix", env=env,
                   check=check)],
        [Contender("cp_sync", f"cp && sync of {2 * n} files", cp_argv(files, out / "cp_sync", True),
                   out / "cp_sync", check=check),
         Contender("bnfix_sync", f"python -m bnfix (durable), {n} pairs",
                   bnfix_argv(inputs, out / "bnfix_sync"), out / "bnfix_sync", env=env,
                   check=check)]]
    _skip_without_bnfix([c for p in phases for c in p], s.bnfix_missing)
    load = [loadavg()]
    run_phases(phases, s.rounds, s.settle_s, s.workdir / "logs", s.log, s.idle_wait_s)
    load.append(loadavg())
    shutil.rmtree(out, ignore_errors=True)
    cs = {c.key: c for p in phases for c in p}
    per_pair = {k: 1000 * c.median / n for k, c in cs.items() if c.median is not None}
    return {"n": n, "rounds": s.rounds, "loadavg": load,
            "contenders": {k: c.summary() for k, c in cs.items()}, "ratios": _ratios(cs),
            "per_pair_ms": per_pair, "rss_mib": _max_rss(cs["bnfix"], cs["bnfix_sync"])}


# --------------------------------------------------------------------------------------------

def _ratios(cs: dict[str, Contender]) -> dict[str, float | None]:
    return {"plain": paired_ratio(cs["bnfix"], cs["cp"]),
            "durable": paired_ratio(cs["bnfix_sync"], cs["cp_sync"])}


def _ratio_of_medians(num: Contender | None, den: Contender) -> float | None:
    """For the reference contenders, which ran in another phase than bnfix --no-sync."""
    if num is None or num.median is None or den.median is None:
        return None
    return num.median / den.median


def _max_rss(*cs: Contender) -> float | None:
    peaks = [c.peak_rss_mib for c in cs if c.peak_rss_mib is not None]
    return max(peaks) if peaks else None


def _settle_args(s: Settings) -> list[str]:
    return ["--no-sync"] if s.settle_s is None else ["--settle", str(s.settle_s)]


def _subcommand(argv: list[str], what: str, s: Settings) -> dict[str, object]:
    """Run ``bench.py SUB ...`` that prints one JSON line; {"error": ...} when it fails."""
    s.log(f"  {what}")
    t0 = time.perf_counter()
    r = subprocess.run([PY, str(BENCH_PY), *argv], check=False, capture_output=True, text=True,
                       env=child_env(), cwd="/")
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        tail = " | ".join((r.stderr.strip() or r.stdout.strip()).splitlines()[-3:])
        s.log(f"  {what}: FAILED (exit {r.returncode}): {tail}")
        return {"error": f"exit {r.returncode}: {tail}"}
    data: dict[str, object] = json.loads(lines[-1])
    data["wall_s"] = round(time.perf_counter() - t0, 1)
    return data

