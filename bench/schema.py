"""A minimal Caffe schema for the two bench parts that decode a whole model with protobuf.

The naive peer (``naive.py``) and the verifier (``verify.py``) both need ``NetParameter``
classes from the real protobuf runtime, and neither may depend on bnfix (the verifier checks
the generator independently of the tool under test) or on protoc and a caffe.proto at bench
time.  So the schema is built at run time from a ``FileDescriptorProto``.  Only the fields the
two touch are declared; every other field (param, phase, convolution_param, ...) survives a
parse and re-serialization as an unknown field, byte for byte.
"""

from __future__ import annotations

from typing import Any


def net_parameter_class() -> Any:
    """``caffe.NetParameter`` built from a descriptor (works with protobuf 3.20 to 7.x)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # type: ignore[import-untyped,unused-ignore]

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="bnfix_bench_caffe.proto", package="caffe",
                                             syntax="proto2")

    def message(name: str, *fields: tuple[str, int, int, int, str | None]) -> None:
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, label, extra in fields:
            fd = m.field.add(name=fname, number=number, type=ftype, label=label)
            if ftype == F.TYPE_MESSAGE:
                fd.type_name = f".caffe.{extra}"
            elif extra == "packed":
                fd.options.packed = True

    OPT, REP = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("BlobShape", ("dim", 1, F.TYPE_INT64, REP, "packed"))
    message("BlobProto",
            ("num", 1, F.TYPE_INT32, OPT, None), ("channels", 2, F.TYPE_INT32, OPT, None),
            ("height", 3, F.TYPE_INT32, OPT, None), ("width", 4, F.TYPE_INT32, OPT, None),
            ("data", 5, F.TYPE_FLOAT, REP, "packed"), ("diff", 6, F.TYPE_FLOAT, REP, "packed"),
            ("shape", 7, F.TYPE_MESSAGE, OPT, "BlobShape"),
            ("double_data", 8, F.TYPE_DOUBLE, REP, "packed"),
            ("double_diff", 9, F.TYPE_DOUBLE, REP, "packed"))
    message("BatchNormParameter",
            ("use_global_stats", 1, F.TYPE_BOOL, OPT, None),
            ("moving_average_fraction", 2, F.TYPE_FLOAT, OPT, None),
            ("eps", 3, F.TYPE_FLOAT, OPT, None))
    message("LayerParameter",
            ("name", 1, F.TYPE_STRING, OPT, None), ("type", 2, F.TYPE_STRING, OPT, None),
            ("bottom", 3, F.TYPE_STRING, REP, None), ("top", 4, F.TYPE_STRING, REP, None),
            ("blobs", 7, F.TYPE_MESSAGE, REP, "BlobProto"),
            ("batch_norm_param", 139, F.TYPE_MESSAGE, OPT, "BatchNormParameter"))
    message("NetParameter",
            ("name", 1, F.TYPE_STRING, OPT, None), ("input", 3, F.TYPE_STRING, REP, None),
            ("input_dim", 4, F.TYPE_INT32, REP, None),
            ("layer", 100, F.TYPE_MESSAGE, REP, "LayerParameter"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    desc = pool.FindMessageTypeByName("caffe.NetParameter")
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(desc)
    return message_factory.MessageFactory(pool).GetPrototype(desc)  # protobuf < 4.21
