"""Copy anatomy: which call pattern gets a patched caffemodel written at the speed of a copy.

bnfix writes its output as the untouched byte ranges of the input (73 of them in a YOLOv3: the
ranges between its 72 BatchNorm layer entries) copied file to file, with the re-encoded
BatchNorm entries written in between.  Each re-encoded entry is 5 bytes longer (``eps`` is
added), so every range after the first lands 5, 10, ... 360 bytes further on in the output than
in the input.  That copy was measured at 1.36-1.49x one whole-file ``copy_file_range``, and
1.36x even with no shift at all, so the shift alone cannot be the explanation.

This module takes the copy apart, in one process, on the real file: the same bytes written with
different call patterns, interleaved round by round (the order rotates), each run starting
with the input in the page cache, no output file and no dirty pages.  Every variant is timed
from opening the output to closing it, and compared pair by pair (same round) with one
whole-file ``copy_file_range`` at equal offsets, which is what ``cp`` does.  In the warm-up
round every output is hashed: the variants that write the same layout must write the same
bytes as a plain read of the pieces in output order, and the unshifted layouts must reproduce
the input.  Also in the warm-up round, when the bench runs as root, :func:`folio_sizes` counts
the page-cache folios the output was written into: the number that explains the timings.

It knows bnfix only through the file format: the ranges come from its own walk of the
``NetParameter`` wire format (layer entries whose ``type`` is ``BatchNorm``).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import json
import mmap
import os
import statistics
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from harness import interleave, pairwise_medians, quiesce

KIB, MIB = 1 << 10, 1 << 20
EPS_FIELD_BYTES = 5  # the key byte and the float32 of `eps: ...` that bnfix adds to each BN layer
FICLONE = 0x40049409
FS_IOC_FIEMAP = 0xC020660B


# --------------------------------------------------------------------------------------------
# the layout: where bnfix's pieces are
# --------------------------------------------------------------------------------------------

class Copy(NamedTuple):
    src: int
    dst: int
    length: int


class Slot(NamedTuple):
    """A BatchNorm entry: ``data`` is written at ``dst`` (its input bytes + the added bytes)."""

    dst: int
    data: bytes


class Layout(NamedTuple):
    copies: list[Copy]
    slots: list[Slot]
    size: int  # of the output

    @property
    def pieces(self) -> int:
        return len(self.copies)


def _varint(buf: mmap.mmap, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, pos


def batchnorm_entries(path: str) -> tuple[list[tuple[int, int]], int]:
    """``[(start, end)]`` of every top-level ``layer`` entry (tag to end) of type BatchNorm."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        size, pos, found = len(m), 0, []
        while pos < size:
            start = pos
            key, pos = _varint(m, pos)
            if key & 7 != 2:
                raise SystemExit(f"{path}: top-level field {key >> 3} is not length-delimited")
            length, pos = _varint(m, pos)
            end = pos + length
            if key >> 3 == 100 and _layer_type(m, pos, end) == b"BatchNorm":
                found.append((start, end))
            pos = end
        return found, size


def _layer_type(m: mmap.mmap, pos: int, end: int) -> bytes | None:
    while pos < end:
        key, pos = _varint(m, pos)
        if key & 7 != 2:
            return None
        length, pos = _varint(m, pos)
        if key >> 3 == 2:
            return bytes(m[pos:pos + length])
        pos += length
    return None


def layout(path: str, grow: int) -> Layout:
    """bnfix's pieces, with every BatchNorm entry ``grow`` bytes longer in the output."""
    entries, size = batchnorm_entries(path)
    copies, slots = [], []
    pos = out = 0
    with open(path, "rb") as f:
        for start, end in entries:
            if start > pos:
                copies.append(Copy(pos, out, start - pos))
                out += start - pos
            data = os.pread(f.fileno(), end - start, start) + b"\0" * grow
            slots.append(Slot(out, data))
            out, pos = out + len(data), end
    if pos < size:
        copies.append(Copy(pos, out, size - pos))
        out += size - pos
    return Layout(copies, slots, out)


