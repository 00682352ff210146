"""OpenCV dnn as a runtime for the tests (needs opencv-python-headless<5).

OpenCV 5 removed the Caffe and Darknet importers, hence the pin.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np


class CaffeUpsample:
    """The converters' custom Caffe ``Upsample`` layer: nearest neighbour,
    integer ``upsample_param { scale }`` (Darknet's [upsample] stride).
    OpenCV knows no such Caffe type; it hands us the layer's parameters."""

    def __init__(self, params, blobs):
        self.scale = int(params.get("scale", 2))

    def getMemoryShapes(self, inputs):
        n, c, h, w = inputs[0]
        return [[n, c, h * self.scale, w * self.scale]]

    def forward(self, inputs):
        x = inputs[0]
        return [np.ascontiguousarray(x.repeat(self.scale, axis=2).repeat(self.scale, axis=3))]


@contextlib.contextmanager
def caffe_upsample_registered() -> Iterator[None]:
    cv2.dnn_registerLayer("Upsample", CaffeUpsample)
    try:
        yield
    finally:
        cv2.dnn_unregisterLayer("Upsample")


def _run(net, x: np.ndarray, outputs: Sequence[str]) -> list[np.ndarray]:
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    names = set(net.getLayerNames())
    missing = [o for o in outputs if o not in names]
    if missing:
        raise KeyError(f"no layers {missing} in the network")
    net.setInput(x)
    return [np.array(o, dtype=np.float32, copy=True) for o in net.forward(list(outputs))]


def run_caffe(prototxt: Path, caffemodel: Path, x: np.ndarray,
              outputs: Sequence[str]) -> list[np.ndarray]:
    """One forward pass with OpenCV's Caffe importer (BatchNorm computes
    (x - b0/s) / sqrt(b1/s + eps), as BVLC Caffe does)."""
    with caffe_upsample_registered():
        net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
        return _run(net, x, outputs)


def run_darknet_importer(cfg: Path, weights: Path, x: np.ndarray,
                         layers: Sequence[int]) -> list[np.ndarray]:
    """One forward pass with OpenCV's Darknet importer (its batch norm uses
    sqrt(var + 1e-6), modules/dnn/src/darknet/darknet_io.cpp). `layers` are
    0-based Darknet indices; OpenCV names a convolution ``conv_<i>``."""
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    return _run(net, x, [f"conv_{i}" for i in layers])


def conv_depths(cfg: Path, weights: Path) -> list[int]:
    """Products summed per output value, (c_in / groups) * k * k, of every
    convolution, read from the weight shapes OpenCV's Darknet importer builds."""
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    layers = (net.getLayer(name) for name in net.getLayerNames())
    return [int(np.prod(layer.blobs[0].shape[1:])) for layer in layers
            if layer.type == "Convolution"]
