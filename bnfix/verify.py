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
    out, pos, end = [], 0, len(buf)
    while pos < end:
        start = pos
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
        out.append((k >> 3, wire, buf[start:vend], buf[pos:vend]))
        pos = vend
    return out


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


def entry(written: bytes, original: bytes, blobs: Mapping[int, Sequence[float]],
          replace: Mapping[int, bytes | None]) -> list[array[float]]:
    """Check ``written`` (a whole layer entry) against ``original`` (the input's layer payload)
    with ``blobs`` (index → intended values) and ``replace`` (field → intended payload or None)
    applied; return the decoded values of every blob."""
    if not written.startswith(_LAYER_KEY):
        raise AssertionError("internal error: a rebuilt entry is not a layer field")
    length, pos = _varint(written, len(_LAYER_KEY))
    payload = written[pos:]
    if len(payload) != length:
        raise AssertionError("internal error: a rebuilt entry's length prefix is wrong")
    new = _fields(payload)
    decoded, ranges = [], []
    offset = 0
    for number, wire, whole, value in new:
        if number == _BLOBS and wire == 2:
            start = offset + len(whole) - len(value)  # the blob message inside the payload
            values, blob_ranges = _blob(value, start)
            decoded.append(values)
            ranges += blob_ranges
        offset += len(whole)
    if not replace and len(payload) == len(original):
        # Only values changed: every other byte must be the original's, position for position.
        pos = 0
        for a, b in ranges:
            if payload[pos:a] != original[pos:a]:
                raise AssertionError("internal error: a rebuilt entry changed bytes outside its blob values")
            pos = b
        if payload[pos:] != original[pos:]:
            raise AssertionError("internal error: a rebuilt entry changed bytes outside its blob values")
        old_blobs = [v for n, w, _, v in _fields(original) if n == _BLOBS and w == 2]
    else:
        old = _fields(original)

        def kept(fields: list[tuple[int, int, bytes, bytes]]) -> list[bytes]:
            return [whole for number, _, whole, _ in fields if number != _BLOBS and number not in replace]

        if kept(new) != kept(old):
            raise AssertionError("internal error: a rebuilt entry changed fields bnfix does not edit")
        old_blobs = [v for n, w, _, v in old if n == _BLOBS and w == 2]
        for nb, ob in zip([v for n, w, _, v in new if n == _BLOBS and w == 2], old_blobs):
            if _blob_values(nb)[1] != _blob_values(ob)[1]:
                raise AssertionError("internal error: a rebuilt blob changed fields other than its values")
        for number, payload_want in replace.items():
            found = [v for n, w, _, v in new if n == number and w == 2]
            if (payload_want is None and found) or (payload_want is not None and found != [payload_want]):
                raise AssertionError(f"internal error: field {number} of a rebuilt entry is not the intended bytes")
            if number == _BN_PARAM and payload_want is not None:
                _check_eps(payload_want)
    if len(decoded) != len(old_blobs):
        raise AssertionError("internal error: a rebuilt entry has a different number of blobs")
    for i, values in enumerate(decoded):
        want = array(values.typecode, blobs[i]) if i in blobs else _blob_values(old_blobs[i])[0]
        if values.tobytes() != want.tobytes():
            raise AssertionError(f"internal error: blob {i} of a rebuilt entry does not hold the intended values")
    return decoded


def _blob(blob: bytes, base: int) -> tuple[array[float], list[tuple[int, int]]]:
    """A BlobProto's values and the byte ranges (offsets from ``base``) that hold them."""
    single, double = array("f"), array("d")
    ranges_f, ranges_d = [], []
    offset = base
    for number, _, whole, value in _fields(blob):
        at = offset + len(whole) - len(value)
        if number == 5:
            single.frombytes(value)
            ranges_f.append((at, at + len(value)))
        elif number == 8:
            double.frombytes(value)
            ranges_d.append((at, at + len(value)))
        offset += len(whole)
    values, ranges = (double, ranges_d) if len(double) else (single, ranges_f)
    if sys.byteorder == "big":
        values.byteswap()
    return values, ranges


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
