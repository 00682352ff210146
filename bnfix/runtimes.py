"""What each deployment runtime computes from a Caffe BatchNorm (+ Scale), as data.

Every runtime reads the blobs from the caffemodel and eps from the prototxt, and most then
compute what BVLC Caffe computes, ``gamma * (x - b0*f) / sqrt(b1*f + eps) + beta`` with
``f = 1/s`` in float32.  The differences that matter to bnfix are few, and each row below says
which, with the source line it was read from (README "Targets"):

* the eps it really uses (clamped, or hard-coded by a BN-folding script);
* the variance divisor (caffe2onnx divides the variance by ``s + 1e-5``);
* what it does with ``s == 0`` and with a radicand ``b1*f + eps <= 0``;
* whether it needs the Scale to be the next prototxt layer.

``deviations`` evaluates a written layer under every row, so the summary can say where an
output is *not* right, instead of assuming it.  The ``ncnn`` row has no field of its own: a
radicand ``<= 0``, where ncnn gives NaN or inf, is NaN in Caffe too, and bnfix's fit never
stores one (the error column, computed as Caffe computes, would be non-finite).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from . import semantics as sem
from .formulas import f32


class Runtime(NamedTuple):
    name: str
    label: str
    eps_clamp: float = 0.0  # eps below this is raised to it
    eps_fixed: float | None = None  # eps used whatever the prototxt says
    var_offset: float = 0.0  # the variance is divided by s + var_offset
    rejects_zero_s: str = ""  # the failure when s == 0 ("" = Caffe's zero factor)
    needs_adjacent_scale: str = ""  # the failure when the Scale is not the next layer
    source: str = ""


RUNTIMES: tuple[Runtime, ...] = (
    Runtime("caffe", "BVLC Caffe", source="BVLC/caffe 9b89154 src/caffe/layers/batch_norm_layer.cpp:21,100-105"),
    Runtime("opencv", "OpenCV dnn",
            source="opencv 4.14.0 modules/dnn/src/layers/batch_norm_layer.cpp:56,66-72,104-106"),
    Runtime("mnn", "MNN", source="alibaba/MNN 3.6.1 tools/converter/source/caffe/BatchNormalScale.cpp:25-58"),
    Runtime("openvino", "OpenVINO MO", source="openvino-dev 2023.3.0 mo/front/caffe/batchnorm_ext.py:18,26-34"),
    Runtime("ncnn", "ncnn", source="Tencent/ncnn tools/caffe/caffe2ncnn.cpp:286-314, src/layer/batchnorm.cpp:47-54"),
    Runtime("tensorrt", "TensorRT Caffe parser",
            rejects_zero_s="rejected: \"Batch normalization moving average is zero\"",
            source="NVIDIA/TensorRT v8.6.1 parsers/caffe/caffeParser/opParsers/parseBatchNorm.cpp:88,153-158"),
    Runtime("nvcaffe", "NVCaffe >= 0.16.2", eps_clamp=1e-5,
            source="NVIDIA/caffe v0.17.4 src/caffe/layers/batch_norm_layer.cpp:24"),
    Runtime("nvcaffe-0.16.1", "NVCaffe 0.16.1", eps_clamp=1e-4,
            source="NVIDIA/caffe v0.16.1 src/caffe/layers/batch_norm_layer.cpp:23"),
    Runtime("caffe2onnx", "caffe2onnx", var_offset=1e-5,
            rejects_zero_s="crashes: ZeroDivisionError",
            needs_adjacent_scale="its Scale is not the next layer: caffe2onnx adds beta 0.001 instead",
            source="caffe2onnx 2.0.1 src/caffe2onnx.py:138-147,325-342"),
    Runtime("merge_bn", "merge_bn.py scripts", eps_fixed=1e-5,
            source="chuanqi305/MobileNet-SSD merge_bn.py:101-105; eric612/MobileNet-YOLO merge_bn.py:50-54"),
)
BY_NAME = {r.name: r for r in RUNTIMES}
TOLERANCE = 1e-6  # relative error above what the layer reaches in Caffe itself: a deviation


class Written(NamedTuple):
    """A layer as a runtime sees it: stored blobs, prototxt eps, gamma and reference."""

    var: Sequence[float]
    s: float
    eps: float
    gamma: Sequence[float] | None
    gamma_ref: Sequence[float] | None
    target: Sequence[float]  # Darknet's D per channel
    scale_adjacent: bool | None  # None: no Scale layer at all


def denominator(rt: Runtime, w: Written) -> list[float]:
    """The float32 denominator ``rt`` computes per channel (NaN where it cannot)."""
    eps = rt.eps_fixed if rt.eps_fixed is not None else max(f32(w.eps), rt.eps_clamp)
    if not rt.var_offset:
        return list(sem.caffe_denominator(w.var, w.s, eps))
    divisor = w.s + rt.var_offset  # in float64, as caffe2onnx's Python does, then stored float32
    var = sem.to_f32([v / divisor for v in w.var])
    eps32 = f32(eps)
    return list(sem.to_f32(list(sem._sqrts(sem.to_f32([v + eps32 for v in var])))))


def deviation(rt: Runtime, w: Written, own: Sequence[float]) -> tuple[float | None, str]:
    """How ``rt`` fares on a layer: (worst relative error, "") where it deviates from ``own``
    (the errors in Caffe itself) by more than TOLERANCE, (None, reason) where it fails
    outright, (0.0, "") where it computes what Caffe does."""
    if w.s == 0 and rt.rejects_zero_s:
        return None, rt.rejects_zero_s
    if w.scale_adjacent is False and rt.needs_adjacent_scale:
        return None, rt.needs_adjacent_scale
    if not (rt.eps_fixed is not None or rt.eps_clamp > f32(w.eps) or rt.var_offset):
        return 0.0, ""
    err = sem.effective_error(denominator(rt, w), w.gamma, w.gamma_ref, w.target)
    worst = 0.0
    for e, mine in zip(err, own):
        if e != e or math.isinf(e):
            return None, "non-finite output"
        if e > mine + TOLERANCE:
            worst = max(worst, e)
    return worst, ""
