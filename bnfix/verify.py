"""Check every rebuilt layer entry with a second, independent decoder before it is written.

``caffemodel.Entry.rebuilt`` splices new values and fields into a layer's bytes; this module
reads the result from scratch, with its own wire parser (it shares no code with the writer),
and proves three things per entry:

* every field bnfix does not rewrite is byte for byte the original, in the original order;
* every blob holds exactly the intended values (bit for bit) and its other fields unchanged;
* the stored ``batch_norm_param`` and bnfix's record are the intended bytes, and the param's
  eps decodes to the intended float32.

It returns the decoded blob values, so every number in the report comes from the bytes that
will be written.  A failure is a bug in bnfix (AssertionError: the CLI exits 3).
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Mapping, Sequence

_BLOBS, _BN_PARAM, _EPS = 7, 139, 3
_LAYER_KEY = bytes([0xA2, 0x06])  # field 100, length-delimited


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise AssertionError("internal error: varint too long in a rebuilt entry")


def _fields(buf: bytes) -> list[tuple[int, int, bytes, bytes]]:
    """(number, wire type, whole field bytes, value bytes) of every field of a message."""
    return [(n, w, buf[f:e], buf[v:e]) for n, w, f, v, e in _walk(buf, 0, len(buf))]


def _blob_values(blob: bytes) -> tuple[array[float], list[bytes]]:
    """A BlobProto's values (double_data if any, else data) and its other fields' bytes."""
    single, double, other = array("f"), array("d"), []
    for number, _wire, whole, value in _fields(blob):
        if number == 5:
            single.frombytes(value)
        elif number == 8:
            double.frombytes(value)
        else:
            other.append(whole)
    values = double if len(double) else single
    if sys.byteorder == "big":
        values.byteswap()
    return values, other


def _spans(buf: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(number, wire type, value start, value end) of every field of ``buf[start:end]``."""
    return [(n, w, v, e) for n, w, _, v, e in _walk(buf, start, end)]


def _walk(buf: bytes, start: int, end: int) -> list[tuple[int, int, int, int, int]]:
    """(number, wire type, field start, value start, value end) of every field of
    ``buf[start:end]``; this module's own reading of the wire format, not caffemodel.py's."""
    out, pos = [], start
    while pos < end:
        field = pos
        k, pos = _varint(buf, pos)
        wire = k & 7
        if wire == 0:
            _, vend = _varint(buf, pos)
        elif wire == 1:
            vend = pos + 8
        elif wire == 5:
            vend = pos + 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            vend = pos + length
        else:
            raise AssertionError(f"internal error: wire type {wire} in a rebuilt entry")
        if vend > end:
            raise AssertionError("internal error: a rebuilt entry's field runs past its end")
        out.append((k >> 3, wire, field, pos, vend))
        pos = vend
    return out


def _value_ranges(buf: bytes, start: int, end: int) -> tuple[str, list[tuple[int, int]]]:
    """Where a BlobProto's values are (double_data if any, else data), and their type."""
    single, double = [], []
    for number, _, a, b in _spans(buf, start, end):
        if number == 5:
            single.append((a, b))
        elif number == 8:
            double.append((a, b))
    return ("d", double) if any(b > a for a, b in double) else ("f", single)


