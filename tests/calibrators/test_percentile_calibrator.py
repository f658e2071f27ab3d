"""percentile: equals numpy.percentile within one bin width of the documented grid.

numpy.percentile is called with method="inverted_cdf" (the smallest value whose empirical cdf
reaches p), the definition a histogram threshold estimates; the default linear interpolation
between order statistics differs from it by the gap between neighbouring samples, which in a
sparse tail is larger than a bin.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from qcompile.calibration import make_calibrator
from qcompile.qtypes import QuantSpec
import qcompile.calibrators  # noqa: F401  (registers the calibrators)


def percentile(x, p):
    return np.percentile(np.asarray(x, dtype=np.float64), p, method="inverted_cdf")


def grid_width(amax: float, bins: int) -> float:
    return 2.0 ** (math.floor(math.log2(amax / bins)) + 1)


def calibrate(x: np.ndarray, **spec) -> object:
    calibrator = make_calibrator(QuantSpec(calibrator="percentile", **spec))
    for part in np.array_split(x, 5, axis=-1):
        calibrator.observe(part)
    return calibrator.compute_range()


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99, 99.999])
def test_symmetric_is_percentile_of_abs(p):
    x = np.random.default_rng(0).laplace(0.2, 1.0, 300_000).astype(np.float32)
    r = calibrate(x, calibrator_options={"percentile": p})
    expected = percentile(np.abs(x), p)
    assert abs(float(r.hi) - expected) <= grid_width(float(np.abs(x).max()), 2048)
    assert float(r.lo) == -float(r.hi)


def test_unsigned_symmetric_gives_zero_to_hi():
    x = np.maximum(np.random.default_rng(1).normal(0, 1, 100_000), 0).astype(np.float32)
    r = calibrate(x, signed=False, calibrator_options={"percentile": 99.9})
    assert float(r.lo) == 0.0
    assert abs(float(r.hi) - percentile(x, 99.9)) <= grid_width(float(x.max()), 2048)


@pytest.mark.parametrize("p", [99.0, 99.99])
def test_asymmetric_is_percentile_of_each_side(p):
    x = np.random.default_rng(2).gamma(2.0, 1.0, 300_000).astype(np.float32) - 1.0
    r = calibrate(x, symmetric=False, signed=False, calibrator_options={"percentile": p})
    width = grid_width(float(np.abs(x).max()), 2048)
    lo, hi = percentile(x, [100 - p, p])
    assert abs(float(r.lo) - lo) <= width
    assert abs(float(r.hi) - hi) <= width


def test_percentile_100_is_the_observed_range():
    x = np.random.default_rng(3).normal(0, 1, 10_000)
    r = calibrate(x, symmetric=False, calibrator_options={"percentile": 100})
    assert (float(r.lo), float(r.hi)) == (x.min(), x.max())


def test_per_channel():
    rng = np.random.default_rng(4)
    w = rng.normal(0, 1, (8, 16, 3, 3)) * rng.uniform(0.01, 10, (8, 1, 1, 1))
    r = calibrate(w, axis=0, calibrator_options={"percentile": 99.0})
    assert r.hi.shape == (8,)
    for c in range(8):
        a = np.abs(w[c]).ravel()
        assert abs(r.hi[c] - percentile(a, 99.0)) <= grid_width(a.max(), 256)


def test_options_are_validated():
    with pytest.raises(Exception, match="percentil"):
        make_calibrator(QuantSpec(calibrator="percentile", calibrator_options={"percentil": 99}))
    with pytest.raises(Exception):
        make_calibrator(QuantSpec(calibrator="percentile", calibrator_options={"percentile": 101}))
