"""A wire-level walker for ``.caffemodel`` files: byte ranges for every layer, full decoding
only for BatchNorm layers.

A caffemodel is one protobuf ``NetParameter``.  Decoding it whole costs seconds and gigabytes
(a 248 MB YOLOv3 becomes ~780 MB of Python objects), yet bnfix changes a few kilobytes, so this
module never decodes what it does not patch.  The file is memory-mapped and walked as:

* ``NetParameter``: each ``layer`` entry (field 100, a ``LayerParameter``) becomes a
  :class:`Layer` (offsets) with its ``name`` (1) and ``type`` (2); nothing else of it is read,
  its blobs are skipped by length.  Other top-level fields are skipped; V1 ``layers`` (field 2)
  cannot express BatchNorm.
* For ``type == "BatchNorm"`` the layer is decoded: ``blobs`` (7) as ``BlobProto`` —
  ``num/channels/height/width`` (1-4), ``data`` (5, packed or not), ``shape`` (7, ``BlobShape``
  with ``dim`` = 1), ``double_data`` (8) — and ``batch_norm_param`` (139: ``use_global_stats``
  1, ``moving_average_fraction`` 2, ``eps`` 3).  bnfix edits that param at the wire level (its
  other fields keep their bytes) and reads what it wrote back with the ``protobuf`` runtime,
  whose message class is built at import time from a descriptor, so no generated code can
  mismatch the installed runtime.

Rules, one named error each: a varint longer than 10 bytes or cut by the end of its message;
a length that runs past its message; wire types 3/4 (groups) and 6/7; a float payload whose size
is not a multiple of the element size; a value count that disagrees with the blob's shape.
Deliberately not checked: fields bnfix does not read (they are copied verbatim, known or not,
e.g. a fork's field 149), duplicate layer names (the caller pairs by name), UTF-8 of names.

Writing copies the untouched ranges file to file (``os.copy_file_range`` at explicit offsets in
a background thread; else ``sendfile``; else chunks) and writes the re-encoded BatchNorm layers,
with fresh length prefixes, at offsets planned before their contents are computed.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import struct
import sys
import threading
from array import array
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path

from .atomic import write_fd
from .errors import BnfixError

LAYER = 100  # NetParameter.layer
V1_LAYERS = 2  # NetParameter.layers
LAYER_NAME, LAYER_TYPE, LAYER_BLOBS, LAYER_BN_PARAM = 1, 2, 7, 139
BN_USE_GLOBAL_STATS, BN_EPS = 1, 3  # BatchNormParameter
BLOB_LEGACY_DIMS = (1, 2, 3, 4)
BLOB_DATA, BLOB_SHAPE, BLOB_DOUBLE_DATA = 5, 7, 8
VARINT, I64, LEN, I32 = 0, 1, 2, 5


class WireError(BnfixError):
    """The bytes are not the protobuf message they should be."""


# -- wire primitives -------------------------------------------------------------------------


def read_varint(buf, pos: int, end: int) -> tuple[int, int]:
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


class Span(namedtuple("Span", "number wire start value end")):
    """One field of a message: key at ``start``, value bytes ``[value, end)`` (a tuple: cheap)."""

    __slots__ = ()


def fields(buf, start: int, end: int) -> Iterator[Span]:
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


# -- the minimal schema ----------------------------------------------------------------------

_BN_PARAM_CLASS = None


def bn_param_class():
    """``BatchNormParameter`` from a descriptor built here (lazy: most runs never need it)."""
    global _BN_PARAM_CLASS
    if _BN_PARAM_CLASS is None:
        from google.protobuf import descriptor_pb2, descriptor_pool

        fdp = descriptor_pb2.FileDescriptorProto(
            name="bnfix/caffe_subset.proto", package="bnfix.caffe", syntax="proto2"
        )
        msg = fdp.message_type.add(name="BatchNormParameter")
        F = descriptor_pb2.FieldDescriptorProto
        for name, number, ftype, default in (
            ("use_global_stats", 1, F.TYPE_BOOL, None),
            ("moving_average_fraction", 2, F.TYPE_FLOAT, "0.999"),
            ("eps", 3, F.TYPE_FLOAT, "1e-05"),
        ):
            f = msg.field.add(name=name, number=number, type=ftype, label=F.LABEL_OPTIONAL)
            if default is not None:
                f.default_value = default
        pool = descriptor_pool.DescriptorPool()
        pool.Add(fdp)
        desc = pool.FindMessageTypeByName("bnfix.caffe.BatchNormParameter")
        try:
            from google.protobuf.message_factory import GetMessageClass

            _BN_PARAM_CLASS = GetMessageClass(desc)
        except ImportError:  # protobuf < 4.21
            from google.protobuf.message_factory import MessageFactory

            _BN_PARAM_CLASS = MessageFactory(pool).GetPrototype(desc)
    return _BN_PARAM_CLASS


# -- the model -------------------------------------------------------------------------------


class Layer(namedtuple("Layer", "index start payload end name type")):
    """A top-level ``layer`` entry: its position among the layer entries, the offsets of its key,
    payload and end, and the two fields read from every layer."""

    __slots__ = ()


class Blob:
    """A BlobProto's values: where they live inside the layer payload, decoded on request.

    Only offsets are kept at first, so a run can plan its output layout and start copying
    before any value is read; ``values`` decodes them when the maths needs them.
    """

    def __init__(self, source: bytes, dtype: str, chunks: list[tuple[int, int]], shape: tuple[int, ...] | None):
        self.source = source  # the layer payload the chunks point into
        self.dtype = dtype  # "<f4" for ``data``, "<f8" for ``double_data``
        self.chunks = chunks  # (offset in the layer payload, element count), in order
        self.shape = shape

    @property
    def count(self) -> int:
        return sum(c for _, c in self.chunks)

    @property
    def itemsize(self) -> int:
        return 8 if self.dtype == "<f8" else 4

    def first(self) -> float:
        """The first value (the scale factor is all a plan needs)."""
        offset = self.chunks[0][0]
        return struct.unpack_from(self.dtype.replace("f4", "f").replace("f8", "d"), self.source, offset)[0]

    @functools.cached_property
    def values(self) -> array:
        """The values as an ``array('f')`` or ``array('d')`` (a copy, made once)."""
        out = array("d" if self.dtype == "<f8" else "f")
        for offset, count in self.chunks:
            out.frombytes(self.source[offset : offset + count * self.itemsize])
        if sys.byteorder == "big":  # protobuf is little-endian on the wire
            out.byteswap()
        return out

    def write(self, payload: bytearray, values) -> None:
        """Overwrite this blob's values in place: the same count keeps every length prefix."""
        data = array("d" if self.dtype == "<f8" else "f", values)
        if len(data) != self.count:
            raise AssertionError(f"internal error: {len(data)} values for a blob of {self.count}")
        if sys.byteorder == "big":
            data.byteswap()
        raw, size, pos = data.tobytes(), self.itemsize, 0
        for offset, count in self.chunks:
            payload[offset : offset + count * size] = raw[pos : pos + count * size]
            pos += count * size


