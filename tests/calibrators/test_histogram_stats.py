"""qcompile.histogram: grid rule, exact counts, exact merge, moments, b estimate, speed."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

from qcompile.errors import CalibrationError
from qcompile.histogram import StreamingHistogram


def grid_width(amax: float, bins: int) -> float:
    """The documented grid: smallest power of two w with amax < bins * w."""
    k = math.floor(math.log2(amax / bins)) + 1
    assert amax < bins * 2.0**k and not amax < bins * 2.0 ** (k - 1)
    return 2.0**k


def reference_counts(x: np.ndarray, width: float, bins: int):
    edges = np.arange(bins + 1) * width
    positive, _ = np.histogram(x[x >= 0], bins=edges)
    negative, _ = np.histogram(-x[x < 0], bins=edges)
    return positive, negative


def test_counts_match_numpy_histogram_on_documented_grid():
    rng = np.random.default_rng(0)
    x = (rng.laplace(0.3, 1.0, 100_000)).astype(np.float32)
    x[:100] = 0.0
    stats = StreamingHistogram(1024)
    stats.observe(x.reshape(1, -1))
    h = stats.histogram()
    width = grid_width(float(np.abs(x).max()), 1024)
    positive, negative = reference_counts(x.astype(np.float64), width, 1024)
    assert h.width == width
    np.testing.assert_array_equal(h.positive, positive)
    np.testing.assert_array_equal(h.negative, negative)
    assert h.zeros == 100 and h.count == x.size
    assert (h.min, h.max) == (float(x.min()), float(x.max()))


def test_widening_and_merging_conserve_counts_exactly():
    rng = np.random.default_rng(1)
    batches = [rng.normal(0, s, 5000).astype(np.float32) for s in (0.01, 1.0, 0.1, 300.0, 2.0)]
    one_pass = StreamingHistogram(256)
    for b in batches:
        one_pass.observe(b.reshape(1, -1))
    shard_a, shard_b = StreamingHistogram(256), StreamingHistogram(256)
    for b in batches[:2]:
        shard_a.observe(b.reshape(1, -1))
    for b in batches[2:]:
        shard_b.observe(b.reshape(1, -1))
    shard_a.merge(shard_b)
    everything = np.concatenate(batches)
    positive, negative = reference_counts(everything.astype(np.float64),
                                          grid_width(float(np.abs(everything).max()), 256), 256)
    for stats in (one_pass, shard_a):
        h = stats.histogram()
        np.testing.assert_array_equal(h.positive, positive)
        np.testing.assert_array_equal(h.negative, negative)
        assert h.count == everything.size


def test_per_channel_rows_have_their_own_grid():
    rng = np.random.default_rng(2)
    w = rng.normal(0, 1, (3, 500)) * np.array([[0.001], [1.0], [50.0]])
    stats = StreamingHistogram(128)
    stats.observe(w[:, :200])
    stats.observe(w[:, 200:] * 2)
    full = np.concatenate([w[:, :200], w[:, 200:] * 2], axis=1)
    for row in range(3):
        h = stats.histogram(row)
        positive, negative = reference_counts(full[row], grid_width(np.abs(full[row]).max(), 128), 128)
        np.testing.assert_array_equal(h.positive, positive)
        np.testing.assert_array_equal(h.negative, negative)


def test_moments_and_mean_absolute_deviation():
    rng = np.random.default_rng(3)
    x = rng.laplace(1.5, 2.0, 200_000)
    x[:5000] = 0.0
    stats = StreamingHistogram()
    for part in np.array_split(x, 7):
        stats.observe(part.reshape(1, -1))
    m, h = stats.moments(), stats.histogram()
    assert m.count == x.size
    assert m.mean == pytest.approx(x.mean(), rel=1e-12)
    assert m.std(ddof=1) == pytest.approx(x.std(ddof=1), rel=1e-9)
    exact_b = np.mean(np.abs(x - x.mean()))
    assert abs(h.mean_absolute_deviation(m.mean) - exact_b) <= h.width / 2


def test_memory_is_independent_of_samples_and_bad_input_is_refused():
    stats = StreamingHistogram(64)
    for _ in range(20):
        stats.observe(np.random.default_rng(4).normal(size=(1, 1000)))
    assert stats.histogram().positive.shape == (64,)
    with pytest.raises(CalibrationError, match="NaN"):
        stats.observe(np.array([[1.0, np.nan]]))
    with pytest.raises(CalibrationError, match="channels"):
        stats.observe(np.zeros((2, 3)))
    with pytest.raises(CalibrationError, match="power of two"):
        StreamingHistogram(1000)


def test_observing_an_activation_batch_is_fast():
    x = np.random.default_rng(5).normal(size=(1, 32 * 112 * 112)).astype(np.float32)
    stats = StreamingHistogram()
    stats.observe(x)
    start = time.perf_counter()
    for _ in range(10):
        stats.observe(x)
    per_batch = (time.perf_counter() - start) / 10
    assert per_batch < 0.05, f"observe took {per_batch * 1e3:.1f} ms per 1x32x112x112 batch"
