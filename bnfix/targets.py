"""``--target``: the runtime that will run the model chooses the strategy, eps and scale factor.

Each row rests on what that runtime's importer does (``runtimes.py``, README "Targets"):

* ``caffe`` (the default) keeps bnfix 1.0's fix, the eps strategy with eps 1e-6: BVLC Caffe
  and the forks that read eps compute ``sqrt(var/s + eps)`` with no clamp.
* ``opencv``, ``ncnn``, ``mnn``, ``openvino`` fold into the Scale layer's gamma and leave eps
  alone: they read eps from the prototxt like Caffe, but compute (and fold) in float32, where a
  negative refitted variance loses its precision (ncnn even stores ``var/s + eps`` as float32).
* ``tensorrt`` folds as well; its parser rejects a scale factor of 0, which bnfix fixes to 1.
* ``nvcaffe`` folds and raises eps to at least 1e-4: NVCaffe 0.16.1 clamps eps to 1e-4 and
  later versions to 1e-5, so a smaller eps would be silently changed under the fold.
* ``caffe2onnx`` folds and stores a power-of-two scale factor of 1024 (statistics scaled
  exactly): caffe2onnx divides the variance by ``s + 1e-5``, which at s = 1 costs 5e-6.
* ``portable`` is one output for all of them (except NVCaffe 0.16.1): the fold, eps exactly
  1e-5 (the value BN-folding scripts hard-code and NVCaffe's clamp), and s = 1024.
"""

from __future__ import annotations

from typing import NamedTuple

from .errors import UsageError
from .formulas import Formula
from .result import Options, StrategyName

S_FLOOR = 512.0  # below this caffe2onnx's "+ 1e-5" shows in float32; bnfix then stores s = 1024


class Target(NamedTuple):
    name: str
    runtime: str
    strategy: StrategyName
    target_eps: float | None = None  # None: the strategy's choice (eps: 1e-6; scale: keep)
    eps_floor: float = 0.0
    min_scale_factor: float = 0.0
    why: str = ""
    runtimes: tuple[str, ...] = ()  # runtimes.RUNTIMES rows the output must be exact in


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("caffe", "BVLC Caffe and the forks that read eps", StrategyName.EPS,
           why="Caffe reads eps from the prototxt and never clamps it", runtimes=("caffe",)),
    Target("opencv", "OpenCV dnn readNetFromCaffe", StrategyName.SCALE,
           why="OpenCV folds BatchNorm into float32 weights, where a negative variance loses precision",
           runtimes=("opencv",)),
    Target("ncnn", "ncnn caffe2ncnn (+ ncnnoptimize)", StrategyName.SCALE,
           why="caffe2ncnn stores var/s + eps in float32; a radicand <= 0 gives NaN or inf",
           runtimes=("ncnn",)),
    Target("mnn", "MNN mnnconvert -f CAFFE", StrategyName.SCALE,
           why="MNN folds BatchNorm and Scale into the convolution in float32", runtimes=("mnn",)),
    Target("openvino", "OpenVINO Model Optimizer (2023.3 and older)", StrategyName.SCALE,
           why="the Model Optimizer folds BatchNorm into the convolution in float32", runtimes=("openvino",)),
    Target("tensorrt", "TensorRT Caffe parser (8.6 and older)", StrategyName.SCALE,
           why="the parser rejects s = 0 (bnfix sets it to 1) and computes in float32", runtimes=("tensorrt",)),
    Target("nvcaffe", "NVCaffe", StrategyName.SCALE, eps_floor=1e-4,
           why="NVCaffe raises eps to 1e-4 (0.16.1) or 1e-5 (0.16.2 on), undoing an eps fit",
           runtimes=("nvcaffe", "nvcaffe-0.16.1")),
    Target("caffe2onnx", "caffe2onnx / caffe-onnx (to ONNX, onnxruntime, TensorRT)", StrategyName.SCALE,
           min_scale_factor=S_FLOOR,
           why="caffe2onnx divides the variance by s + 1e-5; with s = 1024 that is exact in float32",
           runtimes=("caffe2onnx",)),
    Target("portable", "all of the above at once (NVCaffe 0.16.1 excepted)", StrategyName.SCALE,
           target_eps=1e-5, min_scale_factor=S_FLOOR,
           why="the fold survives every importer; eps 1e-5 is what folding scripts hard-code and "
               "NVCaffe clamps to; s = 1024 survives caffe2onnx",
           runtimes=("caffe", "opencv", "mnn", "openvino", "ncnn", "tensorrt", "nvcaffe", "caffe2onnx", "merge_bn")),
)}
DEFAULT_TARGET = "caffe"


def resolve(target: str | None, strategy: str | None, target_eps: float | None, source: Formula,
            force: bool = False) -> Options:
    """The options for a target, with an explicit ``--strategy``/``--target-eps`` overriding it;
    ``choices`` says what was chosen and why, for the summary."""
    name = (target or DEFAULT_TARGET).lower()
    t = TARGETS.get(name)
    if t is None:
        raise UsageError(f"unknown target {target!r}: use one of {', '.join(TARGETS)}")
    choices = [f"target {t.name}{'' if target else ' (the default)'}: {t.runtime}"]
    chosen = t.strategy
    if strategy is not None:
        try:
            chosen = StrategyName(strategy.lower())
        except ValueError:
            raise UsageError(f"unknown strategy {strategy!r}: use one of "
                             f"{', '.join(s.value for s in StrategyName)}") from None
        if chosen is not t.strategy:
            choices.append(f"strategy {chosen.value} (--strategy; the target would use {t.strategy.value})")
    if chosen is t.strategy:
        choices.append(f"strategy {chosen.value}: {t.why}")
    eps = t.target_eps
    if target_eps is not None:
        eps = target_eps
        choices.append(f"eps {target_eps!r} (--target-eps)")
    elif eps is not None:
        choices.append(f"eps {eps!r}")
    if t.eps_floor and (target_eps is None or target_eps < t.eps_floor):
        choices.append(f"eps raised to at least {t.eps_floor!r}")
    if t.min_scale_factor:
        choices.append(f"scale factors below {t.min_scale_factor:g} become 1024 (statistics scaled exactly)")
    return Options(source, chosen, eps, t.eps_floor if target_eps is None else 0.0, t.min_scale_factor,
                   force, t.name, tuple(choices)).checked()
