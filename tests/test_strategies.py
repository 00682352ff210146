"""Strategies as a seam: every choice maps to a module, the Scale fold is exact, targets resolve.

The Scale fold is checked on the synthetic dead-channel layer of issue 9 (variances 0 … 4) by
recomputing, from the bytes written, what Caffe computes in float32 (BatchNorm, then Scale), and
against the pairing rules that decide which Scale layer a BatchNorm feeds.
"""

from __future__ import annotations

import math

import caffe_proto as cp
import numpy as np
import pytest

import bnfix
from bnfix import marker, pairing, prototxt, runtimes, strategies, targets
from bnfix import semantics as sem
from bnfix.caffemodel import Model
from bnfix.formulas import PRESETS
from bnfix.result import StrategyName
from bnfix.strategies import Fit, Stats

VARIANCES = [0.0, 1e-9, 1e-6, 1e-3, 1.0, 4.0]
NORMAL = [1e-3, 0.02, 0.5, 1.0, 2.0, 4.0]
PJ = PRESETS["pjreddie-cpu"]


def test_every_strategy_name_has_a_module_and_a_marker_tag():
    for name in StrategyName:
        s = strategies.get(name)
        assert s.name is name
        m = marker.Marker(name, PJ, 1e-6, "0" * 12, "1" * 12, ())
        assert marker.parse(m.text(), "here", marker.PROTOTXT_KEYS) == m


def test_every_target_resolves_and_names_known_runtimes():
    names = {r.name for r in runtimes.RUNTIMES}
    for t in targets.TARGETS.values():
        opts = targets.resolve(t.name, None, None, PJ)
        assert opts.strategy is t.strategy and opts.target == t.name
        assert set(t.runtimes) <= names, t.name
        assert opts.choices[0].startswith(f"target {t.name}")
    assert targets.resolve(None, None, None, PJ).choices[0] == (
        "target caffe (the default): BVLC Caffe and the forks that read eps")
    assert {t.name for t in targets.TARGETS.values()} >= {
        "caffe", "opencv", "ncnn", "mnn", "openvino", "tensorrt", "nvcaffe", "caffe2onnx", "portable"}


def test_an_explicit_strategy_or_eps_overrides_the_target_and_says_so():
    opts = targets.resolve("opencv", "eps", 1e-5, PJ)
    assert opts.strategy is StrategyName.EPS and opts.target_eps == 1e-5
    assert "strategy eps (--strategy; the target would use scale)" in opts.choices
    assert "eps 1e-05 (--target-eps)" in opts.choices
    with pytest.raises(bnfix.BnfixError, match="unknown target 'tpu': use one of caffe, opencv"):
        targets.resolve("tpu", None, None, PJ)
    with pytest.raises(bnfix.BnfixError, match="unknown strategy 'magic': use one of eps, scale"):
        targets.resolve(None, "magic", None, PJ)


# -- the Scale fold, numerically ----------------------------------------------------------------

def _fold(var, eps=1e-5, s=1.0, k_s=None):
    rng = np.random.default_rng(3)
    orig = Stats(sem.to_f32(rng.normal(size=len(var))), sem.to_f32(var), s, sem.to_f32(rng.uniform(0.5, 2, len(var))))
    fit = Fit(PJ, eps, s, k_s or (s or 1.0))
    return orig, fit, strategies.get(StrategyName.SCALE).fit(orig, fit)


def test_scale_fold_is_exact_on_every_channel_dead_ones_included():
    orig, fit, new = _fold(VARIANCES)
    assert new.var == orig.var and new.mean == orig.mean and new.s == 1.0  # BatchNorm untouched
    target = sem.darknet_denominator(VARIANCES, PJ)
    den = sem.caffe_denominator(new.var, new.s, fit.eps)
    err = sem.effective_error(den, new.gamma, orig.gamma, target)
    assert max(err) <= 2 ** -23  # float32 rounding of gamma', nothing more
    # What the eps strategy reaches on the same channels: the var = 0 channel loses ~1e-2.
    eps_new = strategies.get(StrategyName.EPS).fit(orig, Fit(PJ, 1e-6, 1.0, 1.0))
    eps_err = sem.denominator_error(eps_new.var, 1.0, 1e-6, VARIANCES, PJ)
    assert eps_err[0] > 1e-3 and min(eps_new.var) < 0


def test_scale_unfit_recovers_gamma_bit_for_bit_or_says_where_not():
    orig, fit, new = _fold(VARIANCES)
    back, hits = strategies.get(StrategyName.SCALE).unfit(new, fit)
    for i, h in enumerate(hits):
        assert orig.gamma[i] in h  # the original is always among the candidates
        if len(h) == 1:
            assert back.gamma[i] == orig.gamma[i]
    assert sum(len(h) == 1 for h in hits) >= len(VARIANCES) - 1


