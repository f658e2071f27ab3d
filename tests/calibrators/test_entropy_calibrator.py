"""entropy: TensorRT KL search against a plain reimplementation, and its qualitative behaviour."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy

from qcompile.calibration import make_calibrator
from qcompile.errors import CalibrationError
from qcompile.qtypes import QuantSpec
import qcompile.calibrators  # noqa: F401  (registers the calibrators)


def slow_kl_search(h: list[float], levels: int) -> int:
    """The procedure of calibrators/entropy.py's docstring, with loops and scipy.stats.entropy.

    Returns i*, the number of bins kept (largest minimiser)."""
    n = max(k + 1 for k, c in enumerate(h) if c > 0)
    h = h[:n]
    if n <= levels:
        return n
    best_i, best_kl = None, None
    for i in range(levels, n + 1):
        p = list(h[:i])
        p[i - 1] += sum(h[i:])
        totals, members = defaultdict(float), defaultdict(int)
        for k in range(i):
            group = k * levels // i
            totals[group] += h[k]
            if h[k] > 0:
                members[group] += 1
        q = [totals[k * levels // i] / members[k * levels // i] if h[k] > 0 else 0.0 for k in range(i)]
        kl = scipy_entropy(p, q)
        if best_kl is None or kl <= best_kl:  # "<=": the last minimiser wins
            best_i, best_kl = i, kl
    return best_i


def calibrate(x, **spec):
    calibrator = make_calibrator(QuantSpec(calibrator="entropy", **spec))
    for part in np.array_split(np.asarray(x), 3):
        calibrator.observe(part)
    return calibrator


@pytest.mark.parametrize("case", ["relu_laplace", "student_t", "gaps"])
@pytest.mark.parametrize("bits,bins", [(8, 256), (5, 512)])
def test_matches_plain_reimplementation(case, bits, bins):
    rng = np.random.default_rng(["relu_laplace", "student_t", "gaps"].index(case))
    if case == "relu_laplace":  # a zero spike in bin 0 (exact zeros are left out of the search)
        x = np.maximum(rng.laplace(0.3, 1.0, 100_000), 0.0)
    elif case == "student_t":
        x = rng.standard_t(3, 100_000)
    else:  # empty bins inside the range, and an isolated outlier
        x = np.concatenate([np.round(rng.normal(0, 3, 50_000) * 4) / 4, [40.0]])
    x = x.astype(np.float32)
    calibrator = calibrate(x, bits=bits, calibrator_options={"bins": bins})
    h = calibrator.histogram()
    magnitude = (h.positive + h.negative).astype(float).tolist()
    magnitude[0] -= h.zeros
    levels = 2 ** (bits - 1)  # symmetric signed spec
    expected = min(slow_kl_search(magnitude, levels) * h.width, float(np.abs(x).max()))
    r = calibrator.compute_range()
    assert float(r.hi) == expected
    assert float(r.lo) == -expected


def test_long_thin_tail_clips_well_inside_the_max():
    rng = np.random.default_rng(0)
    bulk = rng.normal(0, 1, 1_000_000)
    tail = rng.uniform(5, 60, 300) * rng.choice([-1, 1], 300)
    x = np.concatenate([bulk, tail]).astype(np.float32)
    hi = float(calibrate(x).compute_range().hi)
    assert 3.0 < hi < 0.25 * np.abs(x).max()


def test_uniform_keeps_nearly_the_whole_range():
    x = np.random.default_rng(1).uniform(-1, 1, 2_000_000).astype(np.float32)
    hi = float(calibrate(x).compute_range().hi)
    assert hi >= 0.98 * np.abs(x).max()


@pytest.mark.parametrize("spec", [{"signed": False}, {"symmetric": False, "signed": True}])
def test_one_sided_codes_search_with_all_levels(spec):
    """Unsigned codes, or affine codes on non-negative data: 2**bits levels on |x| (NVIDIA's
    2**(bits - 1 + unsigned)); checked against the plain search with 256 levels."""
    x = np.maximum(np.random.default_rng(2).laplace(0, 1, 200_000), 0).astype(np.float32)
    calibrator = calibrate(x, calibrator_options={"bins": 512}, **spec)
    h = calibrator.histogram()
    magnitude = (h.positive + h.negative).astype(float).tolist()
    magnitude[0] -= h.zeros
    r = calibrator.compute_range()
    assert float(r.lo) == 0.0
    assert float(r.hi) == min(slow_kl_search(magnitude, 256) * h.width, float(x.max()))


def test_refuses_per_channel():
    with pytest.raises(CalibrationError, match="per-tensor"):
        make_calibrator(QuantSpec(calibrator="entropy", axis=0))