class BatchNormLayer:
    """A decoded BatchNorm layer: blobs, and its ``batch_norm_param`` if stored."""

    def __init__(self, layer: Layer, payload: bytes):
        self.layer, self.payload = layer, payload
        self.blobs: list[Blob] = []
        self.param_spans: list[Span] = []  # offsets relative to payload

    @property
    def param_bytes(self) -> bytes | None:
        """The stored ``batch_norm_param`` payload (occurrences concatenated: protobuf merges
        them that way), or None if the layer stores none."""
        if not self.param_spans:
            return None
        return b"".join(self.payload[sp.value : sp.end] for sp in self.param_spans)

    def stored_param(self) -> ParamFields | None:
        """eps and use_global_stats as stored, read at the wire level (last value wins)."""
        data = self.param_bytes
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

    def param(self):
        """The stored ``batch_norm_param`` decoded by the protobuf runtime, or None if absent.

        bnfix edits the param at the wire level and uses this independent decoder to check
        what it wrote.
        """
        data = self.param_bytes
        if data is None:
            return None
        msg = bn_param_class()()
        try:
            msg.MergeFromString(data)
        except Exception as exc:  # protobuf's DecodeError type differs across backends
            raise WireError(f"layer {self.layer.name!r}: bad batch_norm_param: {exc}") from None
        return msg

    def edited_param(self, *, eps: float | None | type(...) = ..., use_global_stats: bool | None | type(...) = ...
                     ) -> bytes:
        """The param payload with eps / use_global_stats set (a value), removed (None) or kept
        (``...``): the other fields keep their bytes and order, changed fields go at the end."""
        data = self.param_bytes or b""
        drop = set()
        if eps is not ...:
            drop.add(BN_EPS)
        if use_global_stats is not ...:
            drop.add(BN_USE_GLOBAL_STATS)
        out = bytearray()
        for sp in fields(data, 0, len(data)):
            if sp.number not in drop:
                out += data[sp.start : sp.end]
        if use_global_stats not in (..., None):
            out += key(BN_USE_GLOBAL_STATS, VARINT) + encode_varint(int(use_global_stats))
        if eps not in (..., None):
            out += key(BN_EPS, I32) + struct.pack("<f", eps)
        return bytes(out)

    def rebuilt(self, blob_values: dict, param: bytes | None, *, drop_param: bool = False) -> bytes:
        """The whole layer entry (key, length, payload) with new blob values and param.

        ``param`` (a payload) replaces the stored ``batch_norm_param`` (at the first
        occurrence's place, or the end); ``drop_param`` removes it; otherwise it is kept.
        """
        payload = bytearray(self.payload)
        for i, values in blob_values.items():
            self.blobs[i].write(payload, values)
        if param is not None or drop_param:
            encoded = b"" if drop_param else key(LAYER_BN_PARAM, LEN) + encode_varint(len(param)) + param
            cuts = self.param_spans or [Span(LAYER_BN_PARAM, LEN, len(payload), len(payload), len(payload))]
            for i, sp in reversed(list(enumerate(cuts))):
                payload[sp.start : sp.end] = encoded if i == 0 else b""
        return key(LAYER, LEN) + encode_varint(len(payload)) + bytes(payload)