def test_power_of_two_scale_factor_scales_the_statistics_exactly():
    """--target caffe2onnx stores s = 1024 so that its var / (s + 1e-5) rounds to Caffe's var / s."""
    orig, _fit, new = _fold(VARIANCES, s=1.0, k_s=1024.0)
    assert new.s == 1024.0
    assert list(new.mean) == [m * 1024 for m in orig.mean] and list(new.var) == [v * 1024 for v in orig.var]
    assert list(sem.caffe_denominator(new.var, 1024.0, 1e-5)) == list(sem.caffe_denominator(orig.var, 1.0, 1e-5))
    view = runtimes.Written(new.var, new.s, 1e-5, new.gamma, orig.gamma, sem.darknet_denominator(VARIANCES, PJ), True)
    c2o = runtimes.BY_NAME["caffe2onnx"]
    assert runtimes.denominator(c2o, view) == list(sem.caffe_denominator(new.var, new.s, 1e-5))
    unscaled = view._replace(var=orig.var, s=1.0)
    assert runtimes.denominator(c2o, unscaled) != list(sem.caffe_denominator(orig.var, 1.0, 1e-5))


# -- pairing a BatchNorm with its Scale ----------------------------------------------------------

def _net(body: str, scale_blobs=2, channels=6):
    head = 'name: "n"\ninput: "data"\ninput_dim: 1\ninput_dim: 6\ninput_dim: 4\ninput_dim: 4\n'
    return head + body


def _doc_and_model(tmp_path, text, layers):
    (tmp_path / "m.prototxt").write_text(text)
    (tmp_path / "m.caffemodel").write_bytes(cp.model_bytes(*layers))
    return prototxt.read(tmp_path / "m.prototxt"), Model(tmp_path / "m.caffemodel")


def _bn_scale_layers(scale_name="sc", blobs=2, variances=VARIANCES):
    bn = cp.bn_layer("bn", np.zeros(6), variances)
    sc = cp.LayerParameter(name=scale_name, type="Scale")
    for _ in range(blobs):
        sc.blobs.append(cp.blob(np.ones(6)))
    return [bn, sc]


BN_IN_PLACE = 'layer { name: "bn" type: "BatchNorm" bottom: "data" top: "data" }\n'
SCALE = 'layer {{ name: "sc" type: "Scale" bottom: "{b}" top: "{t}" scale_param {{ bias_term: true {extra}}} }}\n'


@pytest.mark.parametrize("body,companion,why", [
    (BN_IN_PLACE + SCALE.format(b="data", t="data", extra=""), True, ""),
    ('layer { name: "bn" type: "BatchNorm" bottom: "data" top: "b" }\n' + SCALE.format(b="b", t="c", extra=""),
     True, ""),
    (BN_IN_PLACE + 'layer { name: "r" type: "ReLU" bottom: "data" top: "data" }\n'
     + SCALE.format(b="data", t="data", extra=""), False, "feeds ReLU layer 'r', not a Scale layer"),
    ('layer { name: "bn" type: "BatchNorm" bottom: "data" top: "b" }\n' + SCALE.format(b="b", t="c", extra="")
     + 'layer { name: "x" type: "Eltwise" bottom: "b" bottom: "c" top: "d" }\n', False,
     "also feeds layer 'x', not only Scale 'sc'"),
    (BN_IN_PLACE + SCALE.format(b="data", t="data", extra="axis: 0 "), False, "axis 0, not a per-channel scale"),
    (BN_IN_PLACE, False, "no layer reads its output 'data'"),
], ids=["in-place", "not-in-place", "relu-between", "two-readers", "axis-0", "no-scale"])
def test_the_companion_is_the_only_reader_of_the_batchnorm_output(tmp_path, body, companion, why):
    doc, model = _doc_and_model(tmp_path, _net(body), _bn_scale_layers())
    with model:
        (g,), _ = pairing.pair(doc, model)
    assert (g.scale is not None) is companion
    assert why in g.no_scale


def test_scale_strategy_falls_back_to_eps_where_there_is_no_scale_and_says_why(tmp_path):
    text = _net(BN_IN_PLACE + 'layer { name: "r" type: "ReLU" bottom: "data" top: "data" }\n')
    _doc_and_model(tmp_path, text, _bn_scale_layers()[:1])[1].close()
    result = bnfix.patch(tmp_path / "m.prototxt", tmp_path / "m.caffemodel", strategy="scale")
    (layer,) = result.layers
    assert layer.strategy is StrategyName.EPS and layer.status.value == "patched"
    assert "eps strategy: no Scale layer to fold into: its output 'data' feeds ReLU layer 'r', not a Scale layer" \
        in layer.changes
    assert "# bnfix: eps fit" in result.new_prototxt


