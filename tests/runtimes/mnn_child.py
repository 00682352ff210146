"""Child of mnn_runtime.py, run by the test venv's own python (``mnn`` is a test extra).

A child process because the converter is C++ that may abort the process on a bad model, and
because of two traps measured here with mnn 3.6.1:
- The ``mnnconvert`` console script, after converting, imports MNN.tools.utils.log, which runs
  ``pip install -U aliyun-log-python-sdk`` with whatever ``pip`` is first on PATH and then sends
  usage logs to Alibaba. We call the converter itself, ``_tools.mnnconvert(argv)``, which is what
  that script does before logging.
- The Module API (``MNN.nn.load_module_from_file``) gives wrong results for the nano model
  (1.7e4 off at ``layer2-bn``, after the first depthwise convolution); the Session API below
  matches OpenCV to 3e-5 at the heads.
mnnconvert folds BatchNorm + Scale into the preceding convolution in float32 for the nano
model's 39 ordinary convolutions; after its 18 depthwise ones they stay MNN Scale ops.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import child_io
import numpy as np


def convert(prototxt: str, caffemodel: str, dest: Path) -> None:
    import _tools

    argv = ["mnnconvert", "-f", "CAFFE", "--modelFile", caffemodel, "--prototxt", prototxt,
            "--MNNModel", str(dest), "--bizCode", "bnfix-tests"]
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)   # the converter prints progress on C stdout
    try:
        _tools.mnnconvert(argv)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    if not dest.is_file() or dest.stat().st_size == 0:
        raise SystemExit(f"mnnconvert wrote no {dest}")


def main() -> None:
    req = child_io.read_request()
    import MNN

    model = Path(req.workdir) / "model.mnn"
    convert(req.prototxt, req.caffemodel, model)
    x = req.input
    with contextlib.redirect_stdout(sys.stderr):
        interp = MNN.Interpreter(str(model))
        sess = interp.createSession({"precision": "high", "saveTensors": tuple(req.outputs)})
        host_in = MNN.Tensor(x.shape, MNN.Halide_Type_Float, x, MNN.Tensor_DimensionType_Caffe)
        interp.getSessionInput(sess).copyFrom(host_in)
        interp.runSession(sess)
        arrays = []
        for name in req.outputs:
            t = interp.getSessionOutput(sess, name)
            if t is None:
                raise SystemExit(f"MNN has no tensor {name!r}")
            shape = tuple(t.getShape())
            host = MNN.Tensor(shape, MNN.Halide_Type_Float, np.zeros(shape, np.float32),
                              MNN.Tensor_DimensionType_Caffe)
            t.copyToHostTensor(host)
            arrays.append(np.array(host.getData(), dtype=np.float32).reshape(shape))
    child_io.write_result(req, arrays, {"runtime": f"mnn {MNN.version()}"})


if __name__ == "__main__":
    main()
