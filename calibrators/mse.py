"""`mse` calibrator: the clip that minimises the quantization MSE (clipping + rounding) of the data.

The expected squared error of a clip range is estimated from the histogram, with every value at
its bin centre (exact zeros at 0): E(range) = sum_j count_j * (fq(c_j) - c_j)**2, where fq is
the actual quantizer of the candidate range (qcompile.numerics.qparams_from_range: scale,
zero point, round half to even, saturation to [qmin, qmax]), so both the clipping and the
rounding error are counted. This is NVIDIA pytorch-quantization's ``_compute_amax_mse`` (the
toolkit accompanying Wu et al. 2020; papers.md §5.1) with the candidates below; for values
lying on bin centres it is the exact MSE.

Candidates: the bin edges i * width for i = i0 .. n - 1, plus the observed extreme itself (in
place of edge n), where n is the number of bins up to the last non-empty one and
i0 = min(2**(bits-1), n): below i0 bins a quantization step is narrower than a bin and the
bin-centre estimate is meaningless (NVIDIA starts at bin 128 for 8 bits). Ties: the smallest
clip.

- Symmetric signed specs: clip T over the |x| edges, range (-T, T); unsigned specs: clip over
  the positive side, range (0, T) (negative values saturate to 0 and are counted so).
- Affine specs: coordinate descent over (lo, hi) from the full range: best hi for the current lo,
  then best lo for that hi, until neither moves (a local minimum in each coordinate; the zero
  point couples the two sides, so the joint 2-d search is not separable).

Works per channel (weights): one search per channel on its own 256-bin histogram by default.
"""
from __future__ import annotations

import numpy as np

from qcompile.calibration import Range
from qcompile.histogram import Histogram, HistogramCalibrator, HistogramOptions, Moments
from qcompile.registry import register_calibrator

__all__ = ["MseCalibrator", "histogram_points", "squared_errors"]

_CHUNK = 1 << 20  # candidates x values evaluated per numpy call
_MAX_SWEEPS = 16


def squared_errors(values: np.ndarray, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                   qmin: int, qmax: int, symmetric: bool) -> np.ndarray:
    """sum(counts * (fq(values) - values)**2) for each candidate range (lo[c], hi[c])."""
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    if symmetric:
        scale = np.maximum(-lo, hi) / qmax if qmin < 0 else hi / qmax
        zero_point = np.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero_point = np.clip(np.rint(qmin - lo / np.where(scale > 0, scale, 1.0)), qmin, qmax)
    scale = np.where(scale > 0, scale, 1.0)
    out = np.empty(scale.size)
    step = max(1, _CHUNK // max(values.size, 1))
    for start in range(0, scale.size, step):
        s = scale[start:start + step, None]
        z = zero_point[start:start + step, None]
        q = np.clip(np.rint(values / s) + z, qmin, qmax)
        out[start:start + step] = ((q - z) * s - values) ** 2 @ counts
    return out


def histogram_points(histogram: Histogram) -> tuple[np.ndarray, np.ndarray]:
    """(values, counts) of the non-empty bins: centres, with exact zeros as a point at 0."""
    centres = (np.arange(histogram.bins) + 0.5) * histogram.width
    positive = histogram.positive.astype(np.float64)
    positive[0] -= histogram.zeros
    values = np.concatenate([[0.0], centres, -centres])
    counts = np.concatenate([[float(histogram.zeros)], positive, histogram.negative.astype(np.float64)])
    keep = counts > 0
    return values[keep], counts[keep]


def _clip_candidates(counts: np.ndarray, width: float, extreme: float, first: int) -> np.ndarray:
    """Edges i * width for i = min(first, n) .. n - 1, then `extreme` (see module docstring)."""
    nonempty = np.flatnonzero(counts)
    n = int(nonempty[-1]) + 1 if nonempty.size else 0
    edges = np.arange(min(first, n), n, dtype=np.float64) * width
    return np.append(edges[edges < extreme], extreme)


@register_calibrator("mse")
class MseCalibrator(HistogramCalibrator):
    Options = HistogramOptions

    def decide(self, histogram: Histogram, moments: Moments) -> Range:
        spec = self.spec
        values, counts = histogram_points(histogram)
        first = 2 ** (spec.bits - 1)

        def best(lo: np.ndarray, hi: np.ndarray) -> int:
            errors = squared_errors(values, counts, lo, hi, spec.qmin, spec.qmax, spec.symmetric)
            return int(np.argmin(errors))

        if spec.symmetric and spec.signed:
            clips = _clip_candidates(histogram.magnitude, histogram.width, histogram.amax, first)
            t = clips[best(-clips, clips)]
            return Range(-t, t)
        if spec.symmetric:
            clips = _clip_candidates(histogram.positive, histogram.width, max(histogram.max, 0.0), first)
            return Range(0.0, clips[best(np.zeros_like(clips), clips)])

        his = _clip_candidates(histogram.positive, histogram.width, max(histogram.max, 0.0), first)
        los = -_clip_candidates(histogram.negative, histogram.width, max(-histogram.min, 0.0), first)
        lo, hi = los[-1], his[-1]
        for _ in range(_MAX_SWEEPS):
            new_hi = his[best(np.full(his.size, lo), his)]
            new_lo = los[best(los, np.full(los.size, new_hi))]
            if new_hi == hi and new_lo == lo:
                break
            lo, hi = new_lo, new_hi
        return Range(lo, hi)
