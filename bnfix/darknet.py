"""A pure reader of Darknet's own files (``.cfg`` and ``.weights``), for cross-checking a conversion.

A converted ``.caffemodel`` can only be checked against the Darknet original, and a ``.weights``
file has no table of contents: it is a header followed by bare float32 runs whose meaning follows
only from walking the ``.cfg`` in order and computing every layer's input shape exactly as
Darknet's ``parse_network_cfg`` does (pjreddie/darknet and AlexeyAB/darknet ``src/parser.c``).
So this module is a small shape interpreter plus a byte-exact reader.  It never guesses: a file
that is shorter or longer than the cfg says is an error naming the layer or the byte count,
because a reader that silently stops early would hand back statistics from the wrong layer.

Sources of every rule (read, not recalled): ``load_weights_upto``, ``load_convolutional_weights``,
``load_connected_weights``, ``load_batchnorm_weights``, ``load_shortcut_weights`` and the
``parse_*`` functions in ``src/parser.c``; output sizes from ``make_*_layer`` in
``convolutional_layer.c``, ``deconvolutional_layer.c``, ``local_layer.c``, ``maxpool_layer.c``,
``route_layer.c``, ``shortcut_layer.c``, ``upsample_layer.c``, ``reorg_layer.c``,
``crop_layer.c``, ``sam_layer.c`` and ``scale_channels_layer.c``.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

import numpy as np

from .errors import BnfixError

# --------------------------------------------------------------------------------------------
# Header


@dataclass(frozen=True)
class WeightsHeader:
    """The ``.weights`` header: version triple and images seen; its size decides every offset."""

    major: int
    minor: int
    revision: int
    seen: int
    header_size: int  # 16 (32-bit seen) or 20 (64-bit seen)

    @property
    def version(self) -> str:
        return f"{self.major}.{self.minor}.{self.revision}"

    @property
    def writer(self) -> str:
        """Who wrote the file: it decides the standalone [batchnorm] layout and the BN formula."""
        if (self.major, self.minor) == (0, 1) or (self.major, self.minor, self.revision) == (0, 2, 0):
            return "pjreddie"
        if (self.major, self.minor, self.revision) == (0, 2, 5):
            return "AlexeyAB/hank-ai"
        return f"unknown ({self.version})"

    @property
    def transposed(self) -> bool:
        """Darknet's flag for transposed [connected] matrices; BN vectors are not affected."""
        return self.major > 1000 or self.minor > 1000


def seen_is_64bit(major: int, minor: int) -> bool:
    """pjreddie's rule (parser.c ``load_weights_upto``); AlexeyAB drops the <1000 guards.

    The guards only matter for the old "transposed" files (major or minor above 1000), which
    were written with a 32-bit ``seen``; pjreddie's rule reads those correctly.
    """
    return major * 10 + minor >= 2 and major < 1000 and minor < 1000


def parse_weights_header(data: bytes, name: str = "<weights>") -> WeightsHeader:
    """Decode the first 16 or 20 bytes (little-endian, as every Darknet build writes them)."""
    if len(data) < 12:
        raise BnfixError(f"{name}: truncated: the header needs at least 16 bytes, the file has {len(data)}")
    major, minor, revision = struct.unpack_from("<3i", data)
    size = 20 if seen_is_64bit(major, minor) else 16
    if len(data) < size:
        raise BnfixError(
            f"{name}: truncated: a version {major}.{minor}.{revision} header needs {size} bytes, "
            f"the file has {len(data)}"
        )
    (seen,) = struct.unpack_from("<Q" if size == 20 else "<I", data, 12)
    return WeightsHeader(major, minor, revision, seen, size)


def read_weights_header(path: str | os.PathLike[str]) -> WeightsHeader:
    """Read just the header of a ``.weights`` file."""
    name = Path(path).name
    try:
        with open(path, "rb") as f:
            data = f.read(20)
    except OSError as e:
        raise BnfixError(f"{name}: cannot read: {e.strerror or e}") from None
    return parse_weights_header(data, name)


# --------------------------------------------------------------------------------------------
# Config file


@dataclass(frozen=True)
class Section:
    """One ``[name]`` block of a cfg; the first occurrence of a key wins, as in ``option_find``."""

    name: str  # without brackets: "net", "convolutional", ...
    options: Mapping[str, str]
    line: int  # 1-based line of the ``[name]`` header
    option_lines: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def where(self, cfg: str, key: str | None = None) -> str:
        line = self.option_lines.get(key, self.line) if key else self.line
        return f"{cfg}: line {line} [{self.name}]"


