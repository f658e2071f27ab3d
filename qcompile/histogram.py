"""Streaming, mergeable statistics for calibrators: histograms on a power-of-two grid, and moments.

Grid. Every row (the whole tensor, or one channel) keeps ``bins`` counts for x >= 0 and ``bins``
counts for x < 0, both indexed by |x|: bin j holds the values with j*w <= |x| < (j+1)*w. The
width is a power of two, w = 2**k, and k is the smallest integer with max|x| < bins * w, so the
data always fills more than half of the grid. Because the grid is anchored at 0 and w doubles,
widening the range merges 2**d adjacent bins into one, exactly: a value's bin at width 2**(k+d)
is floor(floor(|x| / 2**k) / 2**d) = floor(|x| / 2**(k+d)), so counts are conserved and the
result does not depend on the order or sharding of the batches (observing A then B, B then A,
or merging a histogram of A with one of B gives identical counts). |x| * 2**-k is exact in
floating point, so binning has no rounding either.

The |x| histogram used by symmetric calibrators is ``positive + negative``; asymmetric ones
read each side separately. Exact zeros are counted in ``positive[0]`` and also in ``zeros``,
because they are exactly representable and some estimates treat them apart.

Moments (count, sum, sum of squares, per row) are kept in float64 next to the counts. They give
the exact mean and standard deviation (up to float64 rounding, also under merge). The mean
absolute deviation b = E|x - mean| that ACIQ needs is not mergeable as a running sum (the mean
moves), so it is computed at the end from the histogram about the exact mean
(``Histogram.mean_absolute_deviation``): every nonzero value is replaced by its bin centre c,
and ||x - mu| - |c - mu|| <= |x - c| <= w/2, so the estimate is within w/2 <= max|x| / bins of
the exact b (exact zeros are placed at 0, not at the centre of bin 0).

Memory is O(rows * bins) whatever the number of samples. Observing uses one ``np.bincount`` over
the batch (float32 stays float32).

Also here: ``HistogramCalibrator``, the shared base of the calibrators that decide from these
statistics (percentile, entropy, mse, aciq), and ``range_for_spec``, which shapes a decided
(lo, hi) to the spec (symmetric, unsigned or affine).
"""
from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator

from .calibration import Calibrator, Range, channel_view
from .errors import CalibrationError
from .qtypes import QuantSpec

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_BINS_PER_CHANNEL",
    "Histogram",
    "HistogramCalibrator",
    "HistogramOptions",
    "Moments",
    "StreamingHistogram",
    "grid_exponent",
    "range_for_spec",
]

logger = logging.getLogger(__name__)

DEFAULT_BINS = 2048  # per tensor: TensorRT's 2048 (Migacz 2017); the data fills 1025..2048 of them
DEFAULT_BINS_PER_CHANNEL = 256  # per channel (weights): keeps memory and the MSE search small
# Lowest grid exponent: 2**-MIN_EXPONENT must stay finite in float32 (an all-zero row uses it).
MIN_EXPONENT = -120


@dataclass(frozen=True)
class Moments:
    """Count, sum and sum of squares of one row, accumulated in float64."""

    count: int
    total: float
    total_squares: float

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def variance(self, ddof: int = 0) -> float:
        if self.count <= ddof:
            return 0.0
        centred = self.total_squares - self.total * self.total / self.count
        return max(centred, 0.0) / (self.count - ddof)

    def std(self, ddof: int = 0) -> float:
        return float(np.sqrt(self.variance(ddof)))


@dataclass(frozen=True, eq=False)
class Histogram:
    """Counts of one row (tensor or channel) on the grid described in the module docstring.

    positive[j] counts x >= 0 with j*width <= x < (j+1)*width; negative[j] counts x < 0 with
    j*width <= -x < (j+1)*width. zeros counts exact zeros (they are also in positive[0]).
    min/max are the exact extremes seen.
    """

    positive: np.ndarray
    negative: np.ndarray
    width: float
    zeros: int
    min: float
    max: float

    @property
    def bins(self) -> int:
        return self.positive.size

    @property
    def count(self) -> int:
        return int(self.positive.sum() + self.negative.sum())

    @property
    def amax(self) -> float:
        """max |x|."""
        return max(-self.min, self.max, 0.0)

    @property
    def magnitude(self) -> np.ndarray:
        """Histogram of |x| on edges ``self.edges``."""
        return self.positive + self.negative

    @property
    def edges(self) -> np.ndarray:
        """Edges of the |x| bins: j * width for j = 0 .. bins."""
        return np.arange(self.bins + 1, dtype=np.float64) * self.width

    def signed(self) -> tuple[np.ndarray, np.ndarray]:
        """(counts, edges) of x itself on 2*bins bins from -bins*width to +bins*width."""
        counts = np.concatenate([self.negative[::-1], self.positive])
        edges = np.arange(-self.bins, self.bins + 1, dtype=np.float64) * self.width
        return counts, edges

    def mean_absolute_deviation(self, mean: float) -> float:
        """E|x - mean| with nonzero values at their bin centres; error <= width / 2."""
        centres = (np.arange(self.bins) + 0.5) * self.width
        deviation = (self.positive @ np.abs(centres - mean) + self.negative @ np.abs(-centres - mean)
                     - self.zeros * abs(0.5 * self.width - mean) + self.zeros * abs(mean))
        return float(deviation) / self.count if self.count else 0.0


