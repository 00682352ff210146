"""Test-only copies of a pair whose custom Caffe ``Upsample`` layers are replaced by standard ones.

Darknet converters emit ``type: "Upsample"`` with ``upsample_param { scale: k }`` (nearest
neighbour, Darknet's [upsample] stride), a type that BVLC Caffe does not define. OpenVINO's Model
Optimizer cannot even parse it, and MNN 3.6.1 maps it to a ``Resize`` that is not nearest
(measured: 2.6 max abs error at the nano model's second head). The copy replaces each such layer
by an exactly equivalent layer those runtimes know:

- ``deconv``: a depthwise ``Deconvolution`` (``num_output = group = C``, ``kernel_size = stride =
  k``, no bias) whose C x 1 x k x k weights are all ones: each input pixel becomes a k x k block
  of itself, which is nearest x k, in any float arithmetic (one product with 1.0, no sum).
- ``resample``: ``Resample { type: NEAREST factor: k }``, which OpenVINO's Caffe front end reads.

Only the Upsample layers change, in both files, and ``replace_upsample`` proves it: every other
layer block of the prototxt and every other entry of the caffemodel is byte-identical in the copy
(the BatchNorm and Scale layers, which the runtime tests are about, included). The prototxt is
read with a small scanner of its own, not bnfix's parser, so the test harness does not lean on
the code it tests.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any, NamedTuple

import caffe_proto as cp
import numpy as np
import wire

MODES = ("deconv", "resample")
# Layer types that set their top's channel count (num_output); every other type of a Darknet
# conversion keeps its first bottom's, except Concat (the sum) and Input (its shape).
_SETS_CHANNELS = {"Convolution", "Deconvolution", "InnerProduct"}

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<open>[{<])
  | (?P<close>[}>])
  | (?P<colon>:)
  | (?P<word>[^\s{}<>:\#"',;\[\]]+)
  | (?P<other>.)
""", re.VERBOSE)


class LayerBlock(NamedTuple):
    """One top-level ``layer { ... }`` of a prototxt: its span and the fields the tests read."""
    start: int          # offset of the ``layer`` keyword
    end: int            # offset just past the closing brace
    name: str
    type: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    fields: tuple[tuple[str, str], ...]   # every scalar as ("param.sub.field", raw value)

    def get(self, path: str) -> str | None:
        return next((v for p, v in self.fields if p == path), None)


class Replaced(NamedTuple):
    prototxt: Path
    caffemodel: Path
    layers: tuple[str, ...]   # names of the replaced Upsample layers


def _unquote(value: str) -> str:
    return value[1:-1] if value[:1] in "\"'" else value


def _scan(text: str) -> tuple[list[LayerBlock], list[tuple[str, str]]]:
    """The layer blocks and the top-level scalar fields (``input``, ``input_dim``, ...)."""
    tokens = [(m.lastgroup, m.group(), m.start(), m.end()) for m in _TOKEN.finditer(text)
              if m.lastgroup not in ("space", "comment")]
    blocks: list[LayerBlock] = []
    top: list[tuple[str, str]] = []
    path: list[str] = []
    fields: list[tuple[str, str]] = []
    block_start = 0
    i = 0
    while i < len(tokens):
        kind, value, start, end = tokens[i]
        if kind == "word":
            j = i + 1
            if j < len(tokens) and tokens[j][0] == "colon":
                j += 1
            nxt = tokens[j] if j < len(tokens) else None
            if nxt and nxt[0] == "open":
                if not path:
                    if value == "layers":
                        raise ValueError("V1 'layers' prototxts are not supported by this helper")
                    if value == "layer":
                        block_start, fields = start, []
                path.append(value)
                i = j + 1
                continue
            if nxt is None or nxt[0] not in ("word", "string"):
                raise ValueError(f"unexpected prototxt syntax at offset {start}")
            if path and path[0] == "layer":
                fields.append((".".join(path[1:] + [value]), nxt[1]))
            else:   # input_dim, input_shape { dim }, ...: the net's own fields
                top.append((".".join(path + [value]), nxt[1]))
            i = j + 1
            continue
        if kind == "close" and path:
            if path.pop() == "layer" and not path:
                blocks.append(_block(block_start, end, fields))
            i += 1
            continue
        if kind == "other" and value in ",;":
            i += 1
            continue
        raise ValueError(f"unexpected {value!r} at offset {start} of the prototxt")
    if path:
        raise ValueError("unclosed brace in the prototxt")
    return blocks, top