class ParamFields(namedtuple("ParamFields", "eps use_global_stats")):
    """The two ``batch_norm_param`` fields bnfix acts on, as stored (None: not stored)."""

    __slots__ = ()


def payload_of(entry: bytes) -> bytes:
    """The message bytes of one encoded field (key + length + payload), e.g. a rebuilt layer."""
    _, pos = read_varint(entry, 0, len(entry))
    length, pos = read_varint(entry, pos, len(entry))
    return entry[pos : pos + length]


class Model:
    """An open caffemodel: its layer index, and BatchNorm layers decoded on request."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as exc:
            raise BnfixError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        st = os.fstat(self._file.fileno())
        self.size, self.mtime_ns = st.st_size, st.st_mtime_ns
        if self.size == 0:
            self.close()
            raise BnfixError(f"{self.path}: empty file, not a caffemodel")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.layers = self._index()
        except WireError as exc:
            hint = " (this looks like a text prototxt: are the arguments swapped?)" if self._looks_textual() else ""
            self.close()
            raise BnfixError(f"{self.path}: not a valid caffemodel: {exc}{hint}") from None
        except BaseException:
            self.close()
            raise

    def _looks_textual(self) -> bool:
        head = self._map[:4096]
        return bool(head) and all(b in b"\t\r\n" or 32 <= b < 127 for b in head)

    def _index(self) -> list[Layer]:
        buf, layers = self._map, []
        v1 = 0
        for sp in fields(buf, 0, self.size):
            if sp.number == LAYER and sp.wire == LEN:
                name = type_ = None
                # Only name and type are read; the rest of a layer is not checked until it is
                # decoded (BatchNorm) or copied verbatim (everything else), so stop there.
                for f in fields(buf, sp.value, sp.end):
                    if f.wire == LEN and f.number == LAYER_NAME:
                        name = bytes(buf[f.value : f.end]).decode("utf-8", "replace")
                    elif f.wire == LEN and f.number == LAYER_TYPE:
                        type_ = bytes(buf[f.value : f.end]).decode("utf-8", "replace")
                    if name is not None and type_ is not None:
                        break
                name, type_ = name or "", type_ or ""
                layers.append(Layer(len(layers), sp.start, sp.value, sp.end, name, type_))
            elif sp.number == V1_LAYERS:
                v1 += 1
        if not layers:
            what = "only V1 'layers' entries, which cannot hold BatchNorm" if v1 else "no layers"
            raise WireError(what)
        return layers

    def batch_norm(self, layer: Layer) -> BatchNormLayer:
        """Decode one BatchNorm layer (the only layers whose blob values are ever read)."""
        payload = bytes(self._map[layer.payload : layer.end])
        try:
            return decode_batch_norm(layer, payload)
        except WireError as exc:
            raise BnfixError(f"{self.path}: layer {layer.name!r}: {exc}") from None

    def close(self) -> None:
        if getattr(self, "_map", None) is not None:
            self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decode_batch_norm(layer: Layer, payload: bytes) -> BatchNormLayer:
    """Decode a BatchNorm layer's payload (also used to re-read what bnfix just encoded)."""
    out = BatchNormLayer(layer, payload)
    for sp in fields(payload, 0, len(payload)):
        if sp.number == LAYER_BLOBS and sp.wire == LEN:
            out.blobs.append(_decode_blob(payload, sp.value, sp.end, len(out.blobs)))
        elif sp.number == LAYER_BN_PARAM and sp.wire == LEN:
            out.param_spans.append(sp)
    return out


