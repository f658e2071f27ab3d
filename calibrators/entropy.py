"""`entropy` calibrator: TensorRT's KL-divergence threshold search (Migacz, GTC 2017 S7310).

Procedure (papers.md §5.1), on the histogram h of |x| from qcompile.histogram, per tensor:

    L = number of quantized levels for |x|: 2**bits when all codes cover one side (symmetric
        unsigned spec, or affine spec on non-negative data), else 2**(bits-1) -- NVIDIA's
        2**(bits - 1 + unsigned), 128 for signed int8
    n = number of bins up to the last non-empty one
    for i in L .. n:
        P = h[0:i], with the outlier mass sum(h[i:]) added to P[i-1]
        Q: bin k < i belongs to group floor(k * L / i) (L groups); each group's total of h is
           spread evenly over the group's bins with h > 0 (empty bins stay 0)
        D[i] = KL(P/sum(P) || Q/sum(Q))        (inf if some P > 0 meets Q = 0)
    i* = the largest i among the minimisers of D;   T = i* * width, capped at max|x|

Variant choices (papers.md §5.1 lists the alternatives):
- bin 0: exact zeros are removed from h[0] (they are exactly representable; a ReLU's zero spike
  would otherwise dominate P); other small values stay. NVIDIA overwrites h[0] with h[1] instead.
- groups: floor(k * L / i) in integer arithmetic; this is NVIDIA's np.digitize over
  linspace(0, i, L + 1) without its floating-point edge cases (the GTC pseudocode only says
  "merged into L groups").
- ties: the last (largest) argmin, as NVIDIA; threshold at the right edge of bin i* - 1
  (NVIDIA's bin_edges[i*]), not tpumlir's centre (i* + 0.5) * width.
- every i from L to n (stride 1); if n <= L there is nothing to clip and T = n * width.
- grid: the power-of-two grid of qcompile.histogram, 2048 bins by default, of which the data
  fills 1025..2048: between half of TensorRT's resolution (2048 bins over [0, max|x|]) and all
  of it.
- evaluation: all candidates at once from prefix sums (``kl_divergences``), about 10 ms for
  2048 bins; the same numbers as building P and Q per candidate, up to float rounding.
- range: (-T, T) for symmetric signed specs, (0, T) for unsigned ones; affine specs get
  (max(min, -T), min(max, T)) from the same |x| search.

Per-tensor only: a per-channel search costs a full KL scan per channel (use mse or percentile).
"""
from __future__ import annotations

import numpy as np

from qcompile.calibration import Range
from qcompile.histogram import Histogram, HistogramCalibrator, HistogramOptions, Moments
from qcompile.registry import register_calibrator

__all__ = ["EntropyCalibrator", "kl_divergences", "entropy_threshold_bins"]


def _xlogx(v: np.ndarray) -> np.ndarray:
    return np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)


def kl_divergences(h: np.ndarray, levels: int) -> np.ndarray:
    """D[i - levels] = KL(P_i || Q_i) for i = levels .. len(h), as in the module docstring.

    Vectorised over all candidates with prefix sums (O(levels) per candidate). With N = sum(h),
    outliers O = N - sum(h[:i]), group totals T_j, non-empty bins per group M_j and averages
    A_j = T_j / M_j (bin i-1 is always in the last group, floor((i-1) L / i) = L - 1):
        KL = (sum_k P_k log P_k - sum_j T_j log A_j - O log A_{L-1}) / N - log N + log sum(h[:i])
    """
    h = np.asarray(h, dtype=np.float64)
    total = h.sum()
    cum = np.concatenate([[0.0], np.cumsum(h)])
    cum_nonempty = np.concatenate([[0], np.cumsum(h > 0)])
    cum_xlogx = np.concatenate([[0.0], np.cumsum(_xlogx(h))])

    i = np.arange(levels, h.size + 1)
    outliers = total - cum[i]
    last = h[i - 1] + outliers
    p_log_p = cum_xlogx[i - 1] + _xlogx(last)

    bounds = (np.arange(levels + 1)[None, :] * i[:, None] + levels - 1) // levels  # ceil(j * i / L)
    group_totals = np.diff(cum[bounds], axis=1)
    members = np.diff(cum_nonempty[bounds], axis=1)
    averages = np.where(members > 0, group_totals / np.maximum(members, 1), 1.0)
    cross = np.sum(group_totals * np.log(averages), axis=1) + outliers * np.log(averages[:, -1])

    divergences = (p_log_p - cross) / total - np.log(total) + np.log(cum[i])
    return np.where((h[i - 1] == 0) & (outliers > 0), np.inf, divergences)  # P > 0 meets Q = 0


def entropy_threshold_bins(h: np.ndarray, levels: int) -> int:
    """i*: how many bins of h to keep (the clip is the right edge of bin i* - 1)."""
    nonempty = np.flatnonzero(h)
    n = int(nonempty[-1]) + 1 if nonempty.size else 0
    if n <= levels:
        return n
    divergences = kl_divergences(h[:n], levels)
    last_argmin = divergences.size - 1 - int(np.argmin(divergences[::-1]))
    return levels + last_argmin


@register_calibrator("entropy")
class EntropyCalibrator(HistogramCalibrator):
    Options = HistogramOptions
    per_channel = False

    def levels(self, histogram: Histogram) -> int:
        spec = self.spec
        one_sided = (spec.symmetric and not spec.signed) or (not spec.symmetric and histogram.min >= 0)
        return 2 ** (spec.bits - (0 if one_sided else 1))

    def decide(self, histogram: Histogram, moments: Moments) -> Range:
        h = histogram.magnitude
        h[0] -= histogram.zeros
        keep = entropy_threshold_bins(h, self.levels(histogram))
        t = min(keep * histogram.width, histogram.amax)
        return Range(max(histogram.min, -t), min(histogram.max, t))