def whole(size: int, dst_shift: int) -> Layout:
    """One range: the whole file, written ``dst_shift`` bytes further on (after zero bytes)."""
    slots = [Slot(0, b"\0" * dst_shift)] if dst_shift else []
    return Layout([Copy(0, dst_shift, size)], slots, size + dst_shift)


# --------------------------------------------------------------------------------------------
# the ways to copy one range
# --------------------------------------------------------------------------------------------

class Source(NamedTuple):
    fd: int
    view: memoryview | None  # of an mmap of the whole input, for the mmap copier
    pipe: tuple[int, int] | None  # for the splice copier


def _to_grid(doff: int, left: int, grid: int) -> int:
    """Bytes to write at output offset ``doff``: up to the next multiple of ``grid``."""
    return min(left, grid - doff % grid) if grid else left


def _read_size(doff: int, left: int, call: int, grid: int) -> int:
    """Bytes to read for output offset ``doff``: ``call`` (0: all), cut back so that, unless it
    is the range's last read, it ends on the output grid (no grid step is split between
    reads)."""
    n = min(left, call or left)
    if grid and n < left and n > (doff + n) % grid:
        n -= (doff + n) % grid
    return n


# One-step copiers: the kernel reads and writes in one call.  ``call`` bounds a call (0: the
# whole range); with ``grid`` only the *first* call stops at the output grid, so that the
# kernel's own rounds start on it from then on.

def copy_file_range(src: Source, dst: int, c: Copy, call: int, grid: int) -> None:
    """``os.copy_file_range`` at explicit offsets (on ext4 an in-kernel splice, 64 KiB a round)."""
    off, doff, left = c
    first = True
    while left:
        n = _to_grid(doff, left, grid) if first and grid else min(left, call or left)
        first = False
        while n:
            done = os.copy_file_range(src.fd, dst, n, off, doff)
            if done <= 0:
                raise OSError(errno.EIO, f"copy_file_range returned {done}")
            off, doff, left, n = off + done, doff + done, left - done, n - done


def sendfile(src: Source, dst: int, c: Copy, call: int, grid: int) -> None:
    """``os.sendfile`` from an explicit input offset to the output's file position."""
    off, doff, left = c
    os.lseek(dst, doff, os.SEEK_SET)
    while left:
        n = os.sendfile(dst, src.fd, off, min(left, call or left))
        off, left = off + n, left - n


# Two-step copiers: read ``call`` bytes (into a pipe or a buffer), then write them; with
# ``grid`` *every* read and write stops at a multiple of ``grid`` in the output, so each write
# is one aligned grid step (the first and last of a range may be shorter).

def splice(src: Source, dst: int, c: Copy, call: int, grid: int) -> None:
    """``os.splice`` input -> pipe -> output.  A pipe of N bytes holds N/4096 page references,
    so from an input offset that is not page-aligned it takes a little less than N: with a
    grid, ``call`` leaves room for that (960 KiB through a 1 MiB pipe)."""
    assert src.pipe is not None
    r, w = src.pipe
    off, doff, left = c
    while left:
        n = os.splice(src.fd, w, _read_size(doff, left, call, grid), offset_src=off)
        off, left = off + n, left - n
        while n:
            m = os.splice(r, dst, _to_grid(doff, n, grid), offset_dst=doff)
            doff, n = doff + m, n - m


def pread_pwrite(src: Source, dst: int, c: Copy, call: int, grid: int) -> None:
    """Through a user-space buffer: two copies of every byte."""
    off, doff, left = c
    while left:
        view = memoryview(os.pread(src.fd, _read_size(doff, left, call, grid), off))
        off, left = off + len(view), left - len(view)
        while view:
            n = os.pwrite(dst, view[:_to_grid(doff, len(view), grid)], doff)
            view, doff = view[n:], doff + n