def entry(written: bytes, original: bytes, blobs: Mapping[int, Sequence[float]],
          replace: Mapping[int, bytes | None]) -> list[array[float]]:
    """Check ``written`` (a whole layer entry) against ``original`` (the input's layer payload)
    with ``blobs`` (index → intended values) and ``replace`` (field → intended payload or None)
    applied; return the decoded values of every blob."""
    if not written.startswith(_LAYER_KEY):
        raise AssertionError("internal error: a rebuilt entry is not a layer field")
    length, pos = _varint(written, len(_LAYER_KEY))
    if len(written) - pos != length:
        raise AssertionError("internal error: a rebuilt entry's length prefix is wrong")
    if replace or length != len(original):
        return _entry_reshaped(written[pos:], original, blobs, replace)
    # Only values changed: every other byte must be the original's, position for position, and
    # every blob must hold the intended values (or, untouched, the original bytes).
    payload = written[pos:]
    decoded: list[array[float]] = []
    at = 0
    for _, wire, a, b in (s for s in _spans(payload, 0, length) if s[0] == _BLOBS):
        if wire != 2:
            raise AssertionError("internal error: a rebuilt entry has a blob that is not a message")
        dtype, ranges = _value_ranges(payload, a, b)
        values: array[float] = array(dtype)
        for x, y in ranges:
            if payload[at:x] != original[at:x]:
                raise AssertionError("internal error: a rebuilt entry changed bytes outside its blob values")
            values.frombytes(payload[x:y])
            at = y
        if sys.byteorder == "big":
            values.byteswap()
        index = len(decoded)
        if index in blobs:
            if values.tobytes() != array(dtype, blobs[index]).tobytes():
                raise AssertionError(f"internal error: blob {index} of a rebuilt entry holds other values")
        elif any(payload[x:y] != original[x:y] for x, y in ranges):
            raise AssertionError(f"internal error: blob {index} of a rebuilt entry changed")
        decoded.append(values)
    if payload[at:] != original[at:]:
        raise AssertionError("internal error: a rebuilt entry changed bytes outside its blob values")
    if any(i >= len(decoded) for i in blobs):
        raise AssertionError("internal error: a rebuilt entry has fewer blobs than intended")
    return decoded


def _entry_reshaped(payload: bytes, original: bytes, blobs: Mapping[int, Sequence[float]],
                    replace: Mapping[int, bytes | None]) -> list[array[float]]:
    """:func:`entry` for an entry whose fields changed too (only a revert of bnfix 1.0's
    stored parameters does that): field by field against the original."""
    new, old = _fields(payload), _fields(original)
    decoded = [_blob_values(v)[0] for n, w, _, v in new if n == _BLOBS and w == 2]

    def kept(fields: list[tuple[int, int, bytes, bytes]]) -> list[bytes]:
        return [whole for number, _, whole, _ in fields if number != _BLOBS and number not in replace]

    if kept(new) != kept(old):
        raise AssertionError("internal error: a rebuilt entry changed fields bnfix does not edit")
    old_blobs = [v for n, w, _, v in old if n == _BLOBS and w == 2]
    new_blobs = [v for n, w, _, v in new if n == _BLOBS and w == 2]
    if len(new_blobs) != len(old_blobs):
        raise AssertionError("internal error: a rebuilt entry has a different number of blobs")
    for i, (nb, ob) in enumerate(zip(new_blobs, old_blobs)):
        values, other = _blob_values(nb)
        old_values, old_other = _blob_values(ob)
        want = array(values.typecode, blobs[i]) if i in blobs else old_values
        if other != old_other or values.tobytes() != want.tobytes():
            raise AssertionError(f"internal error: blob {i} of a rebuilt entry does not hold the intended values")
    for number, payload_want in replace.items():
        found = [v for n, w, _, v in new if n == number and w == 2]
        if (payload_want is None and found) or (payload_want is not None and found != [payload_want]):
            raise AssertionError(f"internal error: field {number} of a rebuilt entry is not the intended bytes")
        if number == _BN_PARAM and payload_want is not None:
            _check_eps(payload_want)
    return decoded


def _check_eps(param: bytes) -> None:
    """The stored eps must decode as a finite float32 >= 0 (the last occurrence wins)."""
    eps = [struct.unpack("<f", v)[0] for n, w, _, v in _fields(param) if n == _EPS and w == 5]
    if eps and not (eps[-1] >= 0 and eps[-1] < float("inf")):
        raise AssertionError("internal error: a rebuilt batch_norm_param holds an unusable eps")


def records(written: bytes, expected: Sequence[tuple[str, bytes]]) -> None:
    """Check appended record fields: each a (layer name, marker text) message, in order."""
    found = []
    for number, wire, _, value in _fields(written):
        inner = {n: v for n, w, _, v in _fields(value) if w == 2}
        if (number, wire) != (536870911, 2) or set(inner) != {1, 2}:
            raise AssertionError("internal error: an appended bnfix record is malformed")
        found.append((inner[1].decode("utf-8", "surrogateescape"), inner[2]))
    if found != list(expected):
        raise AssertionError("internal error: the appended bnfix records are not the intended ones")