_WHITESPACE = re.compile(r"\s+")


def parse_cfg(text: str, name: str = "<cfg>") -> list[Section]:
    """Split cfg text into sections the way Darknet's ``read_cfg`` does.

    Darknet deletes all whitespace from a line before looking at it, skips lines that are then
    empty or start with ``#`` or ``;``, and ignores (with a warning) lines without ``=``; so do
    we, since what Darknet ignores cannot change the weights layout.  A trailing ``# comment``
    after a value is cut off, because Darknet's ``atoi``/``atof`` stop there too.
    """
    sections: list[Section] = []
    current: tuple[str, int, dict[str, str], dict[str, int]] | None = None

    def close() -> None:
        if current is not None:
            sname, sline, opts, lines = current
            sections.append(Section(sname, MappingProxyType(opts), sline, MappingProxyType(lines)))

    for number, raw in enumerate(text.splitlines(), start=1):
        line = _WHITESPACE.sub("", raw)
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if not line.endswith("]") or len(line) < 3:
                raise BnfixError(f"{name}: line {number}: malformed section header {raw.strip()!r}")
            close()
            current = (line[1:-1], number, {}, {})
            continue
        key, eq, value = line.partition("=")
        if not eq or not key:
            continue  # Darknet: "Config file error line N, could parse: ..." and goes on
        if current is None:
            raise BnfixError(f"{name}: line {number}: option {key!r} before the first [section]")
        current[2].setdefault(key, value.split("#", 1)[0])
        current[3].setdefault(key, number)
    close()
    return sections


def read_cfg(path: str | os.PathLike[str]) -> list[Section]:
    """Read and split a Darknet ``.cfg`` file (see ``parse_cfg``)."""
    name = Path(path).name
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise BnfixError(f"{name}: cannot read: {e.strerror or e}") from None
    return parse_cfg(text, name)


# --------------------------------------------------------------------------------------------
# Shape interpreter: what each layer reads from the .weights file


@dataclass(frozen=True)
class _Shape:
    """A layer's output as Darknet tracks it: ``out_w``, ``out_h``, ``out_c`` and ``outputs``."""

    w: int
    h: int
    c: int
    outputs: int


def _image(w: int, h: int, c: int) -> _Shape:
    return _Shape(w, h, c, w * h * c)


@dataclass(frozen=True)
class _Block:
    """A contiguous run of float32 values in the .weights file."""

    name: str  # "biases", "scales", "rolling_mean", "rolling_variance", "weights"
    count: int


@dataclass(frozen=True)
class _Layer:
    """What one cfg section contributes: its output shape, its bytes, and whether it has BN."""

    out: _Shape
    blocks: tuple[_Block, ...] = ()
    bn_kind: str | None = None  # set when the layer carries BN statistics
    channels: int = 0


def _bn_blocks(n: int, *, biases: bool) -> tuple[_Block, ...]:
    head = (_Block("biases", n),) if biases else ()
    return head + (_Block("scales", n), _Block("rolling_mean", n), _Block("rolling_variance", n))


