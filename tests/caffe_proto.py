"""Test-side Caffe schema and model builders, independent of bnfix's own wire code.

The messages are built from a descriptor with the field numbers of BVLC ``caffe.proto`` (only
the fields the tests use), so tests can both write models with the real ``protobuf`` runtime and
decode bnfix's output with it: the walker is checked against protobuf, not against itself.
"""

from __future__ import annotations

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool

try:
    from google.protobuf.message_factory import GetMessageClass
except ImportError:  # protobuf < 4.21
    GetMessageClass = None
    from google.protobuf.message_factory import MessageFactory

F = descriptor_pb2.FieldDescriptorProto
_OPT, _REP = F.LABEL_OPTIONAL, F.LABEL_REPEATED

_SCHEMA = {
    "BlobShape": [("dim", 1, F.TYPE_INT64, _REP, None, True)],
    "BlobProto": [
        ("num", 1, F.TYPE_INT32, _OPT, None, False),
        ("channels", 2, F.TYPE_INT32, _OPT, None, False),
        ("height", 3, F.TYPE_INT32, _OPT, None, False),
        ("width", 4, F.TYPE_INT32, _OPT, None, False),
        ("data", 5, F.TYPE_FLOAT, _REP, None, True),
        ("diff", 6, F.TYPE_FLOAT, _REP, None, True),
        ("shape", 7, F.TYPE_MESSAGE, _OPT, "BlobShape", False),
        ("double_data", 8, F.TYPE_DOUBLE, _REP, None, True),
    ],
    "BatchNormParameter": [
        ("use_global_stats", 1, F.TYPE_BOOL, _OPT, None, False),
        ("moving_average_fraction", 2, F.TYPE_FLOAT, _OPT, None, False),
        ("eps", 3, F.TYPE_FLOAT, _OPT, None, False),
    ],
    "NetStateRule": [("phase", 1, F.TYPE_INT32, _OPT, None, False)],
    "LayerParameter": [
        ("name", 1, F.TYPE_STRING, _OPT, None, False),
        ("type", 2, F.TYPE_STRING, _OPT, None, False),
        ("bottom", 3, F.TYPE_STRING, _REP, None, False),
        ("top", 4, F.TYPE_STRING, _REP, None, False),
        ("blobs", 7, F.TYPE_MESSAGE, _REP, "BlobProto", False),
        ("include", 8, F.TYPE_MESSAGE, _REP, "NetStateRule", False),
        ("batch_norm_param", 139, F.TYPE_MESSAGE, _OPT, "BatchNormParameter", False),
    ],
    "NetParameter": [
        ("name", 1, F.TYPE_STRING, _OPT, None, False),
        ("input", 3, F.TYPE_STRING, _REP, None, False),
        ("input_dim", 4, F.TYPE_INT32, _REP, None, False),
        ("layer", 100, F.TYPE_MESSAGE, _REP, "LayerParameter", False),
    ],
}


def _build():
    fdp = descriptor_pb2.FileDescriptorProto(name="tests/caffe_subset.proto", package="t", syntax="proto2")
    for msg, fields in _SCHEMA.items():
        m = fdp.message_type.add(name=msg)
        for name, number, ftype, label, ref, packed in fields:
            f = m.field.add(name=name, number=number, type=ftype, label=label)
            if ref:
                f.type_name = f".t.{ref}"
            if packed:
                f.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    out = {}
    for msg in _SCHEMA:
        desc = pool.FindMessageTypeByName(f"t.{msg}")
        out[msg] = GetMessageClass(desc) if GetMessageClass else MessageFactory(pool).GetPrototype(desc)
    return out


_CLASSES = _build()
NetParameter = _CLASSES["NetParameter"]
LayerParameter = _CLASSES["LayerParameter"]
BlobProto = _CLASSES["BlobProto"]
BatchNormParameter = _CLASSES["BatchNormParameter"]


def blob(values, *, legacy: bool = False, double: bool = False) -> BlobProto:
    b = BlobProto()
    values = np.asarray(values, np.float64 if double else np.float32).ravel()
    if legacy:
        b.num, b.channels, b.height, b.width = 1, values.size, 1, 1
    else:
        b.shape.dim.append(values.size)
    (b.double_data if double else b.data).extend(values.tolist())
    return b


def bn_layer(name: str, mean, var, s: float = 1.0, *, param: dict | None = None, extra_blobs=(),
             legacy: bool = False, double: bool = False) -> LayerParameter:
    layer = LayerParameter(name=name, type="BatchNorm", bottom=[name], top=[name])
    for values in (mean, var, [s], *extra_blobs):
        layer.blobs.append(blob(values, legacy=legacy, double=double))
    if param is not None:
        for k, v in param.items():
            setattr(layer.batch_norm_param, k, v)
    return layer


def conv_layer(name: str, weights) -> LayerParameter:
    layer = LayerParameter(name=name, type="Convolution", bottom=["data"], top=[name])
    layer.blobs.append(blob(weights))
    return layer


def model_bytes(*layers, extra: bytes = b"") -> bytes:
    net = NetParameter(name="test")
    for layer in layers:
        net.layer.append(layer)
    return net.SerializeToString() + extra


def parse(data: bytes) -> NetParameter:
    net = NetParameter()
    net.ParseFromString(data)
    return net


def bn_prototxt(names, *, param: str = "batch_norm_param {\n    use_global_stats: true\n  }") -> str:
    """A minimal deploy prototxt with one Convolution and a BatchNorm per name."""
    out = ['name: "test"', 'input: "data"', "input_dim: 1", "input_dim: 3", "input_dim: 8", "input_dim: 8",
           'layer {\n  name: "conv"\n  type: "Convolution"\n  bottom: "data"\n  top: "conv"\n}']
    for n in names:
        out.append(f'layer {{\n  name: "{n}"\n  type: "BatchNorm"\n  bottom: "conv"\n  top: "conv"\n  {param}\n}}')
    return "\n".join(out) + "\n"