def _block(start: int, end: int, fields: list[tuple[str, str]]) -> LayerBlock:
    def all_(key: str) -> tuple[str, ...]:
        return tuple(_unquote(v) for k, v in fields if k == key)
    return LayerBlock(start, end, next(iter(all_("name")), ""), next(iter(all_("type")), ""),
                      all_("bottom"), all_("top"), tuple(fields))


def layer_blocks(text: str) -> list[LayerBlock]:
    """The top-level layers of a prototxt, in order."""
    return _scan(text)[0]


def final_writer(text: str, blob: str) -> LayerBlock:
    """The last layer that writes `blob`: the one whose output a runtime reports for that blob.

    Converters name a runtime tensor after that layer when it works in place (caffe2onnx and
    MNN use the layer name), else after the top, so callers use ``tensor_name`` below."""
    writers = [b for b in layer_blocks(text) if blob in b.tops]
    if not writers:
        raise KeyError(f"no layer writes blob {blob!r}")
    return writers[-1]


def tensor_name(text: str, blob: str) -> str:
    """How MNN and caffe2onnx name the final value of `blob`: the layer name of its last writer
    if that layer works in place, else the blob name."""
    w = final_writer(text, blob)
    return w.name if blob in w.bottoms else blob


def channels(text: str) -> dict[str, int]:
    """Channel count of every blob, for the layer types of Darknet conversions."""
    blocks, top = _scan(text)
    out: dict[str, int] = {}
    inputs = [_unquote(v) for k, v in top if k == "input"]
    dims = [int(v) for k, v in top if k in ("input_dim", "input_shape.dim")]
    for i, name in enumerate(inputs):
        out[name] = dims[4 * i + 1]
    for b in blocks:
        if b.type == "Input":
            out[b.tops[0]] = int([v for k, v in b.fields if k == "input_param.shape.dim"][1])
        elif b.type in _SETS_CHANNELS:
            num = b.get("convolution_param.num_output") or b.get("inner_product_param.num_output")
            if num is None:
                raise ValueError(f"layer {b.name!r} has no num_output")
            out[b.tops[0]] = int(num)
        elif b.type == "Concat":
            if b.get("concat_param.axis") not in (None, "1") or b.get("concat_param.concat_dim"):
                raise ValueError(f"Concat {b.name!r} is not along channels")
            out[b.tops[0]] = sum(out[x] for x in b.bottoms)
        else:
            for t in b.tops:
                out[t] = out[b.bottoms[0]]
    return out


def _replacement_text(b: LayerBlock, c: int, k: int, mode: str) -> str:
    head = "".join(f'    bottom: "{x}"\n' for x in b.bottoms) + \
        "".join(f'    top: "{x}"\n' for x in b.tops) + f'    name: "{b.name}"\n'
    if mode == "deconv":
        body = ('    type: "Deconvolution"\n    convolution_param {\n'
                f"        num_output: {c}\n        group: {c}\n"
                f"        kernel_size: {k}\n        stride: {k}\n        pad: 0\n"
                "        bias_term: false\n    }\n")
    else:
        body = ('    type: "Resample"\n    resample_param {\n'
                f"        type: NEAREST\n        factor: {k}\n    }}\n")
    return "layer {\n" + head + body + "}"


def _replacement_entry(b: LayerBlock, c: int, k: int, mode: str) -> bytes:
    """The new caffemodel entry, as it would appear inside NetParameter (tag and length too)."""
    layer = cp.LayerParameter(name=b.name, type="Deconvolution" if mode == "deconv" else "Resample",
                              bottom=list(b.bottoms), top=list(b.tops))
    if mode == "deconv":
        w = cp.BlobProto()
        w.shape.dim.extend([c, 1, k, k])   # Caffe deconvolution: C_in x C_out/group x kh x kw
        w.data.extend(np.ones(c * k * k, np.float32).tolist())
        layer.blobs.append(w)
    net = cp.NetParameter()
    net.layer.append(layer)
    return net.SerializeToString()   # just the field-100 entry: the net has nothing else