def _cdiv(a: int, b: int) -> int:
    """C integer division (truncates toward zero), so edge-case sizes match Darknet's."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


_INT = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class _Ctx:
    """One section being interpreted, with the shapes of every layer before it."""

    cfg: str
    sec: Section
    index: int
    inp: _Shape
    prev: tuple[_Shape, ...]
    bn_biases: bool

    def fail(self, message: str, key: str | None = None) -> BnfixError:
        layer = f" (layer {self.index})" if self.index >= 0 else ""
        return BnfixError(f"{self.sec.where(self.cfg, key)}{layer}: {message}")

    def get_int(self, key: str, default: int, *, minimum: int | None = None) -> int:
        raw = self.sec.options.get(key)
        if raw is None:
            return default
        if not _INT.fullmatch(raw):
            raise self.fail(f"{key}={raw!r}: expected an integer", key)
        value = int(raw)
        if minimum is not None and value < minimum:
            raise self.fail(f"{key}={value}: must be at least {minimum}", key)
        return value

    def get_str(self, key: str, default: str) -> str:
        return self.sec.options.get(key, default)

    def refs(self, key: str) -> list[int]:
        """Layer references (``layers=-1,61``): negative ones count back from this layer."""
        raw = self.sec.options.get(key)
        if raw is None:
            raise self.fail(f"missing {key}=")
        result = []
        for item in raw.split(","):
            if not _INT.fullmatch(item):
                raise self.fail(f"{key}={raw!r}: expected comma-separated layer indices", key)
            ref = int(item)
            absolute = self.index + ref if ref < 0 else ref
            if not 0 <= absolute < self.index:
                raise self.fail(
                    f"{key}={raw}: {ref} refers to layer {absolute}, which is not before this one", key
                )
            result.append(absolute)
        return result

    def image(self) -> _Shape:
        if min(self.inp.w, self.inp.h, self.inp.c) <= 0:
            raise self.fail(
                f"the input is not an image ({self.inp.w}x{self.inp.h}x{self.inp.c}); "
                "set width, height and channels in [net]"
            )
        return self.inp

    def positive(self, shape: _Shape, detail: str) -> _Shape:
        if min(shape.w, shape.h, shape.c) <= 0:
            raise self.fail(f"the output would be {shape.w}x{shape.h}x{shape.c} ({detail})")
        return shape


def _blur(w: int, h: int, aa: int, sx: int, sy: int) -> tuple[int, int]:
    """AlexeyAB ``antialiasing``: the layer runs at stride 1, then a fixed blur conv strides."""
    size, pad = (2, 0) if aa == 2 else (3, 1)
    return _cdiv(w + 2 * pad - size, sx) + 1, _cdiv(h + 2 * pad - size, sy) + 1


def _convolutional(x: _Ctx) -> _Layer:
    inp = x.image()
    n = x.get_int("filters", 1, minimum=1)
    size = x.get_int("size", 1, minimum=1)
    sx, sy = x.get_int("stride_x", -1), x.get_int("stride_y", -1)
    if sx < 1 or sy < 1:
        stride = x.get_int("stride", 1, minimum=1)
        sx, sy = (sx if sx >= 1 else stride), (sy if sy >= 1 else stride)
    padding = size // 2 if x.get_int("pad", 0) else x.get_int("padding", 0)
    groups = 1 if x.get_int("xnor", 0) else max(x.get_int("groups", 1), 1)  # AlexeyAB's guards
    bn = bool(x.get_int("batch_normalize", 0) or x.get_int("cbn", 0))
    aa = x.get_int("antialiasing", 0)
    step_x, step_y = (1, 1) if aa else (sx, sy)
    w = _cdiv(inp.w + 2 * padding - size, step_x) + 1
    h = _cdiv(inp.h + 2 * padding - size, step_y) + 1
    if aa:
        w, h = _blur(w, h, aa, sx, sy)
    out = x.positive(_image(w, h, n), f"input {inp.w}x{inp.h}, size {size}, stride {sx}, padding {padding}")
    blocks = (_Block("biases", n),) + (_bn_blocks(n, biases=False) if bn else ())
    blocks += (_Block("weights", (inp.c // groups) * n * size * size),)
    return _Layer(out, blocks, "convolutional" if bn else None, n)


def _deconvolutional(x: _Ctx) -> _Layer:
    """pjreddie only; read like a convolution with ``c*n*size*size`` weights and no groups."""
    inp = x.image()
    n = x.get_int("filters", 1, minimum=1)
    size = x.get_int("size", 1, minimum=1)
    stride = x.get_int("stride", 1, minimum=1)
    padding = size // 2 if x.get_int("pad", 0) else x.get_int("padding", 0)
    bn = bool(x.get_int("batch_normalize", 0))
    w = (inp.w - 1) * stride + size - 2 * padding
    h = (inp.h - 1) * stride + size - 2 * padding
    detail = f"input {inp.w}x{inp.h}, size {size}, stride {stride}, padding {padding}"
    out = x.positive(_image(w, h, n), detail)
    blocks = (_Block("biases", n),) + (_bn_blocks(n, biases=False) if bn else ())
    blocks += (_Block("weights", inp.c * n * size * size),)
    return _Layer(out, blocks, "deconvolutional" if bn else None, n)


def _connected(x: _Ctx) -> _Layer:
    """Note the order: biases, weights, then scales/mean/variance (``load_connected_weights``)."""
    n = x.get_int("output", 1, minimum=1)
    bn = bool(x.get_int("batch_normalize", 0))
    blocks: tuple[_Block, ...] = (_Block("biases", n), _Block("weights", x.inp.outputs * n))
    blocks += _bn_blocks(n, biases=False) if bn else ()
    return _Layer(_Shape(1, 1, n, n), blocks, "connected" if bn else None, n)


def _local(x: _Ctx) -> _Layer:
    """Locally connected: one filter bank and bias per output position, no BN."""
    inp = x.image()
    n = x.get_int("filters", 1, minimum=1)
    size = x.get_int("size", 1, minimum=1)
    stride = x.get_int("stride", 1, minimum=1)
    pad = x.get_int("pad", 0)
    w = _cdiv(inp.w - (1 if pad else size), stride) + 1
    h = _cdiv(inp.h - (1 if pad else size), stride) + 1
    out = x.positive(_image(w, h, n), f"input {inp.w}x{inp.h}, size {size}, stride {stride}")
    return _Layer(out, (_Block("biases", out.outputs), _Block("weights", inp.c * n * size * size * w * h)))


def _batchnorm(x: _Ctx) -> _Layer:
    c = x.inp.c
    if c <= 0:
        raise x.fail("the input has no channels")
    return _Layer(x.inp, _bn_blocks(c, biases=x.bn_biases), "batchnorm", c)


def _maxpool(x: _Ctx, *, avg: bool = False) -> _Layer:
    """``(w + padding - size)/stride + 1`` with ``padding = size - 1`` by default (both forks)."""
    inp = x.image()
    stride = x.get_int("stride", 1, minimum=1)
    sx = x.get_int("stride_x", stride, minimum=1)
    sy = x.get_int("stride_y", stride, minimum=1)
    size = x.get_int("size", stride, minimum=1)
    padding = x.get_int("padding", size - 1)
    if not avg and x.get_int("maxpool_depth", 0):
        return _Layer(x.positive(_image(inp.w, inp.h, x.get_int("out_channels", 1)), "maxpool_depth"))
    aa = 0 if avg else x.get_int("antialiasing", 0)
    step_x, step_y = (1, 1) if aa else (sx, sy)
    w = _cdiv(inp.w + padding - size, step_x) + 1
    h = _cdiv(inp.h + padding - size, step_y) + 1
    if aa:
        w, h = _blur(w, h, aa, sx, sy)
    detail = f"input {inp.w}x{inp.h}, size {size}, stride {sx}, padding {padding}"
    return _Layer(x.positive(_image(w, h, inp.c), detail))


def _avgpool(x: _Ctx) -> _Layer:
    return _Layer(_image(1, 1, x.image().c))


def _route(x: _Ctx) -> _Layer:
    """Concatenate channels; AlexeyAB's ``groups``/``group_id`` then keep one slice of them."""
    refs = x.refs("layers")
    groups = x.get_int("groups", 1, minimum=1)
    group_id = x.get_int("group_id", 0, minimum=0)
    if group_id >= groups:
        raise x.fail(f"group_id={group_id} must be below groups={groups}", "group_id")
    first = x.prev[refs[0]]
    for ref in refs[1:]:
        other = x.prev[ref]
        if (other.w, other.h) != (first.w, first.h):
            raise x.fail(
                f"layers {refs[0]} ({first.w}x{first.h}) and {ref} ({other.w}x{other.h}) differ in size"
            )
    c = sum(x.prev[r].c for r in refs) // groups
    return _Layer(_Shape(first.w, first.h, c, sum(x.prev[r].outputs for r in refs) // groups))


_SHORTCUT_WEIGHTS = {"none": 0, "per_feature": 1, "per_layer": 1, "per_channel": 2}


def _shortcut(x: _Ctx) -> _Layer:
    """Keeps the previous layer's shape; AlexeyAB's ``weights_type`` may add weights."""
    refs = x.refs("from")
    kind = x.get_str("weights_type", "none")
    if kind not in _SHORTCUT_WEIGHTS:
        expected = "expected none, per_feature, per_layer or per_channel"
        raise x.fail(f"weights_type={kind!r}: {expected}", "weights_type")
    count = {0: 0, 1: len(refs) + 1, 2: (len(refs) + 1) * x.inp.c}[_SHORTCUT_WEIGHTS[kind]]
    out = _image(x.inp.w, x.inp.h, x.inp.c)
    return _Layer(out, (_Block("weights", count),) if count else ())


def _upsample(x: _Ctx) -> _Layer:
    stride = x.get_int("stride", 2)
    if stride == 0:
        raise x.fail("stride=0", "stride")
    inp = x.inp
    w, h = (inp.w * stride, inp.h * stride) if stride > 0 else (inp.w // -stride, inp.h // -stride)
    return _Layer(x.positive(_image(w, h, inp.c), f"stride {stride}"))


def _reorg(x: _Ctx) -> _Layer:
    inp = x.image()
    stride = x.get_int("stride", 1, minimum=1)
    if x.get_int("extra", 0):
        raise x.fail("pjreddie's reorg extra= is not supported", "extra")
    if x.get_int("reverse", 0):
        shape = _image(inp.w * stride, inp.h * stride, inp.c // (stride * stride))
    else:
        shape = _image(inp.w // stride, inp.h // stride, inp.c * stride * stride)
    return _Layer(x.positive(shape, f"stride {stride}"))


def _crop(x: _Ctx) -> _Layer:
    inp = x.image()
    w, h = x.get_int("crop_width", 1, minimum=1), x.get_int("crop_height", 1, minimum=1)
    return _Layer(_image(w, h, inp.c))


def _like_from(x: _Ctx) -> _Layer:
    """[sam] and [scale_channels] output the shape of their ``from`` layer."""
    ref = x.refs("from")[0]
    return _Layer(x.prev[ref])


def _same(x: _Ctx) -> _Layer:
    """Layers without weights that pass their input shape on (heads, activations, dropout...)."""
    return _Layer(x.inp)


_HANDLERS: dict[str, Callable[[_Ctx], _Layer]] = {
    "convolutional": _convolutional, "conv": _convolutional,
    "deconvolutional": _deconvolutional, "deconv": _deconvolutional,
    "connected": _connected, "conn": _connected,
    "local": _local,
    "batchnorm": _batchnorm,
    "maxpool": _maxpool, "max": _maxpool,
    "local_avgpool": lambda x: _maxpool(x, avg=True), "local_avg": lambda x: _maxpool(x, avg=True),
    "avgpool": _avgpool, "avg": _avgpool,
    "route": _route,
    "shortcut": _shortcut,
    "upsample": _upsample,
    "reorg": _reorg, "reorg3d": _reorg,
    "crop": _crop,
    "sam": _like_from, "scale_channels": _like_from,
    **{name: _same for name in (
        "yolo", "Gaussian_yolo", "region", "detection", "iseg", "cost", "softmax", "soft",
        "dropout", "activation", "logistic", "l2norm", "lrn", "normalization", "empty", "silence",
    )},
}

_UNSUPPORTED = {
    "rnn": "recurrent", "gru": "recurrent", "lstm": "recurrent", "crnn": "recurrent",
    "conv_lstm": "recurrent", "history": "recurrent", "implicit": "YOLOR implicit",
    "contrastive": "contrastive", "net": "a second [net]", "network": "a second [net]",
}

# Options that make Darknet skip or shorten a layer's read; the file layout then depends on how
# the file was produced, which a reader cannot know.
_LOAD_OPTIONS = ("dontload", "dontloadscales", "numload", "dontsave")


def _interpret(x: _Ctx) -> _Layer:
    for key in _LOAD_OPTIONS:
        if x.get_int(key, 0):
            raise x.fail(f"{key}= changes what Darknet reads from the weights file; not supported", key)
    if "share_index" in x.sec.options:
        raise x.fail("share_index= (weights shared with another layer) is not supported", "share_index")
    handler = _HANDLERS.get(x.sec.name)
    if handler is None:
        what = _UNSUPPORTED.get(x.sec.name)
        if what:
            raise x.fail(f"{what} layers are not supported")
        raise x.fail("unknown section type (not a Darknet layer)")
    return handler(x)


@dataclass(frozen=True)
class _Planned:
    index: int
    section: Section
    layer: _Layer


def _plan_layers(sections: list[Section], cfg: str, *, bn_biases: bool) -> list[_Planned]:
    """Walk the cfg like ``parse_network_cfg``: each layer's input is the previous output."""
    if not sections or sections[0].name not in ("net", "network"):
        where = f"line {sections[0].line} [{sections[0].name}]" if sections else "no sections"
        raise BnfixError(f"{cfg}: the first section must be [net] ({where})")
    net = _Ctx(cfg, sections[0], -1, _image(0, 0, 0), (), bn_biases)
    w, h, c = net.get_int("width", 0), net.get_int("height", 0), net.get_int("channels", 0)
    shape = _Shape(w, h, c, net.get_int("inputs", w * h * c))
    outs: list[_Shape] = []
    planned = []
    for index, sec in enumerate(sections[1:]):
        layer = _interpret(_Ctx(cfg, sec, index, shape, tuple(outs), bn_biases))
        planned.append(_Planned(index, sec, layer))
        outs.append(layer.out)
        shape = layer.out
    return planned


def _total_floats(planned: list[_Planned]) -> int:
    return sum(b.count for p in planned for b in p.layer.blocks)


# --------------------------------------------------------------------------------------------
# Reading the BN statistics


@dataclass(frozen=True, eq=False)
class DarknetBN:
    """BN statistics of one Darknet layer, read-only float32 copies straight from the file."""

    index: int  # Darknet layer index (0 = first section after [net])
    kind: str  # "convolutional" | "connected" | "batchnorm" | "deconvolutional"
    channels: int
    scales: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    biases: np.ndarray | None = None  # None only for pjreddie's standalone [batchnorm]
    line: int = 0  # cfg line of the section header


def _read_floats(f: BinaryIO, offset: int, count: int) -> np.ndarray:
    f.seek(offset)
    arr = np.frombuffer(f.read(count * 4), dtype="<f4").astype(np.float32)
    arr.setflags(write=False)
    return arr


def read_bn_layers(
    cfg_path: str | os.PathLike[str],
    weights_path: str | os.PathLike[str],
    *,
    standalone_bn_biases: bool | None = None,
) -> tuple[WeightsHeader, list[DarknetBN]]:
    """All BN layers of a cfg/weights pair, after checking the file holds exactly what the cfg says.

    ``standalone_bn_biases`` picks the layout of standalone [batchnorm] layers: AlexeyAB since
    2019-12 stores biases first, pjreddie does not.  ``None`` follows the header's writer
    (0.2.5 means AlexeyAB/hank-ai).
    """
    cfg_name, weights_name = Path(cfg_path).name, Path(weights_path).name
    sections = read_cfg(cfg_path)
    header = read_weights_header(weights_path)
    bn_biases = header.writer == "AlexeyAB/hank-ai" if standalone_bn_biases is None else standalone_bn_biases
    planned = _plan_layers(sections, cfg_name, bn_biases=bn_biases)
    size = os.stat(weights_path).st_size

    def hint() -> str:
        return _layout_hint(sections, cfg_name, bn_biases, header, size)

    offsets, end = _locate(planned, header.header_size, size, weights_name, hint)
    if end != size:
        raise BnfixError(
            f"{weights_name}: {size - end} unexpected trailing bytes: cfg and weights do not match "
            f"({cfg_name} accounts for {end} of {size} bytes){hint()}"
        )

    result = []
    with open(weights_path, "rb") as f:
        for p, where in zip(planned, offsets):
            if p.layer.bn_kind is None:
                continue
            n = p.layer.channels
            result.append(
                DarknetBN(
                    index=p.index,
                    kind=p.layer.bn_kind,
                    channels=n,
                    scales=_read_floats(f, where["scales"], n),
                    mean=_read_floats(f, where["rolling_mean"], n),
                    variance=_read_floats(f, where["rolling_variance"], n),
                    biases=_read_floats(f, where["biases"], n) if "biases" in where else None,
                    line=p.section.line,
                )
            )
    return header, result


def _locate(
    planned: list[_Planned], start: int, size: int, name: str, hint: Callable[[], str]
) -> tuple[list[dict[str, int]], int]:
    """Byte offset of every block, per layer, and where the last one ends; a short file fails here."""
    result: list[dict[str, int]] = []
    cursor = start
    for p in planned:
        where: dict[str, int] = {}
        for block in p.layer.blocks:
            end = cursor + 4 * block.count
            if end > size:
                raise BnfixError(
                    f"{name}: truncated: layer {p.index} [{p.section.name}] needs "
                    f"{end - size} more bytes for {block.name}{hint()}"
                )
            where[block.name], cursor = cursor, end
        result.append(where)
    return result, cursor


def _layout_hint(sections: list[Section], cfg: str, bn_biases: bool, header: WeightsHeader, size: int) -> str:
    """If the other standalone [batchnorm] layout fits the file exactly, say so."""
    if not any(s.name == "batchnorm" for s in sections[1:]):
        return ""
    other = _plan_layers(sections, cfg, bn_biases=not bn_biases)
    if header.header_size + 4 * _total_floats(other) != size:
        return ""
    layout = "with biases (AlexeyAB >= 2019-12)" if not bn_biases else "without biases (pjreddie)"
    return f"; it matches exactly if standalone [batchnorm] layers are stored {layout}"
