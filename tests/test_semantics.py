"""The maths: presets, Caffe's float32 denominator, and the variance map (property-tested)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfix import semantics as sem

F32 = np.float32
ULP = 2.0**-24  # float32 unit roundoff


# -- presets and hand-written formulas -------------------------------------------------------

def as32(values) -> np.ndarray:
    return np.asarray(values, F32)


def as64(values) -> np.ndarray:
    return np.asarray(values, np.float64)


@pytest.mark.parametrize("name, inside, outside", [
    ("pjreddie-cpu", 0.0, 1e-6),
    ("pjreddie-gpu", 1e-5, 0.0),
    ("alexeyab", 1e-5, 0.0),
    ("opencv", 1e-6, 0.0),
])
def test_presets_are_the_fact_sheet_formulas(name, inside, outside):
    f = sem.parse_source(name)
    assert (f.inside, f.outside) == (inside, outside)
    var = np.array([0.0, 1e-6, 0.25])
    assert np.array_equal(as64(sem.darknet_denominator(var, f)), np.sqrt(var + inside) + outside)


def test_default_source_is_pjreddie_cpu():
    assert sem.PRESETS[sem.DEFAULT_SOURCE].expression == "sqrt(var) + 1e-06"


@pytest.mark.parametrize("text, inside, outside", [
    ("sqrt(var+1e-5)", 1e-5, 0.0),
    ("sqrt(var) + 1e-6", 0.0, 1e-6),
    ("sqrt( var + 2e-6 ) + 3E-7", 2e-6, 3e-7),
    ("SQRT(VAR)", 0.0, 0.0),
    ("sqrt(var+.5)+1", 0.5, 1.0),
])
def test_hand_written_formulas(text, inside, outside):
    f = sem.parse_source(text)
    assert (f.inside, f.outside) == (inside, outside)


def test_hand_written_preset_is_named():
    assert sem.parse_source("sqrt(var + 1e-6)").preset == "opencv"
    assert sem.parse_source("sqrt(var)+2e-6").preset is None


@pytest.mark.parametrize("text", ["darknet", "sqrt(var-1e-5)", "var+1e-5", "sqrt(var)*2", "", "sqrt(var+x)"])
def test_bad_sources_are_refused(text):
    with pytest.raises(ValueError, match="unknown source"):
        sem.parse_source(text)


def test_expression_round_trips_through_parse():
    for f in [*sem.PRESETS.values(), sem.Formula(3e-6, 2e-7)]:
        again = sem.parse_source(f.expression)
        assert (again.inside, again.outside) == (f.inside, f.outside)


# -- Caffe's arithmetic ------------------------------------------------------------------------

def test_caffe_denominator_is_float32_with_float32_eps():
    den = sem.caffe_denominator([0.0], 1.0, 1e-6)
    assert den.typecode == "f"
    assert den[0] == np.sqrt(F32(1e-6))  # eps held as float32 9.99999997e-07


def numpy_caffe_denominator(b1, s, eps):
    """The same computation in numpy float32: the reference for the pure-Python emulation."""
    s32 = F32(s)
    factor = F32(0.0) if s32 == 0 else F32(1.0) / s32
    with np.errstate(invalid="ignore"):
        return np.sqrt(as32(b1) * factor + F32(eps))


@settings(max_examples=300, deadline=None)
@given(b1=st.lists(st.floats(float(F32(-1e-5)), 1e6, allow_nan=False, width=32), min_size=1, max_size=16),
       s=st.one_of(st.just(0.0), st.just(1.0), st.floats(float(F32(1e-3)), 1e4, width=32)),
       eps=st.sampled_from([0.0, 1e-6, 1e-5, 1e-3, 0.0010000000475]))
def test_float32_emulation_is_bit_exact(b1, s, eps):
    """Double rounding is innocuous for + * / sqrt: the emulation equals numpy's float32."""
    ours = as32(sem.caffe_denominator(b1, s, eps))
    ref = numpy_caffe_denominator(b1, s, eps)
    assert np.array_equal(ours.view(np.int32), ref.view(np.int32)) or np.array_equal(ours, ref, equal_nan=True)


def test_caffe_denominator_zero_scale_factor_zeroes_statistics():
    den = sem.caffe_denominator(np.array([4.0], F32), 0.0, 1e-5)
    assert den[0] == np.sqrt(F32(1e-5))


def test_caffe_denominator_divides_by_scale_factor():
    den = sem.caffe_denominator(np.array([999.98236 * 0.5], F32), 999.98236, 0.0)
    assert den[0] == pytest.approx(np.sqrt(0.5), rel=1e-6)


# -- the variance map: property tests ---------------------------------------------------------

def _bound(stored: np.ndarray, s: float, eps: float, target: np.ndarray) -> np.ndarray:
    """The float32 error budget of Caffe's sqrt(b1*(1/s) + eps) against an exact target.

    Rounding the stored value, 1/s, the product and the sum each cost half an ulp of the
    quantities involved; near var' ≈ -eps the absolute error of ``var'/s + eps`` stays that of
    the terms (~eps·2^-24) while the result D² is tiny, which is the documented cancellation.
    Relative error of the root is half that of D², plus the root's own rounding.
    """
    terms = np.abs(stored.astype(np.float64)) / s + sem.f32(eps)
    abs_err_d2 = 3 * ULP * terms + 2 * ULP * target**2
    return 0.5 * abs_err_d2 / target**2 + ULP


variances = st.one_of(
    st.floats(1e-3, 10.0),
    st.floats(1e-9, 1e-5),
    st.floats(1e-45, 1e-30),
    st.just(0.0),
)


