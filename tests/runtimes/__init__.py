"""Helpers for tests/test_runtimes.py: run real inference runtimes on a model pair.

- ``darknet_cfg``: the YOLO head layers of a .cfg, a batch-1 copy of it, and
  the fixed input.
- ``opencv_runtime``: OpenCV dnn (Caffe and Darknet importers), with the Caffe
  ``Upsample`` layer registered as a Python custom layer; convolution depths.
- ``darknet_runtime``: compile ``darknet_forward.c`` against Debian's libdarknet
  (pjreddie, CPU) and dump the YOLO head inputs of one forward pass.

For tests/test_runtime_targets.py, deployment runtimes with one interface,
``missing_reason() -> str | None`` and ``run_caffe(prototxt, caffemodel, x, blobs, workdir)``
(x float32 NCHW; returns the final value of each blob):
- ``mnn_runtime``: pip ``mnn`` in the test venv, ``mnnconvert -f CAFFE`` + Session API.
- ``openvino_runtime``: OpenVINO 2023.3 Model Optimizer + CPU plugin (f32), own venv.
- ``caffe2onnx_runtime``: caffe2onnx 2.0.1 -> onnxruntime, own venv.
- ``venvs``: builds and reuses those venvs (``$BNFIX_RUNTIME_VENVS`` or ``.venv-runtimes/``);
  ``child_io``: the .npy/.json protocol with the ``*_child.py`` scripts they run.
- ``upsample``: a test-only copy of a pair with ``Upsample`` replaced by an exact depthwise
  Deconvolution (or ``Resample``), proven to change nothing else; a small prototxt scanner.
- ``synthetic``: the ``Input -> BatchNorm -> Scale`` dead-channel net and its float64
  Darknet reference.
"""
