"""The naive peer: what a script without bnfix would do, to show what bnfix's design saves.

Parse the whole ``NetParameter`` with protobuf, set every BatchNorm variance to
``(sqrt(var)+1e-6)^2 - 1e-6`` and ``eps: 1e-6``, serialize, write.  It decodes every float of
the model (a 248 MB YOLOv3 becomes ~780 MB of Python objects), which is the cost bnfix avoids by
walking the wire format and copying the untouched bytes file to file.  It is timed as its own
process, like every contender, and does not fsync (compare it with ``bnfix --no-sync``).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from schema import net_parameter_class


def fix(input_path: str, output_path: str) -> None:
    """Parse, patch every BatchNorm layer, serialize, write."""
    import numpy as np

    net = net_parameter_class()()
    with open(input_path, "rb") as f:
        net.ParseFromString(f.read())
    for layer in net.layer:
        if layer.type != "BatchNorm" or len(layer.blobs) < 3:
            continue
        s = float(layer.blobs[2].data[0])
        if s == 0:
            continue
        var = np.asarray(layer.blobs[1].data, np.float64) / s
        fixed = ((np.sqrt(np.maximum(var, 0.0)) + 1e-6) ** 2 - 1e-6) * s
        del layer.blobs[1].data[:]
        layer.blobs[1].data.extend(fixed.astype(np.float32).tolist())
        layer.batch_norm_param.eps = 1e-6
    data = net.SerializeToString()
    del net
    with open(output_path, "wb") as f:
        f.write(data)


def main(argv: list[str]) -> int:
    """``bench.py naive IN.caffemodel OUT.caffemodel [IN.prototxt OUT.prototxt]``."""
    p = argparse.ArgumentParser(prog="bench.py naive")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("prototxt_in", nargs="?")
    p.add_argument("prototxt_out", nargs="?")
    args = p.parse_args(argv)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fix(args.input, args.output)
    if args.prototxt_in and args.prototxt_out:
        Path(args.prototxt_out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.prototxt_in, args.prototxt_out)
    return 0