def grid_exponent(amax: np.ndarray, bins: int) -> np.ndarray:
    """Per row, the smallest k with amax < bins * 2**k (at least MIN_EXPONENT)."""
    amax = np.asarray(amax, dtype=np.float64)
    _, e = np.frexp(amax)  # amax = f * 2**e with 0.5 <= f < 1
    k = e.astype(np.int64) - int(np.log2(bins))
    return np.where(amax > 0, np.maximum(k, MIN_EXPONENT), MIN_EXPONENT)


def _coarsened(counts: np.ndarray, shift: int) -> np.ndarray:
    """Counts (..., bins) on a grid 2**shift times wider: adjacent groups of 2**shift bins summed."""
    if shift == 0:
        return counts
    bins = counts.shape[-1]
    out = np.zeros_like(counts)
    if shift >= int(np.log2(bins)):
        out[..., 0] = counts.sum(axis=-1)
    else:
        kept = bins >> shift
        out[..., :kept] = counts.reshape(*counts.shape[:-1], kept, 1 << shift).sum(axis=-1)
    return out


def _regridded(counts: np.ndarray, exponent: np.ndarray, target: np.ndarray) -> np.ndarray:
    """counts (rows, 2, bins) moved from per-row exponents to larger-or-equal target exponents."""
    shift = target - exponent
    if not shift.any():
        return counts
    out = counts.copy()
    for d in np.unique(shift[shift > 0]):
        rows = shift == d
        out[rows] = _coarsened(counts[rows], int(d))
    return out


class StreamingHistogram:
    """Accumulates Histogram + Moments per row from batches shaped (rows, samples)."""

    def __init__(self, bins: int = DEFAULT_BINS):
        if bins < 2 or bins & (bins - 1):
            raise CalibrationError(f"histogram bins must be a power of two >= 2, got {bins}")
        self.bins = bins
        self.rows = 0
        self._counts = np.zeros((0, 2, bins), np.int64)
        self._exponent = np.zeros(0, np.int64)
        self._zeros = np.zeros(0, np.int64)
        self._min = np.zeros(0)
        self._max = np.zeros(0)
        self._count = np.zeros(0, np.int64)
        self._total = np.zeros(0)
        self._total_squares = np.zeros(0)

    def _start(self, rows: int) -> None:
        self.rows = rows
        self._counts = np.zeros((rows, 2, self.bins), np.int64)
        self._exponent = np.full(rows, MIN_EXPONENT, np.int64)
        self._zeros = np.zeros(rows, np.int64)
        self._min = np.full(rows, np.inf)
        self._max = np.full(rows, -np.inf)
        self._count = np.zeros(rows, np.int64)
        self._total = np.zeros(rows)
        self._total_squares = np.zeros(rows)

    def observe(self, rows: np.ndarray) -> None:
        """Add a batch shaped (rows, samples), e.g. ``channel_view(x, axis)``."""
        v = np.asarray(rows)
        if v.ndim != 2:
            raise CalibrationError(f"StreamingHistogram.observe expects (rows, samples), got shape {v.shape}")
        if v.dtype not in (np.float32, np.float64):
            v = v.astype(np.float64 if v.dtype.itemsize > 4 or v.dtype.kind in "iu" else np.float32)
        if v.shape[1] == 0:
            return
        if self.rows == 0:
            self._start(v.shape[0])
        elif v.shape[0] != self.rows:
            raise CalibrationError(f"batch has {v.shape[0]} channels, earlier batches had {self.rows}")
        lo = v.min(axis=1).astype(np.float64)
        hi = v.max(axis=1).astype(np.float64)
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise CalibrationError("tensor contains NaN or infinite values; cannot calibrate it")

        exponent = np.maximum(self._exponent, grid_exponent(np.maximum(-lo, hi), self.bins))
        self._counts = _regridded(self._counts, self._exponent, exponent)
        self._exponent = exponent

        scale = np.ldexp(1.0, -exponent).astype(v.dtype)
        scaled = np.abs(v)
        scaled *= scale[:, None]
        index = scaled.astype(np.intp)  # floor, exact: |x| * 2**-k has no rounding
        index += (v < 0) * np.intp(self.bins)
        if self.rows > 1:
            index += (np.arange(self.rows, dtype=np.intp) * (2 * self.bins))[:, None]
        self._counts += np.bincount(index.ravel(), minlength=self.rows * 2 * self.bins).reshape(
            self.rows, 2, self.bins)

        self._zeros += np.count_nonzero(v == 0, axis=1)
        self._min = np.minimum(self._min, lo)
        self._max = np.maximum(self._max, hi)
        self._count += v.shape[1]
        wide = v.astype(np.float64, copy=False)
        self._total += wide.sum(axis=1)
        self._total_squares += np.einsum("ij,ij->i", wide, wide)

    def merge(self, other: StreamingHistogram) -> None:
        """Add the statistics of `other`; counts are exact (the finer grid is coarsened)."""
        if other.bins != self.bins:
            raise CalibrationError(f"cannot merge histograms with {self.bins} and {other.bins} bins")
        if other.rows == 0:
            return
        if self.rows == 0:
            self._start(other.rows)
        elif other.rows != self.rows:
            raise CalibrationError(f"cannot merge statistics of {self.rows} and {other.rows} channels")
        exponent = np.maximum(self._exponent, other._exponent)
        self._counts = (_regridded(self._counts, self._exponent, exponent)
                        + _regridded(other._counts, other._exponent, exponent))
        self._exponent = exponent
        self._zeros = self._zeros + other._zeros
        self._min = np.minimum(self._min, other._min)
        self._max = np.maximum(self._max, other._max)
        self._count = self._count + other._count
        self._total = self._total + other._total
        self._total_squares = self._total_squares + other._total_squares

    def histogram(self, row: int = 0) -> Histogram:
        if self.rows == 0:
            raise CalibrationError("histogram requested before any data was observed")
        return Histogram(
            positive=self._counts[row, 0].copy(),
            negative=self._counts[row, 1].copy(),
            width=float(np.ldexp(1.0, int(self._exponent[row]))),
            zeros=int(self._zeros[row]),
            min=float(self._min[row]),
            max=float(self._max[row]),
        )

    def moments(self, row: int = 0) -> Moments:
        if self.rows == 0:
            raise CalibrationError("moments requested before any data was observed")
        return Moments(int(self._count[row]), float(self._total[row]), float(self._total_squares[row]))


