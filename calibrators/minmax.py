"""`max` calibrator: the observed range, min/max over every sample seen.

Per tensor for activations; per channel (spec.axis) for weights. For symmetric specs the
quantizer later takes max(|lo|, |hi|) (Wu et al. 2020 §4.1, "max calibration").
"""
from __future__ import annotations

import numpy as np

from qcompile.calibration import Calibrator, Range, channel_view
from qcompile.errors import CalibrationError
from qcompile.registry import register_calibrator


@register_calibrator("max")
class MaxCalibrator(Calibrator):
    def __init__(self, spec, options=None):
        super().__init__(spec, options)
        self._lo: np.ndarray | None = None
        self._hi: np.ndarray | None = None

    def observe(self, x: np.ndarray) -> None:
        view = channel_view(x, self.spec.axis)
        lo, hi = view.min(axis=1), view.max(axis=1)
        self._lo = lo if self._lo is None else np.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else np.maximum(self._hi, hi)
        self.samples += 1

    def merge(self, other: Calibrator) -> None:
        if type(other) is not type(self) or other.spec != self.spec:
            raise CalibrationError(f"cannot merge calibrator '{other.name}' {other.spec} "
                                   f"into 'max' {self.spec}")
        if other._lo is None:
            return
        if self._lo is not None and self._lo.shape != other._lo.shape:
            raise CalibrationError(f"cannot merge max statistics of {self._lo.size} "
                                   f"and {other._lo.size} channels")
        self._lo = other._lo if self._lo is None else np.minimum(self._lo, other._lo)
        self._hi = other._hi if self._hi is None else np.maximum(self._hi, other._hi)
        self.samples += other.samples

    def compute_range(self) -> Range:
        self._require_data()
        if self.spec.axis is None:
            return Range(self._lo[0], self._hi[0])
        return Range(self._lo, self._hi)