def test_scale_strategy_end_to_end_idempotent_and_revertible(tmp_path):
    text = _net(BN_IN_PLACE + SCALE.format(b="data", t="data", extra=""))
    _doc_and_model(tmp_path, text, _bn_scale_layers())[1].close()
    pp, mp = tmp_path / "m.prototxt", tmp_path / "m.caffemodel"
    result = bnfix.patch(pp, mp, strategy="scale")
    (layer,) = result.layers
    assert layer.strategy is StrategyName.SCALE and layer.scale_layer == "sc" and layer.changed == "gamma"
    assert layer.err_after <= 2 ** -23 and layer.negative_channels == 0
    assert layer.eps_after == layer.eps_before  # eps is left as it is
    result.save(tmp_path / "o.prototxt", tmp_path / "o.caffemodel")
    out = cp.parse((tmp_path / "o.caffemodel").read_bytes())
    src = cp.parse(mp.read_bytes())
    assert list(out.layer[0].blobs[1].data) == list(src.layer[0].blobs[1].data)  # variance kept
    assert list(out.layer[1].blobs[0].data) != list(src.layer[1].blobs[0].data)  # gamma folded
    assert list(out.layer[1].blobs[1].data) == list(src.layer[1].blobs[1].data)  # beta kept
    again = bnfix.patch(tmp_path / "o.prototxt", tmp_path / "o.caffemodel", strategy="scale")
    assert again.layers[0].status.value == "up to date"
    back = bnfix.revert(tmp_path / "o.prototxt", tmp_path / "o.caffemodel")
    back.save(tmp_path / "r.prototxt", tmp_path / "r.caffemodel")
    assert (tmp_path / "r.prototxt").read_bytes() == pp.read_bytes()
    assert (tmp_path / "r.caffemodel").read_bytes() == mp.read_bytes()


def test_force_moves_a_layer_between_strategies_from_the_original_statistics(tmp_path):
    """Normal channels only: a dead channel's original variance does not survive the eps fit's
    float32 round trip (revert reports those channels), so the two routes differ there."""
    text = _net(BN_IN_PLACE + SCALE.format(b="data", t="data", extra=""))
    _doc_and_model(tmp_path, text, _bn_scale_layers(variances=NORMAL))[1].close()
    pp, mp = tmp_path / "m.prototxt", tmp_path / "m.caffemodel"
    bnfix.patch(pp, mp).save(tmp_path / "e.prototxt", tmp_path / "e.caffemodel")  # eps strategy
    skipped = bnfix.patch(tmp_path / "e.prototxt", tmp_path / "e.caffemodel", strategy="scale")
    assert skipped.layers[0].status.value == "skipped" and skipped.layers[0].warning
    moved = bnfix.patch(tmp_path / "e.prototxt", tmp_path / "e.caffemodel", strategy="scale", force=True)
    direct = bnfix.patch(pp, mp, strategy="scale")
    assert moved.new_prototxt == direct.new_prototxt  # eps back to the original, the scale marker
    moved.save(tmp_path / "s.prototxt", tmp_path / "s.caffemodel")
    direct.save(tmp_path / "d.prototxt", tmp_path / "d.caffemodel")
    assert (tmp_path / "s.caffemodel").read_bytes() == (tmp_path / "d.caffemodel").read_bytes()


@pytest.mark.parametrize("target,s,eps_text", [
    ("caffe2onnx", 1024.0, None), ("portable", 1024.0, None), ("nvcaffe", 1.0, "0.0001"), ("tensorrt", 1.0, None),
])
def test_targets_write_what_their_runtime_needs(tmp_path, target, s, eps_text):
    """Each target's output, then its revert: byte for byte (normal channels; dead ones may not
    survive a float32 round trip, which revert reports: see test_revert)."""
    text = _net(BN_IN_PLACE + SCALE.format(b="data", t="data", extra=""))
    _doc_and_model(tmp_path, text, _bn_scale_layers(variances=NORMAL))[1].close()
    pp, mp = tmp_path / "m.prototxt", tmp_path / "m.caffemodel"
    result = bnfix.patch(pp, mp, target=target)
    result.save(tmp_path / "o.prototxt", tmp_path / "o.caffemodel")
    out = cp.parse((tmp_path / "o.caffemodel").read_bytes())
    assert out.layer[0].blobs[2].data[0] == s
    assert (f"eps: {eps_text}" in (tmp_path / "o.prototxt").read_text()) if eps_text else \
        ("eps:" not in (tmp_path / "o.prototxt").read_text())
    assert result.layers[0].err_after <= 2 ** -23
    assert target not in {d.runtime for d in result.deviations()}
    back = bnfix.revert(tmp_path / "o.prototxt", tmp_path / "o.caffemodel")
    back.save(tmp_path / "r.prototxt", tmp_path / "r.caffemodel")
    assert (tmp_path / "r.caffemodel").read_bytes() == mp.read_bytes()
    assert (tmp_path / "r.prototxt").read_bytes() == pp.read_bytes()


def test_tensorrt_gets_no_zero_scale_factor(tmp_path):
    text = _net(BN_IN_PLACE + SCALE.format(b="data", t="data", extra=""))
    layers = _bn_scale_layers()
    layers[0].blobs[2].data[0] = 0.0  # the converter bug: Caffe then ignores the statistics
    _doc_and_model(tmp_path, text, layers)[1].close()
    result = bnfix.patch(tmp_path / "m.prototxt", tmp_path / "m.caffemodel", target="tensorrt")
    assert "scale factor fixed (s=0 → 1)" in result.layers[0].changes
    assert "tensorrt" not in {d.runtime for d in result.deviations()}
    assert math.isfinite(result.layers[0].err_after)
