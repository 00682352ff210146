"""The tests' own protobuf wire walker: independent of bnfix's ``caffemodel.py`` (so a test
does not check bnfix's reading with bnfix's reading), and free of imports (the hooks in
``guarantees_helpers`` load in a bnfix child at start-up, where an import would change what
the start-up tests measure)."""

from __future__ import annotations


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def fields(buf: bytes) -> list[tuple[int, int, int, int]]:
    """Top-level fields of a message: (number, wire type, start of the field, end of it)."""
    out, pos = [], 0
    while pos < len(buf):
        start = pos
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            n, pos = read_varint(buf, pos)
            pos += n
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire} at offset {start}")
        if pos > len(buf):
            raise ValueError(f"field {number} at offset {start} runs past the end")
        out.append((number, wire, start, pos))
    return out
