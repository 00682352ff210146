"""caffe2onnx 2.0.1 -> onnxruntime as a runtime for the tests: the usual road from Caffe to ONNX
(and on to TensorRT, whose own Caffe parser is gone from current releases).

What it computes, read from caffe2onnx/src/caffe2onnx.py (``AddInputsTVIFromParams``) and
measured by tests/test_runtime_targets.py:
- BatchNorm mean = blob0 / s, but variance = blob1 / (s + 1e-5): off by a factor 1 + 1e-5 at
  s = 1; s = 0 raises ZeroDivisionError (Python float division of the mean).
- eps comes from the prototxt's ``batch_norm_param`` (default 1e-5), as in Caffe.
- A BatchNorm is paired with a Scale only if the Scale is the *next layer* in the prototxt;
  otherwise it gets gamma = 1 and beta = 0.001 (sic) of its own, and a later Scale is applied
  separately.
- ``Upsample { scale }`` becomes an ONNX Resize, nearest, half_pixel, round_prefer_floor: exactly
  nearest x scale, so no copy from upsample.py is needed here.

Its pinned onnx==1.6.0 does not build on Python 3.11, so it is installed ``--no-deps`` beside a
current onnx and onnxruntime, with numpy 1.26 and protobuf's pure-Python backend, in a venv of
its own (venvs.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import venvs
from .upsample import final_writer, layer_blocks

SPEC = venvs.VenvSpec(
    name="caffe2onnx-2.0.1",
    requirements=("numpy==1.26.4", "protobuf==7.36.2", "onnx==1.23.2", "onnxruntime==1.32.0"),
    no_deps=("caffe2onnx==2.0.1",),
    env=(("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python"),),
)
CHILD = Path(__file__).with_name("caffe2onnx_child.py")


def onnx_name(text: str, blob: str) -> str:
    """caffe2onnx's name for the final value of `blob`.

    It names a node's output after the layer when the layer works in place, else after its
    top; and it drops a Scale that directly follows a BatchNorm into that BatchNorm's node, so
    the pair's result carries the BatchNorm's name."""
    writer = final_writer(text, blob)
    blocks = layer_blocks(text)
    i = next(k for k, b in enumerate(blocks) if b.start == writer.start)
    if writer.type == "Scale" and i > 0 and blocks[i - 1].type in ("BatchNorm", "BN"):
        writer = blocks[i - 1]
        blob = writer.tops[0]
    return writer.name if blob in writer.bottoms else blob


def missing_reason() -> str | None:
    return venvs.missing_reason(SPEC)


def run_caffe(prototxt: Path, caffemodel: Path, x: np.ndarray, outputs: Sequence[str],
              workdir: Path) -> list[np.ndarray]:
    """Convert with caffe2onnx, run in onnxruntime (CPU, default graph optimisations); return
    the final value of each blob in `outputs`."""
    text = Path(prototxt).read_text()
    names = [onnx_name(text, o) for o in outputs]
    return venvs.run_request(SPEC, CHILD, prototxt, caffemodel, x, names, workdir)