def mmap_pwrite(src: Source, dst: int, c: Copy, call: int, grid: int) -> None:
    """``os.pwrite`` straight from a fresh mapping of the input: one copy, but the kernel meets
    the mapping's page faults inside the write (``call`` bounds a write)."""
    assert src.view is not None
    off, doff, left = c
    while left:
        n = os.pwrite(dst, src.view[off:off + _to_grid(doff, min(left, call or left), grid)], doff)
        off, doff, left = off + n, doff + n, left - n


Copier = Callable[[Source, int, Copy, int, int], None]
COPIERS: dict[str, Copier] = {"copy_file_range": copy_file_range, "sendfile": sendfile,
                              "splice": splice, "pread/pwrite": pread_pwrite,
                              "mmap+pwrite": mmap_pwrite}


class Variant(NamedTuple):
    key: str
    phase: str  # warm | cold | durable: each phase is interleaved on its own, with its own base
    copier: str
    pieces: bool  # bnfix's pieces, else the whole file as one range
    shift: int  # pieces: bytes added per BatchNorm entry; whole: output offset of byte 0
    call: int = 0  # bytes per (read) call, 0: the whole range; see the copiers
    grid: int = 0  # output grid; see the copiers
    pipe: int = 0  # splice: the pipe's size (F_SETPIPE_SZ)
    fallocate: bool = False
    fsync: bool = False


G = EPS_FIELD_BYTES
CFR, SPLICE, RW, MM = "copy_file_range", "splice", "pread/pwrite", "mmap+pwrite"
PIECES = "pieces, +5 B/BN"
BEST = "splice via 1 MiB pipe, on 64 KiB grid"  # the pattern the findings recommend
# (positional: call, grid, pipe)
VARIANTS = [
    # the floor: what cp does
    Variant("copy_file_range, whole file", "warm", CFR, False, 0),
    # where the output offset lands
    Variant("copy_file_range, whole file, output +8 B", "warm", CFR, False, 8),
    Variant("copy_file_range, whole file, output +4 KiB", "warm", CFR, False, 4 * KIB),
    Variant("copy_file_range, whole file, output +64 KiB", "warm", CFR, False, 64 * KIB),
    # bnfix's pieces
    Variant("copy_file_range, pieces, no shift", "warm", CFR, True, 0),
    Variant("copy_file_range, pieces, no shift, first call to 64 KiB grid", "warm", CFR, True, 0,
            grid=64 * KIB),
    Variant(f"copy_file_range, {PIECES} (bnfix 1.0)", "warm", CFR, True, G, call=64 * MIB),
    Variant(f"sendfile, {PIECES}", "warm", "sendfile", True, G),
    Variant(f"splice via 64 KiB pipe, {PIECES}", "warm", SPLICE, True, G, pipe=64 * KIB,
            call=64 * KIB),
    Variant(f"splice 1 MiB in, 1 MiB out, {PIECES}", "warm", SPLICE, True, G, pipe=MIB, call=MIB),
    Variant(f"splice 512 KiB in, out on 512 KiB grid, {PIECES}", "warm", SPLICE, True, G,
            pipe=MIB, call=512 * KIB, grid=512 * KIB),
    Variant(f"{BEST}, {PIECES}", "warm", SPLICE, True, G, 960 * KIB, 64 * KIB, MIB),
    Variant(f"{BEST}, whole file", "warm", SPLICE, False, 0, 960 * KIB, 64 * KIB, MIB),
    Variant(f"pread/pwrite on 64 KiB grid, {PIECES}", "warm", RW, True, G, call=960 * KIB,
            grid=64 * KIB),
    Variant(f"pread 512 KiB, pwrite on 512 KiB grid, {PIECES}", "warm", RW, True, G,
            call=512 * KIB, grid=512 * KIB),
    Variant(f"mmap+pwrite 2 MiB on 2 MiB grid, {PIECES}", "warm", MM, True, G, call=2 * MIB,
            grid=2 * MIB),
    # preallocation
    Variant("copy_file_range, whole file, fallocate first", "warm", CFR, False, 0, fallocate=True),
    Variant(f"{BEST}, {PIECES}, fallocate first", "warm", SPLICE, True, G, 960 * KIB, 64 * KIB, MIB,
            fallocate=True),
    # input not in the page cache (evicted with POSIX_FADV_DONTNEED, untimed)
    Variant("cold: copy_file_range, whole file", "cold", CFR, False, 0),
    Variant(f"cold: copy_file_range, {PIECES} (bnfix 1.0)", "cold", CFR, True, G,
            call=64 * MIB),
    Variant(f"cold: {BEST}, {PIECES}", "cold", SPLICE, True, G, 960 * KIB, 64 * KIB, MIB),
    Variant(f"cold: pread/pwrite on 64 KiB grid, {PIECES}", "cold", RW, True, G,
            call=960 * KIB, grid=64 * KIB),
    Variant(f"cold: mmap+pwrite 2 MiB on 2 MiB grid, {PIECES}", "cold", MM, True, G,
            call=2 * MIB, grid=2 * MIB),
    # durable: fsync before close, inside the time
    Variant("durable: copy_file_range, whole file + fsync", "durable", CFR, False, 0, fsync=True),
    Variant(f"durable: copy_file_range, {PIECES} (bnfix 1.0) + fsync", "durable", CFR, True,
            G, call=64 * MIB, fsync=True),
    Variant(f"durable: {BEST}, {PIECES} + fsync", "durable", SPLICE, True, G, 960 * KIB, 64 * KIB, MIB,
            fsync=True),
    Variant(f"durable: {BEST}, {PIECES}, fallocate first + fsync", "durable", SPLICE, True, G,
            960 * KIB, 64 * KIB, MIB, fallocate=True, fsync=True),
]
PHASES = ("warm", "cold", "durable")  # the first variant of each phase is its base


