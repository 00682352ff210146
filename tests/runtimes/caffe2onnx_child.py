"""Child of caffe2onnx_runtime.py, run by the ``caffe2onnx`` venv's python (see venvs.py).

Converts a Caffe pair with caffe2onnx 2.0.1 (its Python API, as its ``convert.py`` does) and runs
the ONNX model in onnxruntime's CPU provider. caffe2onnx still calls ``np.int`` and ``np.float``
(removed in numpy 1.24); they are restored as the builtins they aliased before it is imported.
Its generated ``caffe_upsample_pb2`` predates protobuf 4, hence the pure-Python protobuf backend
(``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python``, set by the parent). Tensors that are not
graph outputs are added as outputs from caffe2onnx's own value_info.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import child_io
import numpy as np

for _alias, _builtin in (("int", int), ("float", float)):
    if _alias not in np.__dict__:
        setattr(np, _alias, _builtin)


def main() -> None:
    req = child_io.read_request()
    import onnx
    import onnxruntime as ort
    from caffe2onnx.src.caffe2onnx import Caffe2Onnx
    from caffe2onnx.src.load_save_model import loadcaffemodel

    onnx_path = Path(req.workdir) / "model.onnx"
    with contextlib.redirect_stdout(sys.stderr):   # it prints a line per layer
        graph, params = loadcaffemodel(req.prototxt, req.caffemodel)
        model = Caffe2Onnx(graph, params, str(onnx_path)).createOnnxModel()
    have = {o.name for o in model.graph.output}
    hidden = {v.name: v for v in model.graph.value_info}
    for name in req.outputs:
        if name in have:
            continue
        if name not in hidden:
            raise SystemExit(f"caffe2onnx made no tensor {name!r}")
        model.graph.output.append(hidden[name])
    onnx.save_model(model, str(onnx_path))

    opts = ort.SessionOptions()
    opts.log_severity_level = 3   # one warning per initializer listed as a graph input
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    arrays = sess.run(list(req.outputs), {inp.name: req.input})
    from importlib.metadata import version
    child_io.write_result(req, arrays, {"runtime": f"caffe2onnx {version('caffe2onnx')}, "
                                                   f"onnx {onnx.__version__}, "
                                                   f"onnxruntime {ort.__version__}"})


if __name__ == "__main__":
    main()