def range_for_spec(lo, hi, spec: QuantSpec) -> Range:
    """Shape a decided range to the spec: (-h, h) with h = max(-lo, hi) for symmetric signed
    codes, (0, hi) for symmetric unsigned codes, (lo, hi) for affine ones. Per tensor (spec.axis
    None) the 1-element arrays become float64 scalars."""
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if spec.symmetric and spec.signed:
        h = np.maximum(np.maximum(-lo, hi), 0.0)
        lo, hi = -h, h
    elif spec.symmetric:
        lo, hi = np.zeros_like(hi), np.maximum(hi, 0.0)
    if spec.axis is None:
        return Range(np.float64(lo.reshape(-1)[0]), np.float64(hi.reshape(-1)[0]))
    return Range(lo.reshape(-1), hi.reshape(-1))


class HistogramOptions(BaseModel):
    """Options shared by histogram calibrators."""

    model_config = ConfigDict(extra="forbid")

    bins: int | None = None  # per side; power of two. None: 2048 per tensor, 256 per channel

    @field_validator("bins")
    @classmethod
    def _power_of_two(cls, value: int | None) -> int | None:
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f"bins must be a power of two >= 16, got {value}")
        return value


class HistogramCalibrator(Calibrator):
    """Base of calibrators that decide from a StreamingHistogram (one row per channel).

    Subclasses implement ``decide(histogram, moments) -> Range`` for one row (floats); this
    class observes, merges, refuses per-channel specs when ``per_channel`` is False, and shapes
    the result with range_for_spec.
    """

    Options: ClassVar[type[BaseModel]] = HistogramOptions
    per_channel: ClassVar[bool] = True

    def __init__(self, spec: QuantSpec, options: BaseModel | None = None):
        super().__init__(spec, options)
        if spec.axis is not None and not self.per_channel:
            raise CalibrationError(
                f"calibrator '{self.name}' supports per-tensor ranges only (spec.axis={spec.axis}); "
                "use 'mse', 'percentile', 'aciq' or 'max' for per-channel tensors")
        bins = self.options.bins or (DEFAULT_BINS if spec.axis is None else DEFAULT_BINS_PER_CHANNEL)
        self.statistics = StreamingHistogram(bins)

    def observe(self, x: np.ndarray) -> None:
        self.statistics.observe(channel_view(x, self.spec.axis))
        self.samples += 1

    def merge(self, other: Calibrator) -> None:
        if type(other) is not type(self) or other.spec != self.spec or other.options != self.options:
            raise CalibrationError(f"cannot merge calibrator '{other.name}' {other.spec} {other.options} "
                                   f"into '{self.name}' {self.spec} {self.options}")
        self.statistics.merge(other.statistics)
        self.samples += other.samples

    def histogram(self, row: int = 0) -> Histogram:
        return self.statistics.histogram(row)

    def compute_range(self) -> Range:
        self._require_data()
        if self.statistics.rows == 0:
            raise CalibrationError(f"calibrator '{self.name}' has observed only empty batches")
        decided = [self.decide(self.statistics.histogram(r), self.statistics.moments(r))
                   for r in range(self.statistics.rows)]
        return range_for_spec([float(d.lo) for d in decided], [float(d.hi) for d in decided], self.spec)

    @abc.abstractmethod
    def decide(self, histogram: Histogram, moments: Moments) -> Range:
        """The range of one row (tensor or channel), as float scalars."""
