"""`percentile` calibrator: clip at a percentile of the observed distribution.

Wu et al. 2020 ("Integer Quantization for Deep Learning Inference", arXiv:2004.09602),
percentile calibration of activations (they evaluate 99.9, 99.99, 99.999 and 99.9999; papers.md
§5.4); the histogram procedure follows NVIDIA pytorch-quantization's
``_compute_amax_percentile`` (papers.md §5.1):
the threshold is the right edge of the first bin whose cumulative count reaches p/100 of the
total.

- Symmetric specs: the p-th percentile of |x| (exact zeros included, as in numpy.percentile
  of |x|), range (-T, T), or (0, T) for unsigned codes.
- Affine specs: each side of x: hi = right edge of the first signed bin whose cumulative count
  reaches p/100 of the total, lo = left edge of the first signed bin whose cumulative count
  exceeds (1 - p/100) of it, i.e. the (100 - p)-th and p-th percentiles of x.

Both ends are capped at the observed extremes (a clip beyond the data only wastes levels), so
percentile 100 gives the max range. Error against numpy.percentile on the same data: at most
one bin width (the grid of qcompile.histogram; width <= 2 * max|x| / bins). Works per channel.
"""
from __future__ import annotations

import numpy as np
from pydantic import Field

from qcompile.calibration import Range
from qcompile.histogram import Histogram, HistogramCalibrator, HistogramOptions, Moments
from qcompile.registry import register_calibrator

__all__ = ["PercentileCalibrator", "PercentileOptions"]


class PercentileOptions(HistogramOptions):
    percentile: float = Field(99.99, gt=0.0, le=100.0)  # in percent


def upper_edge(counts: np.ndarray, edges: np.ndarray, fraction: float) -> float:
    """Right edge of the first bin whose cumulative count reaches `fraction` of the total."""
    cumulative = np.cumsum(counts)
    j = int(np.searchsorted(cumulative, fraction * cumulative[-1], side="left"))
    return float(edges[min(j, counts.size - 1) + 1])


def lower_edge(counts: np.ndarray, edges: np.ndarray, fraction: float) -> float:
    """Left edge of the first bin whose cumulative count exceeds `fraction` of the total."""
    cumulative = np.cumsum(counts)
    j = int(np.searchsorted(cumulative, fraction * cumulative[-1], side="right"))
    return float(edges[min(j, counts.size - 1)])


@register_calibrator("percentile")
class PercentileCalibrator(HistogramCalibrator):
    Options = PercentileOptions

    def decide(self, histogram: Histogram, moments: Moments) -> Range:
        fraction = self.options.percentile / 100.0
        if self.spec.symmetric:
            hi = min(upper_edge(histogram.magnitude, histogram.edges, fraction), histogram.amax)
            return Range(-hi, hi)
        counts, edges = histogram.signed()
        lo = max(lower_edge(counts, edges, 1.0 - fraction), histogram.min)
        hi = min(upper_edge(counts, edges, fraction), histogram.max)
        return Range(lo, hi)
