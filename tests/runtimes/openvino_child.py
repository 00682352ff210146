"""Child of openvino_runtime.py, run by the ``openvino`` venv's python (see venvs.py).

Converts a Caffe pair with OpenVINO 2023.3's Model Optimizer (``openvino.tools.mo``, the last
release line that still reads Caffe) and runs it on the CPU plugin in float32:
- ``compress_to_fp16=False``: MO would otherwise store the weights as float16;
- ``INFERENCE_PRECISION_HINT: f32``: on a CPU with AVX512-BF16 or AMX the CPU plugin otherwise
  computes in bfloat16 (measured here: 16.125 instead of 16.165 at the nano model's first head).
MO folds BatchNorm + Scale into the preceding convolution at conversion, in float32.
openvino-telemetry is deliberately not installed: MO then uses its telemetry stub and sends
nothing.
"""
from __future__ import annotations

import contextlib
import sys

import child_io


def main() -> None:
    req = child_io.read_request()
    import openvino.runtime as ov
    from openvino.tools.mo import convert_model

    with contextlib.redirect_stdout(sys.stderr):
        model = convert_model(input_model=req.caffemodel, input_proto=req.prototxt,
                              output=list(req.outputs), compress_to_fp16=False, silent=True)
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    results = compiled([req.input])
    by_name = {}
    for port in compiled.outputs:
        for name in port.get_names():
            by_name[name] = results[port]
    missing = [o for o in req.outputs if o not in by_name]
    if missing:
        raise SystemExit(f"OpenVINO model has no outputs {missing}; it has {sorted(by_name)}")
    child_io.write_result(req, [by_name[o] for o in req.outputs],
                          {"runtime": f"openvino {ov.get_version()}",
                           "precision": str(compiled.get_property("INFERENCE_PRECISION_HINT"))})


if __name__ == "__main__":
    main()
