"""A wire-level reader for ``.caffemodel`` files: byte ranges for every layer, full decoding
only for the layers bnfix rewrites (BatchNorm and the Scale layers that follow them).

A caffemodel is one protobuf ``NetParameter``.  Decoding it whole costs seconds and gigabytes
(a 248 MB YOLOv3 becomes ~780 MB of Python objects), yet bnfix changes a few kilobytes, so this
module never decodes what it does not patch.  The file is read with ``pread`` through one
small cached block (``_Window``; an mmap would map a whole page-cache folio per header it
touches), or read whole when it is under 1 MiB, and walked as:

* ``NetParameter``: each ``layer`` entry (field 100, a ``LayerParameter``) becomes a
  :class:`Layer` (offsets) with its ``name`` (1) and ``type`` (2); nothing else of it is read,
  its blobs are skipped by length.  Other top-level fields are skipped; V1 ``layers`` (field 2)
  cannot express BatchNorm.
* A layer bnfix rewrites is decoded into an :class:`Entry`: its ``blobs`` (7) as ``BlobProto``
  (``num/channels/height/width`` 1-4, ``data`` 5 packed or not, ``shape`` 7 with ``dim`` 1,
  ``double_data`` 8) and its stored ``batch_norm_param`` (139: ``use_global_stats`` 1, ``eps``
  3).  Every other field keeps its bytes.  bnfix changes only blob *values*, so a rewritten
  entry keeps its length and every byte after it its offset (``copier.py``).
* bnfix's records (``marker.py``) are top-level ``NetParameter`` fields (``RECORD_FIELD``),
  each a small message: ``1`` the layer name, ``2`` the marker text.  bnfix appends them at
  the end of the file.

Rules, one named error each: a varint longer than 10 bytes or cut by the end of its message;
a length that runs past its message; field number 0; wire types 3/4 (groups) and 6/7; a float
payload whose size is not a multiple of the element size; a value count that disagrees with
the blob's shape.  Deliberately not checked: fields bnfix does not read (copied verbatim, known
or not, e.g. a fork's field 149), duplicate layer names (the caller pairs by name), UTF-8 of
names (decoded with ``surrogateescape``, as the prototxt side is, so any bytes compare).

Writing is ``copier.py``'s job: untouched ranges go file to file, rebuilt entries in between.
"""

from __future__ import annotations

import functools
import math
import os
import struct
import sys
from array import array
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import EllipsisType
from typing import NamedTuple, TypeAlias, overload

from . import files
from .errors import InputChanged, WireError
from .marker import RECORD_FIELD

LAYER = 100  # NetParameter.layer
V1_LAYERS = 2  # NetParameter.layers
LAYER_NAME, LAYER_TYPE, LAYER_BLOBS, LAYER_BN_PARAM = 1, 2, 7, 139
BN_USE_GLOBAL_STATS, BN_EPS = 1, 3  # BatchNormParameter
BLOB_LEGACY_DIMS = (1, 2, 3, 4)
BLOB_DATA, BLOB_SHAPE, BLOB_DOUBLE_DATA = 5, 7, 8
VARINT, I64, LEN, I32 = 0, 1, 2, 5
_KEPT = (LAYER_BN_PARAM,)  # the layer fields an Entry remembers the spans of
RECORD_NAME, RECORD_TEXT = 1, 2

__all__ = ["Blob", "Entry", "Layer", "Model", "WireError", "fields"]


Buffer: TypeAlias = "bytes | bytearray | memoryview | _Window"

# -- wire primitives -------------------------------------------------------------------------