@settings(max_examples=300, deadline=None)
@given(
    var=st.lists(variances, min_size=1, max_size=32),
    source=st.sampled_from(sorted(sem.PRESETS)),
    eps=st.sampled_from([1e-6, 1e-5, 1e-7, 0.0]),
    s=st.one_of(st.just(1.0), st.floats(0.5, 2000.0)),
)
def test_patched_denominator_matches_darknet(var, source, eps, s):
    formula = sem.PRESETS[source]
    v = np.asarray(var, F32).astype(np.float64)  # Darknet's variance is float32
    if eps == 0.0 and formula.inside == 0 and formula.outside == 0:
        return
    stored = sem.patched_variance(v, s, formula, eps)
    assert stored.typecode == "f"
    stored = as32(stored)
    target = as64(sem.darknet_denominator(v, formula))
    err = as64(sem.relative_error(sem.caffe_denominator(stored, s, eps), target))
    assert np.all(err <= _bound(stored, s, eps, target)), (err, _bound(stored, s, eps, target))


@settings(max_examples=200, deadline=None)
@given(var=st.lists(st.floats(1e-4, 100.0), min_size=1, max_size=64), s=st.sampled_from([1.0, 999.98236]))
def test_normal_channels_match_to_float32_precision(var, s):
    """Away from the cancellation region the patch is as exact as float32 allows (~1e-7)."""
    v = np.asarray(var, F32).astype(np.float64)
    formula = sem.PRESETS["pjreddie-cpu"]
    stored = sem.patched_variance(v, s, formula, 1e-6)
    err = as64(sem.relative_error(sem.caffe_denominator(stored, s, 1e-6), sem.darknet_denominator(v, formula)))
    assert err.max() <= 1.5e-7


def test_tiny_variances_go_negative_and_stay_valid_for_caffe():
    v = np.array([3.0e-7, 1.1e-7, 5.6e-45, 0.0])
    stored = as32(sem.patched_variance(v, 1.0, sem.PRESETS["pjreddie-cpu"], 1e-6))
    assert np.all(stored < 0)
    assert np.all(stored.astype(np.float64) + sem.f32(1e-6) > 0)


def test_eps_zero_is_exact_for_dead_channels():
    """With eps 0 the stored value is D² itself: no cancellation (the fact sheet's 8.5e-8 case)."""
    v = np.array([5.6e-45, 0.0, 2e-7])
    f = sem.PRESETS["pjreddie-cpu"]
    stored = sem.patched_variance(v, 1.0, f, 0.0)
    err = as64(sem.relative_error(sem.caffe_denominator(stored, 1.0, 0.0), sem.darknet_denominator(v, f)))
    assert err.max() <= 1.2e-7


@settings(max_examples=200, deadline=None)
@given(var=st.lists(st.floats(1e-6, 100.0), min_size=1, max_size=32), source=st.sampled_from(sorted(sem.PRESETS)),
       s=st.sampled_from([1.0, 999.98236]))
def test_original_variance_inverts_the_patch(var, source, s):
    v = np.asarray(var, F32).astype(np.float64)
    formula = sem.PRESETS[source]
    b1 = (v * s).astype(F32)  # what the caffemodel stores
    stored = as32(sem.patched_variance(b1.astype(np.float64) / s, s, formula, 1e-6))
    back = as64(sem.original_variance(stored, s, formula, 1e-6))
    assert np.allclose(back, b1 / s, rtol=1e-5, atol=1e-10)
    values, exact = sem.unpatched_variance(stored, s, formula, 1e-6)
    values = as32(values)
    # Channels reported exact re-patch to the stored bits and are the original bits.
    again = as32(sem.patched_variance(values.astype(np.float64) / s, s, formula, 1e-6))
    exact = np.asarray(exact)
    assert np.array_equal(again[exact], stored[exact])
    assert np.array_equal(values[exact], b1[exact])


@pytest.mark.parametrize("x", [0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 3.4028234663852886e38, 1e-38])
@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_f32_step_matches_numpy_nextafter(x):
    x32 = F32(x)
    for k, towards in ((1, np.inf), (-1, -np.inf)):
        assert sem.f32_step(float(x32), k) == float(np.nextafter(x32, F32(towards)))
    assert sem.f32_step(float(x32), 2) == float(np.nextafter(np.nextafter(x32, F32(np.inf)), F32(np.inf)))


# -- helpers -----------------------------------------------------------------------------------

def test_bad_channel_finds_first_offender():
    assert sem.bad_channel(np.array([1.0, np.nan, -1.0]), allow_negative=False) == 1
    assert sem.bad_channel(np.array([1.0, 2.0, -1.0]), allow_negative=False) == 2
    assert sem.bad_channel(np.array([1.0, 2.0, -1.0]), allow_negative=True) is None
    assert sem.bad_channel(np.array([np.inf]), allow_negative=True) == 0


def test_worst_treats_nan_as_the_worst():
    assert sem.worst([1e-7, 3e-7, 2e-7]) == (3e-7, 1)
    assert sem.worst([1e-7, float("nan"), 2e-7]) == (None, 1)
    assert sem.worst([]) == (0.0, 0)


def test_max_relative_change():
    assert sem.max_relative_change(np.array([1.0, 2.0]), np.array([1.5, 2.0])) == 0.5
    assert sem.max_relative_change(np.array([0.0]), np.array([1e-6])) == np.inf
    assert sem.max_relative_change(np.array([0.0]), np.array([0.0])) == 0.0


def test_same_eps_compares_as_float32():
    assert sem.same_eps(1e-6, 9.99999997e-07)
    assert not sem.same_eps(1e-6, 1e-5)