def _decode_blob(buf: bytes, start: int, end: int, index: int) -> Blob:
    legacy: dict[int, int] = {}
    shape: list[int] | None = None
    single, double = _Values("<f4"), _Values("<f8")
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
            single.add(buf, sp, I32, f"blob {index} data")
        elif n == BLOB_DOUBLE_DATA:
            double.add(buf, sp, I64, f"blob {index} double_data")
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


class _Values:
    """Collects the packed and unpacked pieces of one repeated float/double field."""

    def __init__(self, dtype: str):
        self.dtype = dtype
        self.size = 8 if dtype == "<f8" else 4
        self.chunks: list[tuple[int, int]] = []

    @property
    def count(self) -> int:
        return sum(c for _, c in self.chunks)

    def add(self, buf: bytes, sp: Span, unpacked_wire: int, what: str) -> None:
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


# -- writing ---------------------------------------------------------------------------------

CHUNK = 64 << 20  # copy granularity: progress updates and cancellation between chunks


def copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes at ``offset`` of fd ``src`` to the current position of fd ``dst``
    without the bytes passing through Python: copy_file_range, else sendfile, else chunks."""
    while count > 0:
        done = 0
        try:
            done = os.copy_file_range(src, dst, count, offset)
        except (AttributeError, OSError):
            try:
                done = os.sendfile(dst, src, offset, count)
            except (AttributeError, OSError):
                done = 0
        if done <= 0:  # portable fallback (and copy_file_range's 0 at a short file)
            chunk = os.pread(src, min(count, 1 << 22), offset)
            if not chunk:
                raise BnfixError(f"input ended {count} bytes early while copying")
            write_fd(dst, chunk)
            done = len(chunk)
        offset += done
        count -= done


def copy_range_at(src: int, dst: int, offset: int, dst_offset: int, count: int) -> None:
    """Like :func:`copy_range` but to an explicit output offset, so several writers can fill
    one file at once: copy_file_range, else pread/pwrite chunks."""
    while count > 0:
        try:
            done = os.copy_file_range(src, dst, count, offset, dst_offset)
        except OSError:  # e.g. EXDEV across file systems on old kernels
            done = 0
        if done <= 0:
            chunk = os.pread(src, min(count, 1 << 22), offset)
            if not chunk:
                raise BnfixError(f"input ended {count} bytes early while copying")
            done = os.pwrite(dst, chunk, dst_offset)
        offset += done
        dst_offset += done
        count -= done


class _Copier(threading.Thread):
    """Copies the untouched ranges in the background; the kernel does the work (copy_file_range
    releases the GIL), so the caller's arithmetic runs at the same time."""

    def __init__(self, src: int, dst: int, copies: list[tuple[int, int, int]], progress):
        super().__init__(name="bnfix-copy", daemon=True)
        self.src, self.dst, self.copies, self.progress = src, dst, copies, progress
        self.cancelled = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            done = 0
            for offset, dst_offset, count in self.copies:
                while count > 0 and not self.cancelled.is_set():
                    n = min(CHUNK, count)
                    copy_range_at(self.src, self.dst, offset, dst_offset, n)
                    offset, dst_offset, count, done = offset + n, dst_offset + n, count - n, done + n
                    if self.progress:
                        self.progress(done)
        except BaseException as exc:  # re-raised in the caller's thread
            self.error = exc