class Timing(NamedTuple):
    seconds: float
    extents: int | None  # of the output, for the durable variants (known once it is on disk)
    folios: dict[int, int] | None = None  # see folio_sizes; measured in the warm-up round only


def run(v: Variant, src_path: str, dst_path: str, lay: Layout) -> Timing:
    """Write ``lay`` to a new ``dst_path`` the way ``v`` says; time open .. close."""
    with open(src_path, "rb") as f:
        if v.phase == "cold":  # untimed: drop the input's clean pages from the page cache
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        fd = f.fileno()
        extents = None
        t0 = time.perf_counter()
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if v.copier == "mmap+pwrite" else None
        view = memoryview(mm) if mm is not None else None
        pipe = os.pipe() if v.copier == "splice" else None
        if pipe:
            try:
                fcntl.fcntl(pipe[1], fcntl.F_SETPIPE_SZ, v.pipe)
            except OSError:  # above /proc/sys/fs/pipe-max-size: the pipe keeps its size
                pass
        out = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if v.fallocate:
                os.posix_fallocate(out, 0, lay.size)
            copier, src = COPIERS[v.copier], Source(fd, view, pipe)
            for piece in _in_file_order(lay):
                if isinstance(piece, Slot):
                    os.pwrite(out, piece.data, piece.dst)
                    continue
                copier(src, out, piece, v.call, v.grid)
            if v.fsync:
                os.fsync(out)
        finally:
            os.close(out)
            if pipe:
                os.close(pipe[0])
                os.close(pipe[1])
            if view is not None:
                view.release()
            if mm is not None:
                mm.close()
        seconds = time.perf_counter() - t0
        if v.fsync:
            extents = extent_count(dst_path)
        return Timing(seconds, extents)


def _in_file_order(lay: Layout) -> list[Copy | Slot]:
    return sorted([*lay.copies, *lay.slots], key=lambda p: p.dst)


def extent_count(path: str) -> int | None:
    """The file's extents (FIEMAP with no extent buffer only counts them); None if unsupported."""
    fd = os.open(path, os.O_RDONLY)
    try:
        req = struct.pack("=QQLLLL", 0, 2**64 - 1, 0, 0, 0, 0)
        res = fcntl.ioctl(fd, FS_IOC_FIEMAP, req)
        return int(struct.unpack("=QQLLLL", res)[3])
    except OSError:
        return None
    finally:
        os.close(fd)


