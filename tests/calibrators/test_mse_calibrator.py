"""mse: the chosen clip against a brute-force search computing the actual MSE of the samples.

The samples are placed on bin centres of the documented grid (x = (j + 0.5) * w, w = 2**k the
smallest power of two with max|x| < bins * w), where the calibrator's histogram estimate is the
exact MSE, so the brute force must find the same clip. Candidates, per mse.py's docstring: the
edges i * w for i = min(2**(bits-1), n) .. n-1 and the observed extreme.
"""
from __future__ import annotations

import numpy as np
import pytest

from qcompile.calibration import make_calibrator
from qcompile.qtypes import QuantSpec
import qcompile.calibrators  # noqa: F401  (registers the calibrators)


def fake_quantize(x: np.ndarray, lo: float, hi: float, spec: QuantSpec) -> np.ndarray:
    """QuantizeLinear/DequantizeLinear with qparams from (lo, hi), written out for the test."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if spec.symmetric:
        scale = (max(-lo, hi) if spec.signed else hi) / spec.qmax
        zero_point = 0.0
    else:
        scale = (hi - lo) / (spec.qmax - spec.qmin)
        zero_point = float(np.clip(np.rint(spec.qmin - lo / scale), spec.qmin, spec.qmax))
    q = np.clip(np.rint(x / scale) + zero_point, spec.qmin, spec.qmax)
    return (q - zero_point) * scale


def actual_mse(x, lo, hi, spec) -> float:
    return float(np.mean((fake_quantize(x, lo, hi, spec) - x) ** 2))


def candidates(side_max: float, width: float, bits: int) -> list[float]:
    n = int(side_max // width) + 1  # centre data: the extreme sits in bin n - 1
    return [i * width for i in range(min(2 ** (bits - 1), n), n)] + [side_max]


def centre_data(rng, size, bins, exponent, top_fraction=0.02, signed=True):
    """Values (j + 0.5) * 2**exponent, j < bins, with the top bin occupied (pins the grid)."""
    j = np.minimum(np.floor(np.abs(rng.laplace(0, bins / 12, size))), bins - 1)
    j[: int(size * top_fraction)] = rng.integers(bins // 2, bins, int(size * top_fraction))
    j[-1] = bins - 1
    x = (j + 0.5) * 2.0**exponent
    if signed:
        x *= rng.choice([-1.0, 1.0], size)
    x[:10] = 0.0
    return x.astype(np.float32).astype(np.float64)


def brute_force_symmetric(x, spec, width):
    side = np.abs(x).max() if spec.signed else x.max()
    clips = candidates(side, width, spec.bits)
    errors = [actual_mse(x, -c, c, spec) for c in clips]
    return clips, errors


@pytest.mark.parametrize("bits,signed", [(8, True), (4, True), (8, False), (3, False)])
def test_symmetric_matches_brute_force(bits, signed):
    rng = np.random.default_rng(bits + 10 * signed)
    x = centre_data(rng, 3000, 2048, -10)
    if not signed:
        x = np.where(x < 0, x * 0.3, x)  # some negatives: they saturate to 0 under unsigned codes
    spec = QuantSpec(bits=bits, signed=signed, calibrator="mse")
    calibrator = make_calibrator(spec)
    calibrator.observe(x.astype(np.float32))
    r = calibrator.compute_range()
    clips, errors = brute_force_symmetric(x, spec, 2.0**-10)
    best = int(np.argmin(errors))
    assert float(r.hi) == pytest.approx(clips[best], abs=1e-12)
    assert float(r.lo) == (-float(r.hi) if signed else 0.0)
    assert actual_mse(x, float(r.lo), float(r.hi), spec) == pytest.approx(errors[best], rel=1e-9)


@pytest.mark.parametrize("bits", [8, 4])
def test_per_channel_matches_brute_force_per_channel(bits):
    rng = np.random.default_rng(bits)
    exponents = [-12, -8, -3, 2]
    w = np.stack([centre_data(rng, 400, 256, e) for e in exponents])  # 256 bins per channel
    spec = QuantSpec(bits=bits, axis=0, calibrator="mse")
    calibrator = make_calibrator(spec)
    calibrator.observe(w.astype(np.float32))
    r = calibrator.compute_range()
    assert r.hi.shape == (4,)
    per_tensor = QuantSpec(bits=bits, calibrator="mse")
    for c, e in enumerate(exponents):
        clips, errors = brute_force_symmetric(w[c], per_tensor, 2.0**e)
        assert r.hi[c] == pytest.approx(clips[int(np.argmin(errors))], abs=1e-12)


def test_asymmetric_is_optimal_in_each_coordinate():
    rng = np.random.default_rng(7)
    x = centre_data(rng, 3000, 2048, -10)
    x = np.where(x < 0, x * 0.25, x)  # skewed: short negative side
    spec = QuantSpec(bits=4, symmetric=False, signed=False, calibrator="mse")
    calibrator = make_calibrator(spec)
    calibrator.observe(x.astype(np.float32))
    r = calibrator.compute_range()
    lo, hi = float(r.lo), float(r.hi)
    assert lo < 0 < hi
    here = actual_mse(x, lo, hi, spec)
    # negative-side bin j holds -x in [j*w, (j+1)*w): the extreme -min sits in bin floor(-min / w)
    for candidate in candidates(x.max(), 2.0**-10, 4):
        assert actual_mse(x, lo, candidate, spec) >= here * (1 - 1e-9)
    for candidate in candidates(-x.min(), 2.0**-10, 4):
        assert actual_mse(x, -candidate, hi, spec) >= here * (1 - 1e-9)
    assert here < actual_mse(x, x.min(), x.max(), spec)


@pytest.mark.parametrize("distribution,alpha", [("laplace", 9.8968), ("normal", 3.9240)])
def test_8_bit_clip_on_large_samples_agrees_with_aciq_theory(distribution, alpha):
    """At 8 bits the grid is fine enough for ACIQ's MSE model (papers.md §2.1): the MSE-optimal
    clip of 1e6 Laplace(0, 1) / N(0, 1) samples is near alpha* = 9.8968 b / 3.9240 sigma. The
    optimum is flat and set by a sparse tail (~50 samples beyond 9.9 b), hence 8 %."""
    x = getattr(np.random.default_rng(9), distribution)(0.0, 1.0, 1_000_000).astype(np.float32)
    calibrator = make_calibrator(QuantSpec(calibrator="mse"))
    calibrator.observe(x)
    assert float(calibrator.compute_range().hi) == pytest.approx(alpha, rel=0.08)


def test_uniform_data_keeps_nearly_the_whole_range():
    x = np.random.default_rng(8).uniform(-1, 1, 200_000).astype(np.float32)
    calibrator = make_calibrator(QuantSpec(calibrator="mse"))
    calibrator.observe(x)
    assert float(calibrator.compute_range().hi) > 0.95 * np.abs(x).max()
