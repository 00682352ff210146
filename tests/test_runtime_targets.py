"""Proof in real runtimes (issue 9, section 4): a patched pair must match Darknet in the runtime
that will run it, not only in Caffe's formula.

Runtimes (tests/runtimes/): OpenCV dnn (Caffe importer), MNN 3.6.1 (``mnnconvert -f CAFFE`` +
Session API), OpenVINO 2023.3 (Model Optimizer + CPU plugin in f32, own venv), caffe2onnx 2.0.1
-> onnxruntime (own venv). MNN and OpenVINO get a copy of the pair whose custom ``Upsample`` is
an exactly equivalent depthwise Deconvolution (runtimes/upsample.py; the copy proves that only
that layer changed). The venvs are built on first use (runtimes/venvs.py, ~10 s each).

Model and reference: the real MobileNetV2-YOLOv3-Nano pair and real Darknet (pjreddie CPU),
fixed input seed 0, 1x3x320x320, compared at the two YOLO head inputs (``layer69-conv``,
``layer79-conv``) as max abs error, exactly as in tests/test_runtimes.py. Plus the synthetic
``Input -> BatchNorm -> Scale`` net with variances [0, 1e-9, 1e-6, 1e-3, 1, 4]
(runtimes/synthetic.py), compared per channel as relative error.

What runs:
- each runtime computes what we say it computes, on the stored bytes, to float32 noise;
- the unpatched pair is far off in every runtime, and the default patch reaches the goal in
  the runtimes that read eps from the prototxt, but not in caffe2onnx;
- every ``--target`` in each of its runtimes, and ``--strategy scale`` on the synthetic net in
  OpenCV.

Skips with a reason when a runtime cannot be installed, but never under CI=true.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # tests/ and tests/runtimes/ helpers, whatever pytest's import mode
    sys.path.insert(0, str(HERE))

import caffe_proto as cp
from runtimes import darknet_cfg, darknet_runtime, synthetic, upsample, venvs

from bnfix.cli import main as bnfix_main

DATA = HERE / "data" / "mobilenetv2-yolov3-nano-voc"
STEM = "MobileNetV2-YOLOv3-Nano-voc"
IN_CI = os.environ.get("CI", "").strip().lower() == "true"

# Goals, as issue 9 states them.
GOAL_MAX_ABS = 1e-4        # every target in its own runtime, max abs at the heads
GOAL_FACTOR = 10           # ... and at least this many times better than unpatched there
GOAL_SYNTHETIC_REL = 1e-6  # the synthetic net with --strategy scale, every channel, OpenCV
# A runtime "computes formula F" when its output matches F evaluated in float64 on the stored
# float32 values to this relative error per channel: a few float32 roundings (2**-24 each) of
# a BatchNorm + Scale (measured here: <= 1.6e-7). caffe2onnx's variance divisor s + 1e-5 shows
# as ~5e-6 (measured 3e-6 .. 5e-6 on the ordinary channels), which this tells apart.
FORMULA_REL = 1e-6

RUNTIMES = ("opencv", "mnn", "openvino", "caffe2onnx")
# Runtimes that compute BVLC Caffe's BatchNorm from the stored bytes: mean = b0/s,
# var = b1/s, eps from the prototxt. caffe2onnx divides b1 by s + 1e-5 instead.
EPS_READERS = ("opencv", "mnn", "openvino")
TARGETS: dict[str, tuple[str, ...]] = {
    "opencv": ("opencv",),
    "mnn": ("mnn",),
    "openvino": ("openvino",),
    "caffe2onnx": ("caffe2onnx",),
    "portable": RUNTIMES,   # one output that survives all of them at once
}

# Measured (x86-64, 2 cores; opencv-python-headless 4.14.0.94, mnn 3.6.1, openvino 2023.3.0,
# caffe2onnx 2.0.1 + onnxruntime 1.32.0; Debian darknet 0.0.0+git20180914.61c9d02e):
# max abs error at the heads vs real Darknet. Printed next to each new measurement.
RECORDED = {
    ("opencv", "unpatched"): 1.75e-2, ("opencv", "default"): 2.9e-5,
    ("mnn", "unpatched"): 1.75e-2, ("mnn", "default"): 2.9e-5,
    ("openvino", "unpatched"): 1.75e-2, ("openvino", "default"): 2.9e-5,
    ("caffe2onnx", "unpatched"): 1.7e-2, ("caffe2onnx", "default"): 2.6e-3,
}


def _skip_or_fail(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true, so this must not skip: {reason}", pytrace=False)
    pytest.skip(reason)


def max_abs_diff(candidate: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    assert [c.shape for c in candidate] == [r.shape for r in reference]
    return max(float(np.abs(c.astype(np.float64) - r).max()) for c, r in zip(candidate, reference))


# ---------------------------------------------------------------------------
# Runtimes: one interface, run_caffe(prototxt, caffemodel, x, blobs, workdir)


class _OpenCV:
    """opencv_runtime addresses layers; the others take blobs. A blob's final value is the
    output of the last layer that writes it."""

    @staticmethod
    def missing_reason() -> str | None:
        try:
            import cv2
        except ImportError:
            return "OpenCV missing: pip install 'opencv-python-headless<5'"
        if int(cv2.__version__.split(".")[0]) >= 5 or not hasattr(cv2.dnn, "readNetFromCaffe"):
            return f"OpenCV {cv2.__version__} has no Caffe importer; need <5"
        return None

    @staticmethod
    def run_caffe(prototxt: Path, caffemodel: Path, x: np.ndarray, blobs: Sequence[str],
                  workdir: Path) -> list[np.ndarray]:
        from runtimes import opencv_runtime
        text = Path(prototxt).read_text()
        layers = [upsample.final_writer(text, b).name for b in blobs]
        return opencv_runtime.run_caffe(prototxt, caffemodel, x, layers)


class Runtime(NamedTuple):
    name: str
    module: Any
    standard_upsample: bool   # give it a copy with a Deconvolution instead of Upsample

    def run(self, prototxt: Path, caffemodel: Path, x: np.ndarray, blobs: Sequence[str],
            workdir: Path) -> list[np.ndarray]:
        if self.standard_upsample and any(b.type == "Upsample"
                                          for b in upsample.layer_blocks(prototxt.read_text())):
            copy = upsample.replace_upsample(prototxt, caffemodel, workdir / "standard-upsample")
            prototxt, caffemodel = copy.prototxt, copy.caffemodel
        return self.module.run_caffe(prototxt, caffemodel, x, blobs, workdir)


def _load(name: str) -> Runtime | str:
    """The runtime, or why it cannot run here (building its venv if it needs one)."""
    if name == "opencv":
        reason = _OpenCV.missing_reason()
        return reason or Runtime(name, _OpenCV, False)
    if name == "mnn":
        from runtimes import mnn_runtime as module
    elif name == "openvino":
        from runtimes import openvino_runtime as module
    elif name == "caffe2onnx":
        from runtimes import caffe2onnx_runtime as module
    else:
        raise KeyError(name)
    reason = module.missing_reason()
    return reason or Runtime(name, module, name in ("mnn", "openvino"))


@pytest.fixture(scope="session")
def runtime_loader() -> Callable[[str], Runtime]:
    loaded: dict[str, Runtime | str] = {}

    def get(name: str) -> Runtime:
        if name not in loaded:
            loaded[name] = _load(name)
        rt = loaded[name]
        if isinstance(rt, str):
            _skip_or_fail(rt)
        assert isinstance(rt, Runtime)
        return rt

    return get


# ---------------------------------------------------------------------------
# The nano model, real Darknet, and the pairs


class Nano(NamedTuple):
    cfg: Path
    weights: Path
    input: np.ndarray
    heads: list[int]
    caffe_heads: list[str]


@pytest.fixture(scope="session")
def nano(tmp_path_factory: pytest.TempPathFactory) -> Nano:
    cfg = DATA / f"{STEM}.cfg"
    heads = darknet_cfg.head_layers(cfg)
    assert heads == [68, 78]
    batch1 = darknet_cfg.write_batch1_cfg(cfg, tmp_path_factory.mktemp("nano") / cfg.name)
    return Nano(batch1, DATA / f"{STEM}.weights", darknet_cfg.fixed_input(cfg, seed=0), heads,
                [f"layer{i + 1}-conv" for i in heads])


@pytest.fixture(scope="session")
def darknet_heads(nano: Nano, tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    reason = darknet_runtime.missing_reason()
    if reason:
        _skip_or_fail(reason)
    work = tmp_path_factory.mktemp("darknet")
    exe = darknet_runtime.build_harness(work)
    return darknet_runtime.forward(exe, nano.cfg, nano.weights, nano.input, nano.heads, work)


Pair = tuple[Path, Path]


@pytest.fixture(scope="session")
def bnfix_pair(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Pair, str, Sequence[str]], Pair]:
    """``bnfix_pair(source, label, args)``: the source pair run through the bnfix CLI with
    `args` (once per label), or the source itself for label "unpatched"."""
    made: dict[tuple[Pair, str], Pair] = {}

    def make(source: Pair, label: str, args: Sequence[str]) -> Pair:
        if label == "unpatched":
            return source
        key = (source, label)
        if key not in made:
            out = tmp_path_factory.mktemp(f"bnfix-{label}")
            code = bnfix_main([str(source[0]), str(source[1]), "-o", str(out), *args, "--quiet"])
            assert code == 0, f"bnfix {' '.join(args)} exited {code}"
            made[key] = (out / source[0].name, out / source[1].name)
        return made[key]

    return make


NANO_PAIR: Pair = (DATA / f"{STEM}.prototxt", DATA / f"{STEM}.caffemodel")


@pytest.fixture(scope="session")
def nano_heads(runtime_loader, nano: Nano, bnfix_pair, tmp_path_factory):
    """``nano_heads(runtime, label, args)``: the head tensors of a nano pair in a runtime, run
    once per (runtime, label)."""
    done: dict[tuple[str, str], list[np.ndarray]] = {}

    def run(runtime: str, label: str, args: Sequence[str] = ()) -> list[np.ndarray]:
        if (runtime, label) not in done:
            rt = runtime_loader(runtime)
            p, m = bnfix_pair(NANO_PAIR, label, args)
            work = tmp_path_factory.mktemp(f"{runtime}-{label}")
            done[runtime, label] = rt.run(p, m, nano.input, nano.caffe_heads, work)
        return done[runtime, label]

    return run


# ---------------------------------------------------------------------------
# What a runtime computes on the stored bytes (the synthetic net)


def stored_caffe_output(net: synthetic.SyntheticNet, prototxt: Path, caffemodel: Path,
                        var_divisor_extra: float = 0.0) -> np.ndarray:
    """BatchNorm + Scale as the runtime is said to compute them, on the float32 values actually
    stored: mean = b0/s and var = b1/(s + var_divisor_extra), each held as float32 (caffe2onnx
    divides in Python and stores float32 tensors; Caffe's own division is exact at s = 1), eps
    from the prototxt (a float32 field, default 1e-5); the rest in float64."""
    layers = {layer.name: layer for layer in cp.parse(caffemodel.read_bytes()).layer}
    b0, b1, s = (np.array(b.data, np.float64) for b in layers[synthetic.BN].blobs[:3])
    gamma, beta = (np.array(b.data, np.float64) for b in layers[synthetic.SCALE].blobs[:2])
    block = next(b for b in upsample.layer_blocks(prototxt.read_text()) if b.name == synthetic.BN)
    eps = float(np.float32(block.get("batch_norm_param.eps") or 1e-5))
    mean = (b0 / s[0]).astype(np.float32).astype(np.float64)
    var = (b1 / (s[0] + var_divisor_extra)).astype(np.float32).astype(np.float64)
    return synthetic.darknet_output(net.input, mean, var, gamma, beta,
                                    synthetic.DarknetFormula(eps, 0.0))


@pytest.fixture(scope="session")
def synthetic_net(tmp_path_factory: pytest.TempPathFactory) -> synthetic.SyntheticNet:
    return synthetic.write_pair(tmp_path_factory.mktemp("synthetic"))


# ---------------------------------------------------------------------------
# The harness, and the default patch


def test_standard_upsample_copy_is_exact_and_touches_only_upsample(tmp_path, runtime_loader):
    """The Deconvolution copy gives OpenCV bit-identical heads, and no other layer changed."""
    copy = upsample.replace_upsample(*NANO_PAIR, tmp_path)
    assert copy.layers == ("layer72-upsample",)
    src, dst = upsample.layer_blocks(NANO_PAIR[0].read_text()), upsample.layer_blocks(
        copy.prototxt.read_text())
    src_text, dst_text = NANO_PAIR[0].read_text(), copy.prototxt.read_text()
    bn_scale = [(b.name, src_text[b.start:b.end]) for b in src if b.type in ("BatchNorm", "Scale")]
    assert len(bn_scale) == 114
    assert bn_scale == [(b.name, dst_text[b.start:b.end]) for b in dst
                        if b.type in ("BatchNorm", "Scale")]
    new = next(b for b in dst if b.name == "layer72-upsample")
    assert (new.type, new.get("convolution_param.group"), new.get("convolution_param.stride"),
            new.get("convolution_param.bias_term")) == ("Deconvolution", "288", "2", "false")

    def entries_by_name(path: Path) -> dict[str, bytes]:
        return {upsample.entry_layer(e).name: e for f, e in upsample.entries(path.read_bytes())
                if f == 100}
    before, after = entries_by_name(NANO_PAIR[1]), entries_by_name(copy.caffemodel)
    assert before.keys() == after.keys()
    assert [n for n in before if before[n] != after[n]] == ["layer72-upsample"]
    weights = upsample.entry_layer(after["layer72-upsample"]).blobs
    assert [list(w.shape.dim) for w in weights] == [[288, 1, 2, 2]]
    assert set(weights[0].data) == {1.0}

    opencv = runtime_loader("opencv")
    x = darknet_cfg.fixed_input(DATA / f"{STEM}.cfg", seed=0)
    blobs = ["layer69-conv", "layer79-conv"]
    original = opencv.run(*NANO_PAIR, x, blobs, tmp_path)
    replaced = opencv.run(copy.prototxt, copy.caffemodel, x, blobs, tmp_path)
    for a, b in zip(original, replaced):
        np.testing.assert_array_equal(a, b)


def test_private_venv_is_reused_until_its_pins_change(tmp_path, monkeypatch):
    monkeypatch.setenv(venvs.CACHE_ENV, str(tmp_path))
    spec = venvs.VenvSpec("probe", requirements=())
    python = venvs.ensure(spec)
    stamp = python.parents[1] / venvs.STAMP
    first = stamp.stat().st_mtime_ns
    assert venvs.ensure(spec) == python and stamp.stat().st_mtime_ns == first
    (python.parents[1] / "marker").write_text("")
    venvs.ensure(spec._replace(env=(("X", "1"),)))   # env is not a pin
    assert (python.parents[1] / "marker").exists()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_runtime_computes_its_formula_on_the_stored_bytes(runtime, runtime_loader, synthetic_net,
                                                          bnfix_pair, tmp_path, record_property):
    """On the synthetic net, unpatched and patched by the default (eps) strategy: the runtime's output is
    its formula on the stored float32 values, every channel, dead ones included. For caffe2onnx
    that formula divides the variance by s + 1e-5, and plain Caffe's formula is measurably not
    what it computes."""
    rt = runtime_loader(runtime)
    extra = 0.0 if runtime in EPS_READERS else 1e-5
    source = (synthetic_net.prototxt, synthetic_net.caffemodel)
    for label, args in (("unpatched", []), ("default", [])):
        p, m = bnfix_pair(source, label, args)
        (y,) = rt.run(p, m, synthetic_net.input, [synthetic.OUTPUT], tmp_path / label)
        own = synthetic.per_channel_rel_error(y, stored_caffe_output(synthetic_net, p, m, extra))
        darknet = synthetic.per_channel_rel_error(y, synthetic_net.reference())
        record_property(f"synthetic_{runtime}_{label}_vs_darknet", darknet.tolist())
        print(f"\n{runtime} {label}: vs its formula {np.array2string(own, precision=2)}; "
              f"vs Darknet {np.array2string(darknet, precision=2)}")
        assert own.max() <= FORMULA_REL, f"{runtime} {label}: {own}"
        if runtime == "caffe2onnx":
            bvlc = synthetic.per_channel_rel_error(y, stored_caffe_output(synthetic_net, p, m))
            assert bvlc[-1] > FORMULA_REL, f"caffe2onnx matches BVLC Caffe's divisor: {bvlc}"


def test_caffe2onnx_quirks_a_target_must_survive(runtime_loader, tmp_path):
    """Observed, not only read in caffe2onnx/src/caffe2onnx.py: s = 0 kills the conversion; a
    BatchNorm whose Scale is not the next layer gets gamma = 1, beta = 0.001 of its own; and
    with s = 1024 (statistics scaled to match) the variance divisor's + 1e-5 vanishes, so the
    output is BVLC Caffe's formula again."""
    rt = runtime_loader("caffe2onnx")
    dead = synthetic.write_pair(tmp_path / "s0", s=0.0)
    with pytest.raises(RuntimeError, match="ZeroDivisionError: float division by zero"):
        rt.run(dead.prototxt, dead.caffemodel, dead.input, [synthetic.OUTPUT], tmp_path / "s0-run")

    gap = synthetic.write_pair(tmp_path / "gap", scale_gap=True)
    (y,) = rt.run(gap.prototxt, gap.caffemodel, gap.input, [synthetic.OUTPUT], tmp_path / "gap-run")
    caffe = stored_caffe_output(gap, gap.prototxt, gap.caffemodel, var_divisor_extra=1e-5)
    shift = (y - caffe) / gap.gamma.reshape(1, -1, 1, 1)
    ordinary = gap.var >= 1.0   # |y| ~ 1 there: float32 noise ~1e-7, far below the 1e-3 shift
    assert np.abs(shift[:, ordinary] - 0.001).max() <= 1e-5

    big = synthetic.write_pair(tmp_path / "s1024", s=1024.0)
    (y,) = rt.run(big.prototxt, big.caffemodel, big.input, [synthetic.OUTPUT], tmp_path / "s1024-run")
    bvlc = synthetic.per_channel_rel_error(y, stored_caffe_output(big, big.prototxt, big.caffemodel))
    assert bvlc.max() <= FORMULA_REL, f"s = 1024: {bvlc}"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_unpatched_and_default_patch_in_runtime(runtime, nano_heads, darknet_heads, record_property):
    """The harness tells a right formula from a wrong one in every runtime: the unpatched pair
    misses the goal by far; the default patch reaches it where eps is read from the
    prototxt, and cannot in caffe2onnx (its variance divisor, issue 9)."""
    unpatched = max_abs_diff(nano_heads(runtime, "unpatched"), darknet_heads)
    default = max_abs_diff(nano_heads(runtime, "default"), darknet_heads)
    for label, value in (("unpatched", unpatched), ("default", default)):
        record_property(f"{runtime}_{label}", value)
        print(f"\n{runtime} {label}: {value:.3g} (recorded {RECORDED[runtime, label]:.2g})")
    assert unpatched > GOAL_FACTOR * GOAL_MAX_ABS, f"unpatched only {unpatched:.3g} off"
    if runtime in EPS_READERS:
        assert default <= GOAL_MAX_ABS
        assert unpatched >= GOAL_FACTOR * default
    else:
        assert default > GOAL_MAX_ABS, f"caffe2onnx reached {default:.3g} with the eps strategy"


# ---------------------------------------------------------------------------
# The proof: every target in its runtimes


@pytest.mark.parametrize("target,runtime", [(t, r) for t, rs in TARGETS.items() for r in rs])
def test_target_matches_darknet_in_its_runtime(target, runtime, nano_heads, darknet_heads,
                                               record_property):
    patched = max_abs_diff(nano_heads(runtime, f"target-{target}", ["--target", target]),
                           darknet_heads)
    unpatched = max_abs_diff(nano_heads(runtime, "unpatched"), darknet_heads)
    record_property(f"target_{target}_in_{runtime}", patched)
    print(f"\n--target {target} in {runtime}: {patched:.3g} (unpatched {unpatched:.3g})")
    assert patched <= GOAL_MAX_ABS, f"--target {target} in {runtime}: {patched:.3g}"
    assert unpatched >= GOAL_FACTOR * patched


def test_scale_strategy_is_exact_on_dead_channels_in_opencv(runtime_loader, synthetic_net,
                                                            bnfix_pair, tmp_path, record_property):
    rt = runtime_loader("opencv")
    source = (synthetic_net.prototxt, synthetic_net.caffemodel)
    p, m = bnfix_pair(source, "strategy-scale", ["--strategy", "scale"])
    (y,) = rt.run(p, m, synthetic_net.input, [synthetic.OUTPUT], tmp_path)
    rel = synthetic.per_channel_rel_error(y, synthetic_net.reference())
    record_property("synthetic_opencv_strategy_scale", rel.tolist())
    assert rel.max() <= GOAL_SYNTHETIC_REL, f"per channel: {rel}"
