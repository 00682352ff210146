"""An independent check that the generator writes the model it claims to.

The generator (``generate.py``) encodes every byte by hand, so a mistake there would make every
number in the bench meaningless without any error.  This parses the generated caffemodel with
the real protobuf runtime (not with bnfix, the tool under test) and checks YOLOv3's layer
counts, every blob's value count against its shape, the BatchNorm blob layout, and that every
prototxt layer exists in the caffemodel.  It runs on request (``--verify``) and in ``--ci``.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from schema import net_parameter_class

YOLOV3_FLOATS = 62_001_829  # yolov3.weights' 62,001,757 + one BN scale factor per BN layer


def check(prototxt: str, caffemodel: str) -> bool:
    """Print what was found; True when the model is what the generator promises."""
    from google.protobuf.internal import api_implementation  # type: ignore[import-untyped,unused-ignore]

    t0 = time.perf_counter()
    net = net_parameter_class()()
    with open(caffemodel, "rb") as f:
        net.ParseFromString(f.read())
    parse_s = time.perf_counter() - t0
    types: dict[str, int] = {}
    floats = tiny = 0
    problems: list[str] = []
    for layer in net.layer:
        types[layer.type] = types.get(layer.type, 0) + 1
        floats += sum(len(b.data) for b in layer.blobs)
        for b in layer.blobs:
            if len(b.data) != _prod(b.shape.dim):
                problems.append(f"{layer.name}: {len(b.data)} values for shape {list(b.shape.dim)}")
        if layer.type == "BatchNorm":
            c = layer.blobs[0].shape.dim[0]
            if [list(b.shape.dim) for b in layer.blobs] != [[c], [c], [1]]:
                problems.append(f"{layer.name}: BatchNorm blobs are not [C] [C] [1]")
            elif layer.blobs[2].data[0] != 1.0 or not layer.batch_norm_param.use_global_stats:
                problems.append(f"{layer.name}: scale factor != 1 or use_global_stats unset")
            elif min(layer.blobs[1].data) <= 0:
                problems.append(f"{layer.name}: a variance is not positive")
            tiny += sum(v < 1e-4 for v in layer.blobs[1].data)
    names = {layer.name for layer in net.layer}
    text = Path(prototxt).read_text()
    proto_names = re.findall(r'^\s*name:\s*"([^"]+)"', text, re.MULTILINE)[1:]  # [0] is the net name
    missing = [n for n in proto_names if n not in names]
    print(f"verify: {caffemodel}: parsed with protobuf "
          f"({api_implementation.Type()}) in {parse_s:.2f} s")
    print(f"  {len(net.layer)} layers {dict(sorted(types.items()))}")
    print(f"  {floats} floats, {tiny} BN variances below 1e-4, "
          f"{len(proto_names)} prototxt layers, {len(missing)} missing from the caffemodel")
    if floats == YOLOV3_FLOATS:
        print("  float count matches yolov3.weights (62,001,757) + one BN scale factor per BN")
    for problem in problems[:10]:
        print("  problem:", problem)
    ok = (types.get("Convolution") == 75 and types.get("BatchNorm") == 72
          and types.get("Scale") == 72 and not missing and not problems)
    print("verify:", "OK" if ok else "FAILED")
    return ok


def _prod(dims: object) -> int:
    n = 1
    for d in dims:  # type: ignore[attr-defined]
        n *= int(d)
    return n


def main(argv: list[str]) -> int:
    """``bench.py verify PROTOTXT CAFFEMODEL``: exit 1 when the check fails."""
    p = argparse.ArgumentParser(prog="bench.py verify")
    p.add_argument("prototxt")
    p.add_argument("caffemodel")
    args = p.parse_args(argv)
    return 0 if check(args.prototxt, args.caffemodel) else 1
