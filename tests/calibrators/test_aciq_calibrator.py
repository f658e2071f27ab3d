"""aciq: the clip-ratio solver against papers.md §2.1, and recovery of alpha on synthetic data."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, special

from qcompile.calibration import make_calibrator
from qcompile.calibrators.aciq import optimal_clip_ratio
from qcompile.qtypes import QuantSpec

# papers.md §2.1: precise values from the numeric solution (M = 2..8) and the two-decimal table.
PRECISE = {
    "laplace": {2: 2.8307, 3: 3.8972, 4: 5.0286, 5: 6.2048, 6: 7.4131, 7: 8.6456, 8: 9.8968},
    "gaussian": {2: 1.7106, 3: 2.1516, 4: 2.5591, 5: 2.9362, 6: 3.2869, 7: 3.6151, 8: 3.9240},
}
TABLE = {
    "laplace": {1: 1.86, 2: 2.83, 3: 3.89, 4: 5.03, 5: 6.20, 6: 7.41, 7: 8.64, 8: 9.89},
    "gaussian": {1: 1.24, 2: 1.71, 3: 2.15, 4: 2.55, 5: 2.93, 6: 3.28, 7: 3.61, 8: 3.92},
}


def expected_mse(prior: str, bits: int, alpha: float) -> float:
    """papers.md §2.1 MSE expressions (unit b / sigma), written independently of the module."""
    rounding = alpha**2 / (3 * 2 ** (2 * bits))
    if prior == "laplace":
        return 2 * math.exp(-alpha) + rounding
    clipping = ((alpha**2 + 1) * (1 - special.erf(alpha / math.sqrt(2)))
                - math.sqrt(2 / math.pi) * alpha * math.exp(-alpha**2 / 2))
    return clipping + rounding


def scipy_alpha(prior: str, bits: int) -> float:
    result = optimize.minimize_scalar(lambda a: expected_mse(prior, bits, a), bounds=(0.01, 40),
                                      method="bounded", options={"xatol": 1e-10})
    return float(result.x)


@pytest.mark.parametrize("prior", ["laplace", "gaussian"])
def test_solver_reproduces_the_papers_table(prior):
    for bits, value in PRECISE[prior].items():
        assert abs(optimal_clip_ratio(prior, bits) - value) < 5e-4, (prior, bits)
        assert abs(scipy_alpha(prior, bits) - value) < 5e-4, (prior, bits)
    for bits, value in TABLE[prior].items():  # the table truncates or rounds to 2 decimals
        assert abs(optimal_clip_ratio(prior, bits) - value) < 1e-2, (prior, bits)


@pytest.mark.parametrize("prior", ["laplace", "gaussian"])
@pytest.mark.parametrize("bits", [1, 12, 16])
def test_solver_matches_direct_minimisation_for_other_bit_widths(prior, bits):
    # the MSE is flat near its minimum (more so at 16 bits), which limits scipy's argmin accuracy
    assert optimal_clip_ratio(prior, bits) == pytest.approx(scipy_alpha(prior, bits), abs=1e-3)


@pytest.fixture(scope="module")
def laplace_data():
    return np.random.default_rng(0).laplace(0.0, 0.7, 1_000_000).astype(np.float32), 0.7


@pytest.fixture(scope="module")
def gaussian_data():
    return np.random.default_rng(1).normal(0.0, 2.5, 1_000_000).astype(np.float32), 2.5


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_recovers_alpha_over_b_on_laplace_samples(laplace_data, bits):
    x, b = laplace_data
    calibrator = make_calibrator(QuantSpec(bits=bits, calibrator="aciq"))
    for part in np.array_split(x, 4):
        calibrator.observe(part)
    r = calibrator.compute_range()
    assert float(r.hi) / b == pytest.approx(TABLE["laplace"][bits], rel=0.02)
    assert float(r.lo) == -float(r.hi)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_recovers_alpha_over_sigma_on_gaussian_samples(gaussian_data, bits):
    x, sigma = gaussian_data
    calibrator = make_calibrator(QuantSpec(bits=bits, calibrator="aciq",
                                           calibrator_options={"prior": "gaussian"}))
    calibrator.observe(x)
    assert float(calibrator.compute_range().hi) / sigma == pytest.approx(TABLE["gaussian"][bits], rel=0.02)


# One-sided values of papers.md §2.1 (the M-bit one-sided alpha is the (M+1)-bit two-sided one).
ONE_SIDED_LAPLACE = {2: 3.89, 3: 5.02, 4: 6.20, 8: 11.16}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_one_sided_window_uses_the_next_bit(bits):
    x = np.abs(np.random.default_rng(2).laplace(0.0, 1.0, 400_000))
    calibrator = make_calibrator(QuantSpec(bits=bits, signed=False, calibrator="aciq"))
    calibrator.observe(x)
    r = calibrator.compute_range()
    mu = x.mean()
    b = np.mean(np.abs(x - mu))
    width = 2.0 ** (math.floor(math.log2(x.max() / 2048)) + 1)
    expected = min(mu + ONE_SIDED_LAPLACE[bits] * b, x.max())
    assert float(r.lo) == 0.0
    # table rounding (0.01 * b) + histogram estimate of b (half a bin, times the ratio)
    assert abs(float(r.hi) - expected) <= 0.01 * b + ONE_SIDED_LAPLACE[bits] * width / 2


def test_asymmetric_two_sided_window():
    x = np.random.default_rng(3).laplace(1.0, 0.5, 400_000)
    calibrator = make_calibrator(QuantSpec(bits=4, symmetric=False, signed=False, calibrator="aciq"))
    calibrator.observe(x)
    r = calibrator.compute_range()
    mu = x.mean()
    alpha = PRECISE["laplace"][4] * np.mean(np.abs(x - mu))
    lo = max(x.min(), mu - alpha)
    tolerance = 2 * PRECISE["laplace"][4] * 2.0 ** (math.floor(math.log2(np.abs(x).max() / 2048)) + 1)
    assert float(r.lo) == pytest.approx(lo, abs=tolerance)
    assert float(r.hi) == pytest.approx(min(lo + 2 * alpha, x.max()), abs=2 * tolerance)


def test_gaussian_uses_the_unbiased_standard_deviation_per_channel():
    rng = np.random.default_rng(4)
    w = rng.normal(0.0, 1.0, (4, 2000)) * np.array([[0.1], [1.0], [3.0], [10.0]])
    calibrator = make_calibrator(QuantSpec(bits=4, axis=0, calibrator="aciq",
                                           calibrator_options={"prior": "gaussian"}))
    calibrator.observe(w)
    r = calibrator.compute_range()
    expected = np.minimum(np.abs(w.mean(axis=1)) + PRECISE["gaussian"][4] * w.std(axis=1, ddof=1),
                          np.abs(w).max(axis=1))
    np.testing.assert_allclose(r.hi, expected, rtol=1e-4)
    np.testing.assert_array_equal(r.lo, -r.hi)


def _sample_mse(x: np.ndarray, r, bits: int) -> float:
    """MSE on the samples of a symmetric quantizer of the range r, codes in ±(2^(bits-1) - 1)."""
    qmax = 2 ** (bits - 1) - 1
    scale = max(-float(r.lo), float(r.hi)) / qmax
    return float(np.mean((np.clip(np.round(x / scale), -qmax, qmax) * scale - x.astype(np.float64)) ** 2))


@pytest.mark.parametrize("bits", [4, 8])
def test_mix_picks_the_true_prior(laplace_data, gaussian_data, bits):
    """Each prior's own data: mix takes that prior's window (the other one and no clipping score worse;
    at 2-3 bits the two windows are within a few % of each other and either may win)."""
    for (x, _), prior in ((laplace_data, "laplace"), (gaussian_data, "gaussian")):
        expected = make_calibrator(QuantSpec(bits=bits, calibrator="aciq", calibrator_options={"prior": prior}))
        mixed = make_calibrator(QuantSpec(bits=bits, calibrator="aciq", calibrator_options={"prior": "mix"}))
        expected.observe(x)
        mixed.observe(x)
        assert float(mixed.compute_range().hi) == float(expected.compute_range().hi), prior


def test_mix_keeps_needed_outliers():
    """A narrow body with 1% outliers at ±6: both priors' windows cut the outliers and cost far more
    MSE on the samples than the whole range; mix keeps the whole range."""
    rng = np.random.default_rng(7)
    x = rng.laplace(0.0, 0.1, 200_000)
    x = np.where(rng.random(x.size) < 0.01, np.sign(x) * 6.0, x).astype(np.float32)
    ranges = {}
    for prior in ("laplace", "gaussian", "mix"):
        calibrator = make_calibrator(QuantSpec(bits=8, calibrator="aciq", calibrator_options={"prior": prior}))
        calibrator.observe(x)
        ranges[prior] = calibrator.compute_range()
    assert float(ranges["mix"].hi) == pytest.approx(float(np.abs(x).max()))
    whole = _sample_mse(x, ranges["mix"], 8)
    assert all(whole < 0.05 * _sample_mse(x, ranges[p], 8) for p in ("laplace", "gaussian"))