def write(src: Path, size: int, layout: list[tuple[int, int, int]], entries, dst_fd: int,
          progress=None) -> None:
    """Write ``src`` to ``dst_fd`` with some byte ranges replaced.

    ``layout`` lists the replaced ranges as sorted, non-overlapping ``(start, end, new_length)``;
    ``entries()`` returns ``{start: new bytes}`` of exactly those lengths.  The output offsets
    follow from the lengths alone, so the untouched ranges are copied in a background thread
    while ``entries()`` runs: the arithmetic (and protobuf's import) hides behind the copy.
    ``progress(n)`` is called with the number of bytes copied so far.
    """
    copies, slots = [], []
    pos = out = 0
    for start, end, length in layout:
        if start > pos:
            copies.append((pos, out, start - pos))
            out += start - pos
        slots.append((start, out, length))
        out, pos = out + length, end
    if pos < size:
        copies.append((pos, out, size - pos))
    with open(src, "rb") as f:
        if os.fstat(f.fileno()).st_size != size:
            raise BnfixError(f"{src}: the file changed while bnfix was running")
        if not (hasattr(os, "copy_file_range") and hasattr(os, "pwrite")):
            _write_sequential(f.fileno(), dst_fd, copies, slots, entries(), progress)
            return
        copier = _Copier(f.fileno(), dst_fd, copies, progress)
        # The copier needs the GIL for a moment after each of its syscalls; with the default
        # 5 ms switch interval it would wait that long behind the caller's Python work for each
        # of its ~75 ranges.  A short interval during the overlap keeps it fed.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, 1e-4))
        copier.start()
        try:
            data = entries()
            for start, out_offset, length in slots:
                _check_length(data[start], length)
                _pwrite_all(dst_fd, data[start], out_offset)
        except BaseException:
            copier.cancelled.set()
            raise
        finally:
            copier.join()
            sys.setswitchinterval(interval)
        if copier.error is not None:
            raise copier.error


def _write_sequential(src: int, dst: int, copies, slots, data: dict[int, bytes], progress) -> None:
    """The portable path: one writer, in file order (sendfile or chunks for the copies)."""
    pieces = sorted([(c[1], "copy", c) for c in copies] +
                    [(out, "data", (start, length)) for start, out, length in slots])
    done = 0
    for _, kind, item in pieces:
        if kind == "data":
            start, length = item
            _check_length(data[start], length)
            write_fd(dst, data[start])
            continue
        offset, _, count = item
        while count > 0:
            n = min(CHUNK, count)
            copy_range(src, dst, offset, n)
            offset, count, done = offset + n, count - n, done + n
            if progress:
                progress(done)


def _check_length(data: bytes, length: int) -> None:
    if len(data) != length:
        raise AssertionError(f"internal error: planned {length} bytes for a layer, got {len(data)}")


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


