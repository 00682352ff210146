"""A synthetic ``Input -> BatchNorm -> Scale`` pair whose channels span dead to wide variances.

Six channels with Darknet variances ``[0, 1e-9, 1e-6, 1e-3, 1, 4]``: the first three are where
bnfix's eps strategy stores a negative variance and float32 cancellation costs precision (1.1e-2
relative on var = 0 in OpenCV, MNN and ncnn, issue 9), the last three are ordinary. Mean, gamma
and beta are random, ``s`` = 1 unless asked; the prototxt sets no eps, so Caffe uses 1e-5, as a
converted model does. The reference is numpy float64 on the Darknet statistics:

    y = gamma * (x - mean) / (sqrt(var + A) + B) + beta       (pjreddie CPU: A = 0, B = 1e-6)

Written with tests/caffe_proto.py (the real protobuf runtime), not with bnfix.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import caffe_proto as cp
import numpy as np
import numpy.typing as npt

VARIANCES = (0.0, 1e-9, 1e-6, 1e-3, 1.0, 4.0)
INPUT, BN, SCALE = "data", "bn", "scale"
OUTPUT = "out"   # the Scale's top: what every runtime is asked for


class DarknetFormula(NamedTuple):
    """Darknet's denominator ``sqrt(var + inside) + outside``."""
    inside: float
    outside: float


PJREDDIE_CPU = DarknetFormula(0.0, 1e-6)


class SyntheticNet(NamedTuple):
    prototxt: Path
    caffemodel: Path
    mean: np.ndarray    # Darknet statistics, float64 (what blobs 0 and 1 hold, times s)
    var: np.ndarray
    s: float
    gamma: np.ndarray
    beta: np.ndarray
    input: np.ndarray   # float32, 1 x 6 x H x W

    def reference(self, formula: DarknetFormula = PJREDDIE_CPU) -> np.ndarray:
        """Darknet's output for `input`, in float64."""
        return darknet_output(self.input, self.mean, self.var, self.gamma, self.beta, formula)


def darknet_output(x: np.ndarray, mean: np.ndarray, var: np.ndarray, gamma: np.ndarray,
                   beta: np.ndarray, formula: DarknetFormula = PJREDDIE_CPU) -> np.ndarray:
    def per_channel(v: np.ndarray) -> np.ndarray:
        return np.asarray(v, np.float64).reshape(1, -1, 1, 1)
    d = np.sqrt(per_channel(var) + formula.inside) + formula.outside
    return per_channel(gamma) * (x.astype(np.float64) - per_channel(mean)) / d + per_channel(beta)


def prototxt_text(height: int, width: int, eps: float | None = None, scale_gap: bool = False) -> str:
    """With `scale_gap`, a ReLU on another blob sits between the BatchNorm and its Scale
    (caffe2onnx pairs a BatchNorm only with a Scale that is the next layer)."""
    eps_line = f"\n    eps: {eps!r}" if eps is not None else ""
    gap = f'''layer {{
  name: "gap"
  type: "ReLU"
  bottom: "{INPUT}"
  top: "gap"
}}
''' if scale_gap else ""
    return f'''name: "synthetic-bn"
layer {{
  name: "{INPUT}"
  type: "Input"
  top: "{INPUT}"
  input_param {{
    shape {{
      dim: 1
      dim: {len(VARIANCES)}
      dim: {height}
      dim: {width}
    }}
  }}
}}
layer {{
  name: "{BN}"
  type: "BatchNorm"
  bottom: "{INPUT}"
  top: "{BN}"
  batch_norm_param {{
    use_global_stats: true{eps_line}
  }}
}}
{gap}layer {{
  name: "{SCALE}"
  type: "Scale"
  bottom: "{BN}"
  top: "{OUTPUT}"
  scale_param {{
    bias_term: true
  }}
}}
'''


def write_pair(dest: Path, *, height: int = 16, width: int = 16, seed: int = 0, s: float = 1.0,
               eps: float | None = None, scale_gap: bool = False,
               name: str = "synthetic-bn") -> SyntheticNet:
    """Write ``dest/<name>.prototxt`` and ``.caffemodel``.

    The Darknet statistics are float32 values (as a .weights holds them); the BatchNorm blobs
    hold ``s * mean``, ``s * var`` and ``s`` in float32, so Caffe's effective statistics
    ``blob / s`` are exactly `mean` and `var` when s is a power of two."""
    rng = np.random.default_rng(seed)
    c = len(VARIANCES)

    def f32(v: npt.ArrayLike) -> np.ndarray:   # Darknet's .weights hold float32
        return np.asarray(v, np.float32).astype(np.float64)

    var = f32(VARIANCES)
    mean = f32(rng.normal(0.0, 1.0, c))
    gamma = f32(rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c))
    beta = f32(rng.normal(0.0, 1.0, c))
    # Inputs around each channel's mean, spread like a real activation of that channel
    # (at least 1, so the dead channels see real offsets, as they do in a network).
    spread = np.maximum(np.sqrt(var), 1.0).reshape(1, c, 1, 1)
    x = (mean.reshape(1, c, 1, 1) + spread * rng.uniform(-1, 1, (1, c, height, width)))
    x = x.astype(np.float32)

    input_layer = cp.LayerParameter(name=INPUT, type="Input", top=[INPUT])
    bn = cp.LayerParameter(name=BN, type="BatchNorm", bottom=[INPUT], top=[BN])
    for values in (mean * s, var * s, [s]):
        bn.blobs.append(cp.blob(values))
    scale = cp.LayerParameter(name=SCALE, type="Scale", bottom=[BN], top=[OUTPUT])
    for values in (gamma, beta):
        scale.blobs.append(cp.blob(values))

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    net = SyntheticNet(dest / f"{name}.prototxt", dest / f"{name}.caffemodel",
                       mean, var, s, gamma, beta, x)
    net.prototxt.write_text(prototxt_text(height, width, eps, scale_gap))
    net.caffemodel.write_bytes(cp.model_bytes(input_layer, bn, scale))
    return net


def per_channel_rel_error(y: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """max |y - ref| / max |ref| over each channel of N x C x H x W arrays, in float64."""
    if y.shape != reference.shape:
        raise ValueError(f"shapes differ: {y.shape} vs {reference.shape}")
    axes = (0, 2, 3)
    err = np.abs(y.astype(np.float64) - reference).max(axis=axes)
    return err / np.abs(reference).max(axis=axes)