def read_varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    """Decode a varint at ``pos``; return (value, position after it)."""
    if pos < end and buf[pos] < 0x80:  # one byte: most keys and small lengths
        return buf[pos], pos + 1
    result = shift = 0
    start = pos
    while True:
        if pos >= end:
            raise WireError(f"truncated varint at byte {start}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError(f"varint longer than 10 bytes at byte {start}")


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key(number: int, wire: int) -> bytes:
    return encode_varint(number << 3 | wire)


def field_bytes(number: int, payload: bytes) -> bytes:
    """One length-delimited field: key, length, payload."""
    return key(number, LEN) + encode_varint(len(payload)) + payload


class Span(NamedTuple):
    """One field of a message: key at ``start``, value bytes ``[value, end)``."""

    number: int
    wire: int
    start: int
    value: int
    end: int


def fields(buf: Buffer, start: int, end: int) -> Iterator[Span]:
    """Walk the fields of the message occupying ``buf[start:end]`` without decoding values."""
    pos = start
    while pos < end:
        k, vpos = read_varint(buf, pos, end)
        number, wire = k >> 3, k & 7
        if number == 0:
            raise WireError(f"field number 0 at byte {pos}")
        if wire == VARINT:
            _, vend = read_varint(buf, vpos, end)
        elif wire == I64:
            vend = vpos + 8
        elif wire == I32:
            vend = vpos + 4
        elif wire == LEN:
            length, vpos = read_varint(buf, vpos, end)
            vend = vpos + length
        elif wire in (3, 4):
            raise WireError(f"group (wire type {wire}) in field {number} at byte {pos}: not a caffemodel field")
        else:
            raise WireError(f"invalid wire type {wire} in field {number} at byte {pos}")
        if vend > end:
            raise WireError(f"field {number} at byte {pos} runs {vend - end} bytes past the end of its message")
        yield Span(number, wire, pos, vpos, vend)
        pos = vend


def payload_of(entry: bytes) -> bytes:
    """The message bytes of one encoded field (key + length + payload), e.g. a rebuilt layer."""
    _, pos = read_varint(entry, 0, len(entry))
    length, pos = read_varint(entry, pos, len(entry))
    return entry[pos : pos + length]


# -- the model -------------------------------------------------------------------------------


class Layer(NamedTuple):
    """A top-level ``layer`` entry: its position among the layer entries, the offsets of its key,
    payload and end, and the two fields read from every layer."""

    position: int
    start: int
    payload: int
    end: int
    name: str
    type: str


class Blob:
    """A BlobProto's values: where they live inside the layer payload, decoded on request."""

    __slots__ = ("__dict__", "chunks", "dtype", "shape", "source")

    def __init__(self, source: bytes, dtype: str, chunks: list[tuple[int, int]], shape: tuple[int, ...] | None):
        self.source = source  # the layer payload the chunks point into
        self.dtype = dtype  # "f" for ``data`` (float32), "d" for ``double_data``
        self.chunks = chunks  # (offset in the layer payload, element count), in order
        self.shape = shape

    @property
    def count(self) -> int:
        return sum(c for _, c in self.chunks)

    @property
    def itemsize(self) -> int:
        return 8 if self.dtype == "d" else 4

    def first(self) -> float:
        """The first value (a scale factor is all some decisions need)."""
        value: float = struct.unpack_from("<" + self.dtype, self.source, self.chunks[0][0])[0]
        return value

    @functools.cached_property
    def raw(self) -> bytes:
        """The stored value bytes, chunks joined (what a digest is taken of)."""
        size = self.itemsize
        if len(self.chunks) == 1:
            offset, count = self.chunks[0]
            return self.source[offset : offset + count * size]
        return b"".join(self.source[o : o + c * size] for o, c in self.chunks)

    @functools.cached_property
    def values(self) -> array[float]:
        """The values as an ``array('f')`` or ``array('d')`` (a copy, made once)."""
        out: array[float] = array(self.dtype)
        out.frombytes(self.raw)
        if sys.byteorder == "big":  # protobuf is little-endian on the wire
            out.byteswap()
        return out

    def encode(self, values: Sequence[float]) -> bytes:
        """``values`` in this blob's storage type, little-endian, as the chunks hold them."""
        data = array(self.dtype, values)
        if len(data) != self.count:
            raise AssertionError(f"internal error: {len(data)} values for a blob of {self.count}")
        if sys.byteorder == "big":
            data.byteswap()
        return data.tobytes()

    def write(self, payload: bytearray, values: Sequence[float]) -> None:
        """Overwrite this blob's values in place: the same count keeps every length prefix."""
        raw, size, pos = self.encode(values), self.itemsize, 0
        for offset, count in self.chunks:
            payload[offset : offset + count * size] = raw[pos : pos + count * size]
            pos += count * size


class ParamFields(NamedTuple):
    """The two ``batch_norm_param`` fields bnfix acts on, as stored (None: not stored)."""

    eps: float | None
    use_global_stats: bool | None


Keep = EllipsisType  # "leave this field as it is" in Entry.edited_bn_param


class Entry:
    """A decoded layer entry: its blobs, and the spans of the fields bnfix may replace."""

    def __init__(self, layer: Layer, payload: bytes):
        self.layer, self.payload = layer, payload
        self.blobs: list[Blob] = []
        self.spans: dict[int, list[Span]] = {n: [] for n in _KEPT}  # offsets relative to payload

    def field_payload(self, number: int) -> bytes | None:
        """A kept field's payload (occurrences concatenated, as protobuf merges them), or None."""
        spans = self.spans[number]
        if not spans:
            return None
        return b"".join(self.payload[sp.value : sp.end] for sp in spans)

    def bn_param(self) -> ParamFields | None:
        """eps and use_global_stats of the stored ``batch_norm_param`` (last value wins)."""
        data = self.field_payload(LAYER_BN_PARAM)
        if data is None:
            return None
        eps = ugs = None
        try:
            for sp in fields(data, 0, len(data)):
                if sp.number == BN_EPS and sp.wire == I32:
                    eps = struct.unpack_from("<f", data, sp.value)[0]
                elif sp.number == BN_USE_GLOBAL_STATS and sp.wire == VARINT:
                    ugs = bool(read_varint(data, sp.value, sp.end)[0])
        except WireError as exc:
            raise WireError(f"layer {self.layer.name!r}: bad batch_norm_param: {exc}") from None
        return ParamFields(eps, ugs)

    def edited_bn_param(self, *, eps: float | Keep | None = ..., use_global_stats: bool | Keep | None = ...
                        ) -> bytes:
        """The param payload with eps / use_global_stats set (a value), removed (None) or kept
        (``...``): the other fields keep their bytes and order, changed fields go at the end."""
        data = self.field_payload(LAYER_BN_PARAM) or b""
        drop = set()
        if eps is not ...:
            drop.add(BN_EPS)
        if use_global_stats is not ...:
            drop.add(BN_USE_GLOBAL_STATS)
        out = bytearray()
        for sp in fields(data, 0, len(data)):
            if sp.number not in drop:
                out += data[sp.start : sp.end]
        if isinstance(use_global_stats, bool):
            out += key(BN_USE_GLOBAL_STATS, VARINT) + encode_varint(int(use_global_stats))
        if isinstance(eps, float):
            out += key(BN_EPS, I32) + struct.pack("<f", eps)
        return bytes(out)

    def rebuilt(self, blob_values: Mapping[int, Sequence[float]], replace: Mapping[int, bytes | None]) -> bytes:
        """The whole layer entry (key, length, payload) with new blob values and fields.

        ``replace`` maps a kept field number to its new payload (put where its first occurrence
        was, or at the end) or to None (removed); fields not named keep their bytes.
        """
        payload = bytearray(self.payload)
        for i, values in blob_values.items():
            self.blobs[i].write(payload, values)
        cuts: list[tuple[int, int, bytes]] = []
        for number, new in replace.items():
            encoded = b"" if new is None else field_bytes(number, new)
            spans = self.spans[number]
            if not spans:
                cuts.append((len(payload), len(payload), encoded))
                continue
            cuts += [(sp.start, sp.end, encoded if i == 0 else b"") for i, sp in enumerate(spans)]
        for start, end, text in sorted(cuts, reverse=True):
            payload[start:end] = text
        return field_bytes(LAYER, bytes(payload))


WHOLE_MAX = 1 << 20  # models up to this size are read into memory whole


class _Window:
    """Bytes of an open file read on demand through one cached block.

    The index reads a few bytes at the start of each layer. Through an ``mmap`` each of
    those touches maps a whole page-cache folio (up to megabytes on current kernels),
    which counts as the process's memory: 80 MiB for a 1.9 GB model. ``pread`` into one
    reused block reads the same bytes without that.
    """

    BLOCK = 4096

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size
        self._at, self._block = -1, b""

    def __len__(self) -> int:
        return self.size

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> bytes: ...
    def __getitem__(self, i: int | slice) -> int | bytes:
        if isinstance(i, slice):
            start, stop, _ = i.indices(self.size)
            return self.read(start, stop - start)
        if not 0 <= i < self.size:
            raise IndexError(i)
        at = i - i % self.BLOCK
        if at != self._at:
            self._block, self._at = os.pread(self.fd, self.BLOCK, at), at
        return self._block[i - at]

    def read(self, start: int, length: int) -> bytes:
        """``length`` bytes at ``start`` (fewer only at the end of the file)."""
        parts, want = [], max(length, 0)
        while want:
            part = os.pread(self.fd, want, start)
            if not part:
                break
            parts.append(part)
            start, want = start + len(part), want - len(part)
        return b"".join(parts)


class Model:
    """An open caffemodel: its layer index, and layer entries decoded on request."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        fd = files.open_regular(self.path)
        self._file = os.fdopen(fd, "rb")
        st = os.fstat(fd)
        self.size, self.mtime_ns, self.ident = st.st_size, st.st_mtime_ns, (st.st_dev, st.st_ino)
        if self.size == 0:
            self.close()
            raise WireError(f"{self.path}: empty file, not a caffemodel")
        window = _Window(fd, self.size)
        # A small model is read whole: indexing bytes is C, each _Window access a Python call
        # (~0.6 ms of a small pair's ~11).  A large one is read on demand (flat memory).
        self._map: _Window | bytes = window if self.size > WHOLE_MAX else window.read(0, self.size)
        try:
            self.layers = self._index(self._map)
        except WireError as exc:
            hint = " (this looks like a text prototxt: are the arguments swapped?)" if self._looks_textual() else ""
            self.close()
            raise WireError(f"{self.path}: not a valid caffemodel: {exc}{hint}") from None
        except BaseException:
            self.close()
            raise

    def _looks_textual(self) -> bool:
        head = self._read(0, 4096)
        return bool(head) and all(b in b"\t\r\n" or 32 <= b < 127 for b in head)

    def _read(self, start: int, length: int) -> bytes:
        m = self._map
        return m.read(start, length) if isinstance(m, _Window) else m[start : start + length]

    def _index(self, buf: _Window | bytes) -> list[Layer]:
        layers: list[Layer] = []
        self.records: list[Record] = []
        v1 = 0
        for sp in fields(buf, 0, self.size):
            if sp.number == RECORD_FIELD and sp.wire == LEN:
                self.records.append(_record(buf, sp))
            elif sp.number == LAYER and sp.wire == LEN:
                # Only name and type are read; the rest of a layer is not checked until it is
                # decoded (a layer bnfix rewrites) or copied verbatim (all the others).
                found = _name_and_type(buf, sp.value, sp.end)
                if found is not None:
                    layers.append(Layer(len(layers), sp.start, sp.value, sp.end, *found))
                    continue
                name = type_ = None
                for f in fields(buf, sp.value, sp.end):
                    if f.wire == LEN and f.number == LAYER_NAME:
                        name = buf[f.value : f.end].decode("utf-8", "surrogateescape")
                    elif f.wire == LEN and f.number == LAYER_TYPE:
                        type_ = buf[f.value : f.end].decode("utf-8", "surrogateescape")
                    if name is not None and type_ is not None:
                        break
                layers.append(Layer(len(layers), sp.start, sp.value, sp.end, name or "", type_ or ""))
            elif sp.number == V1_LAYERS:
                v1 += 1
        if not layers:
            raise WireError("only V1 'layers' entries, which cannot hold BatchNorm" if v1 else "no layers")
        return layers

    def entry(self, layer: Layer) -> Entry:
        """Decode one layer entry (only layers bnfix may rewrite are ever decoded)."""
        payload = self._read(layer.payload, layer.end - layer.payload)
        try:
            return decode_entry(layer, payload)
        except WireError as exc:
            raise WireError(f"{self.path}: layer {layer.name!r}: {exc}") from None

    def tail(self, start: int) -> bytes:
        """The bytes from ``start`` to the end of the file."""
        return self._read(start, self.size - start)

    def fileno(self) -> int:
        """The open file the index was read from (outputs are copied from it)."""
        return self._file.fileno()

    def unchanged(self) -> bool:
        """Whether the file is still the one indexed: the path names the same inode, and
        neither it nor the open file changed size or mtime."""
        try:
            st, mine = os.stat(self.path), os.fstat(self._file.fileno())
        except OSError:
            return False
        now = (self.ident, self.size, self.mtime_ns)
        return ((st.st_dev, st.st_ino), st.st_size, st.st_mtime_ns) == now == (
            (mine.st_dev, mine.st_ino), mine.st_size, mine.st_mtime_ns)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Record(NamedTuple):
    """One of bnfix's records: the layer it is about, its marker text, and where it is."""

    layer: str
    text: bytes
    start: int
    end: int


def _record(buf: _Window | bytes, sp: Span) -> Record:
    name, text = b"", b""
    for f in fields(buf, sp.value, sp.end):
        if f.wire == LEN and f.number == RECORD_NAME:
            name = buf[f.value : f.end]
        elif f.wire == LEN and f.number == RECORD_TEXT:
            text = buf[f.value : f.end]
    return Record(name.decode("utf-8", "surrogateescape"), text, sp.start, sp.end)


def encode_record(layer: str, text: bytes) -> bytes:
    """A record field, as ``Model`` reads it back."""
    payload = field_bytes(RECORD_NAME, layer.encode("utf-8", "surrogateescape")) + field_bytes(RECORD_TEXT, text)
    return field_bytes(RECORD_FIELD, payload)


def _name_and_type(buf: _Window | bytes, start: int, end: int) -> tuple[str, str] | None:
    """name and type when a layer starts with them, as Caffe writes every layer (one read of
    each instead of a field walk); None for any other layout."""
    if start + 1 >= end or buf[start] != 0x0A:
        return None
    length, pos = read_varint(buf, start + 1, end)
    name_end = pos + length
    if name_end >= end or buf[name_end] != 0x12:
        return None
    type_length, type_pos = read_varint(buf, name_end + 1, end)
    if type_pos + type_length > end:
        return None
    return (buf[pos:name_end].decode("utf-8", "surrogateescape"),
            buf[type_pos : type_pos + type_length].decode("utf-8", "surrogateescape"))


def decode_entry(layer: Layer, payload: bytes) -> Entry:
    """Decode a layer's payload (also used to re-read what bnfix just encoded)."""
    out = Entry(layer, payload)
    for sp in fields(payload, 0, len(payload)):
        if sp.number == LAYER_BLOBS and sp.wire == LEN:
            out.blobs.append(_decode_blob(payload, sp.value, sp.end, len(out.blobs)))
        elif sp.number in out.spans and sp.wire == LEN:
            out.spans[sp.number].append(sp)
    return out


def _decode_blob(buf: bytes, start: int, end: int, index: int) -> Blob:
    fast = _common_blob(buf, start, end)
    if fast is not None:
        return fast
    legacy: dict[int, int] = {}
    shape: list[int] | None = None
    single, double = _Values("f"), _Values("d")
    for sp in fields(buf, start, end):
        n, w = sp.number, sp.wire
        if n in BLOB_LEGACY_DIMS and w == VARINT:
            legacy[n] = read_varint(buf, sp.value, sp.end)[0]
        elif n == BLOB_SHAPE and w == LEN:
            shape = shape or []
            for d in fields(buf, sp.value, sp.end):
                if d.number == 1 and d.wire == LEN:
                    pos = d.value
                    while pos < d.end:
                        v, pos = read_varint(buf, pos, d.end)
                        shape.append(v)
                elif d.number == 1 and d.wire == VARINT:
                    shape.append(read_varint(buf, d.value, d.end)[0])
        elif n == BLOB_DATA:
            single.add(sp, I32, f"blob {index} data")
        elif n == BLOB_DOUBLE_DATA:
            double.add(sp, I64, f"blob {index} double_data")
    # Caffe's Blob::FromProto reads double_data when it is non-empty, else data.
    values = double if double.count else single
    dims = tuple(shape) if shape is not None else (
        tuple(legacy.get(i, 0) for i in BLOB_LEGACY_DIMS) if legacy else None
    )
    if dims is not None:
        expected = math.prod(dims)
        if expected != values.count:
            raise WireError(f"blob {index} holds {values.count} values but its shape {list(dims)} needs {expected}")
    return Blob(buf, values.dtype, values.chunks, dims)


def _common_blob(buf: bytes, start: int, end: int) -> Blob | None:
    """The layout Caffe writes for every blob, ``shape { dim: packed }`` then ``data: packed``,
    read without a field walk; None for any other layout (the walk then reads it)."""
    if end - start < 4 or buf[start] != 0x3A:  # shape: field 7, length-delimited
        return None
    shape_len, pos = read_varint(buf, start + 1, end)
    shape_end = pos + shape_len
    if shape_end >= end or buf[pos] != 0x0A or buf[shape_end] != 0x2A:  # dim packed; then data
        return None
    dims_len, dpos = read_varint(buf, pos + 1, shape_end)
    if dpos + dims_len != shape_end:
        return None
    dims = []
    while dpos < shape_end:
        d, dpos = read_varint(buf, dpos, shape_end)
        dims.append(d)
    data_len, vpos = read_varint(buf, shape_end + 1, end)
    if vpos + data_len != end or data_len % 4 or data_len // 4 != math.prod(dims):
        return None
    return Blob(buf, "f", [(vpos, data_len // 4)] if data_len else [], tuple(dims))


class _Values:
    """Collects the packed and unpacked pieces of one repeated float/double field."""

    def __init__(self, dtype: str):
        self.dtype = dtype
        self.size = 8 if dtype == "d" else 4
        self.chunks: list[tuple[int, int]] = []

    @property
    def count(self) -> int:
        return sum(c for _, c in self.chunks)

    def add(self, sp: Span, unpacked_wire: int, what: str) -> None:
        size = self.size
        if sp.wire == LEN:
            length = sp.end - sp.value
            if length % size:
                raise WireError(f"{what}: {length} bytes is not a whole number of {size}-byte values")
            if length:
                self.chunks.append((sp.value, length // size))
        elif sp.wire == unpacked_wire:
            self.chunks.append((sp.value, 1))
        else:
            raise WireError(f"{what}: wire type {sp.wire} where floats were expected")


def check_file(path: Path, model: Model) -> None:
    """Refuse to write from a caffemodel that changed on disk since it was read."""
    if not model.unchanged():
        raise InputChanged(f"{path}: the file changed while bnfix was running")