def entries(data: bytes) -> list[tuple[int, bytes]]:
    """The top-level fields of a serialised NetParameter as (field number, exact bytes)."""
    return [(number, data[start:end]) for number, _, start, end in wire.fields(data)]


def entry_layer(entry: bytes) -> Any:
    """The LayerParameter inside a field-100 entry (the subset schema keeps unknown fields)."""
    net: Any = cp.parse(entry)   # a dynamic protobuf class: no static attributes
    return net.layer[0]


def replace_upsample(prototxt: Path, caffemodel: Path, dest: Path, mode: str = "deconv") -> Replaced:
    """Write ``dest/<name>.prototxt`` and ``.caffemodel`` with every Upsample layer replaced.

    Raises if anything but the Upsample layers would differ from the source (checked on the
    written bytes), or if a layer is not a plain ``upsample_param { scale: k }``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    prototxt, caffemodel, dest = Path(prototxt), Path(caffemodel), Path(dest)
    text = prototxt.read_text()
    blocks = layer_blocks(text)
    chans = channels(text)
    ups = [b for b in blocks if b.type == "Upsample"]
    new_text, new_entry, pos, parts = {}, {}, 0, []
    for b in ups:
        k = b.get("upsample_param.scale")
        if k is None or not k.isdigit() or len(b.bottoms) != 1 or len(b.tops) != 1:
            raise ValueError(f"Upsample {b.name!r} is not upsample_param {{ scale: k }} on one blob")
        c = chans[b.bottoms[0]]
        new_text[b.name] = _replacement_text(b, c, int(k), mode)
        new_entry[b.name] = _replacement_entry(b, c, int(k), mode)
    for b in blocks:
        if b.name in new_text:
            parts += [text[pos:b.start], new_text[b.name]]
            pos = b.end
    parts.append(text[pos:])
    out_text = "".join(parts)

    model = caffemodel.read_bytes()
    if any(f == 2 for f, _ in entries(model)):
        raise ValueError("V1 'layers' caffemodels are not supported by this helper")
    out_model = b"".join(new_entry.get(entry_layer(e).name, e) if f == 100 else e
                         for f, e in entries(model))
    dest.mkdir(parents=True, exist_ok=True)
    out = Replaced(dest / prototxt.name, dest / caffemodel.name, tuple(b.name for b in ups))
    out.prototxt.write_text(out_text)
    out.caffemodel.write_bytes(out_model)
    check_only_replaced(prototxt, caffemodel, out)
    return out


def check_only_replaced(prototxt: Path, caffemodel: Path, copy: Replaced) -> None:
    """Raise AssertionError unless the copy differs from the source only in `copy.layers`:
    same prototxt text outside those blocks, same caffemodel bytes outside those entries."""
    src_text, dst_text = Path(prototxt).read_text(), copy.prototxt.read_text()

    def kept_text(text: str) -> list[str]:
        blocks = layer_blocks(text)
        gaps = [text[a.end:b.start] for a, b in itertools.pairwise(blocks)]
        return [text[:blocks[0].start] if blocks else text, text[blocks[-1].end:] if blocks else "",
                *gaps, *(text[b.start:b.end] for b in blocks if b.name not in copy.layers)]

    if kept_text(src_text) != kept_text(dst_text):
        raise AssertionError(f"{copy.prototxt}: text outside the replaced layers changed")

    def kept_entries(data: bytes) -> list[bytes]:
        return [e for f, e in entries(data) if f != 100 or entry_layer(e).name not in copy.layers]

    if kept_entries(Path(caffemodel).read_bytes()) != kept_entries(copy.caffemodel.read_bytes()):
        raise AssertionError(f"{copy.caffemodel}: entries outside the replaced layers changed")
    kinds = {b.name: b.type for b in layer_blocks(dst_text)}
    if any(kinds.get(n) in ("BatchNorm", "Scale") for n in copy.layers):
        raise AssertionError("a BatchNorm or Scale layer was replaced")