def folio_sizes(path: str) -> dict[int, int] | None:
    """``{pages per folio: count}`` for the file's pages in the page cache, or None without the
    privileges to read ``/proc/kpageflags`` (root only).

    The diagnostic behind this module's explanation: the kernel's cost per written byte follows
    the number of page-cache folios the output is written into, and that number is set by the
    size and alignment of each write the file system sees.  The file is mapped copy-on-write
    (never written, so the mapping shares the page cache), every page is touched,
    ``/proc/self/pagemap`` gives each page's frame and ``/proc/kpageflags`` its compound-head /
    compound-tail bits.
    """
    try:
        kf = os.open("/proc/kpageflags", os.O_RDONLY)
    except OSError:
        return None
    import ctypes

    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        with mmap.mmap(fd, size, access=mmap.ACCESS_COPY) as m:
            addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
            for i in range(0, size, 4096):
                m[i]  # fault the page in (read only: the mapping keeps sharing the page cache)
            npages = (size + 4095) // 4096
            with open("/proc/self/pagemap", "rb") as pm:
                pm.seek(addr // 4096 * 8)
                entries = struct.unpack(f"{npages}Q", pm.read(npages * 8))
            pfns = [e & ((1 << 55) - 1) if e >> 63 else -1 for e in entries]
            hist: dict[int, int] = {}
            run = 0  # pages in the folio being counted
            for flags in _kpageflags(kf, pfns):
                if flags >= 0 and flags >> 16 & 1 and run:  # a tail page of the current folio
                    run += 1
                    continue
                if run:
                    hist[run] = hist.get(run, 0) + 1
                run = 1 if flags >= 0 and flags >> 15 & 1 else 0  # a compound head starts one
                if flags >= 0 and not run:
                    hist[1] = hist.get(1, 0) + 1  # a single page
            if run:
                hist[run] = hist.get(run, 0) + 1
            del addr
        return dict(sorted(hist.items()))
    except (OSError, TypeError, ValueError):
        return None
    finally:
        os.close(fd)
        os.close(kf)


def _kpageflags(kf: int, pfns: list[int]) -> list[int]:
    """Each frame's flags (-1 for a page not present), one read per run of consecutive frames."""
    out: list[int] = []
    i = 0
    while i < len(pfns):
        if pfns[i] < 0:
            out.append(-1)
            i += 1
            continue
        j = i + 1
        while j < len(pfns) and pfns[j] == pfns[j - 1] + 1:
            j += 1
        raw = os.pread(kf, 8 * (j - i), pfns[i] * 8)
        out += struct.unpack(f"{j - i}Q", raw)
        i = j
    return out


def reflink_probe(src_path: str, dst_dir: Path) -> str:
    """Can this file system share extents (FICLONE)?  If not, copy_file_range copies bytes."""
    probe = dst_dir / "reflink-probe"
    with open(src_path, "rb") as f, open(probe, "wb") as out:
        try:
            fcntl.ioctl(out.fileno(), FICLONE, f.fileno())
            result = "supported (FICLONE works)"
        except OSError as exc:
            result = f"not supported ({errno.errorcode.get(exc.errno or 0, exc.errno)})"
    probe.unlink()
    return result


def _digest(path: str) -> str:
    h = hashlib.sha1(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
    return h.hexdigest()


def measure(src_path: str, outdir: Path, rounds: int, settle_s: float | None,
            phases: tuple[str, ...] = PHASES) -> dict[str, object]:
    """Every variant, ``rounds`` interleaved rounds per phase; medians and pair-by-pair ratios."""
    outdir.mkdir(parents=True, exist_ok=True)
    dst = str(outdir / "anatomy.out")
    entries, size = batchnorm_entries(src_path)
    layouts = {(False, s): whole(size, s) for s in {v.shift for v in VARIANTS if not v.pieces}}
    layouts |= {(True, s): layout(src_path, s) for s in {v.shift for v in VARIANTS if v.pieces}}
    expected = {key: _expected_digest(src_path, lay) for key, lay in layouts.items()}
    if expected[(False, 0)] != expected[(True, 0)] or expected[(False, 0)] != _digest(src_path):
        raise AssertionError("the unshifted layouts do not reproduce the input")
    mismatches: list[str] = []
    folios: dict[str, dict[int, int] | None] = {}

    def before() -> None:
        if os.path.exists(dst):
            os.unlink(dst)
        quiesce(settle_s)

    result: dict[str, object] = {
        "caffemodel": src_path, "bytes": size, "batchnorm_entries": len(entries),
        "pieces": layouts[(True, G)].pieces, "grow_per_bn": G, "rounds": rounds,
        "reflink": reflink_probe(src_path, outdir), "phases": {}}
    def op(v: Variant) -> Callable[[], Timing]:
        def go() -> Timing:
            t = run(v, src_path, dst, layouts[(v.pieces, v.shift)])
            if v.key not in folios:  # the warm-up round: count folios, check the bytes
                folios[v.key] = folio_sizes(dst)
                if _digest(dst) != expected[(v.pieces, v.shift)]:
                    mismatches.append(v.key)
            return t
        return go

    for phase in phases:
        variants = [v for v in VARIANTS if v.phase == phase]
        samples = interleave({v.key: op(v) for v in variants}, rounds, before)
        times = {k: [t.seconds for t in s] for k, s in samples.items()}
        base = variants[0].key
        ratios = pairwise_medians(times, base)
        phase_result = {
            "base": base,
            "variants": {v.key: {"median_s": statistics.median(times[v.key]),
                                 "min_s": min(times[v.key]), "ratio": ratios[v.key],
                                 "times_s": times[v.key],
                                 "extents": samples[v.key][-1].extents,
                                 "folios": folios.get(v.key),
                                 "variant": v._asdict()} for v in variants}}
        result["phases"][phase] = phase_result  # type: ignore[index]
    if os.path.exists(dst):
        os.unlink(dst)
    result["byte_mismatches"] = mismatches
    return result


def _expected_digest(src_path: str, lay: Layout) -> str:
    """What every variant with this layout must write, computed from the pieces in output
    order with plain reads (no copier involved); checks that the pieces tile the output."""
    h = hashlib.sha1(usedforsecurity=False)
    pos = 0
    with open(src_path, "rb") as f:
        for piece in _in_file_order(lay):
            if piece.dst != pos:
                raise AssertionError(f"layout has a gap or overlap at output offset {pos}")
            if isinstance(piece, Slot):
                h.update(piece.data)
                pos += len(piece.data)
                continue
            off, left = piece.src, piece.length
            while left:
                chunk = os.pread(f.fileno(), min(left, 8 * MIB), off)
                h.update(chunk)
                off, left = off + len(chunk), left - len(chunk)
            pos += piece.length
    if pos != lay.size:
        raise AssertionError(f"layout covers {pos} bytes, not {lay.size}")
    return h.hexdigest()


def main(argv: list[str]) -> int:
    """``bench.py anatomy CAFFEMODEL OUTDIR``: print the measurement as one JSON line."""
    p = argparse.ArgumentParser(prog="bench.py anatomy")
    p.add_argument("caffemodel")
    p.add_argument("outdir")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds to pause after the untimed sync before each run")
    p.add_argument("--no-sync", action="store_true")
    p.add_argument("--phases", default=",".join(PHASES))
    args = p.parse_args(argv)
    phases = tuple(x for x in args.phases.split(",") if x)
    res = measure(args.caffemodel, Path(args.outdir), args.rounds,
                  None if args.no_sync else args.settle, phases=phases)
    print(json.dumps(res))
    return 1 if res["byte_mismatches"] else 0
