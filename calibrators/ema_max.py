"""`ema_max` calibrator: exponential moving average of per-batch min and max.

Jacob et al. 2018 ("Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference") §3.1: activation ranges are collected per batch and
aggregated with an exponential moving average whose smoothing parameter is close to 1. Per
batch t, with the batch minimum m_t and maximum M_t (per channel when spec.axis is set):

    a_t = decay * a_{t-1} + (1 - decay) * m_t,    a_0 = 0
    b_t = decay * b_{t-1} + (1 - decay) * M_t,    b_0 = 0
    range = (a_t, b_t) / (1 - decay**t)

The division removes the bias toward the zero start (as Adam's moment estimates do), so the
first batch gives exactly its own min/max and, while t << 1 / (1 - decay), the range is close
to the plain average of the per-batch ranges. Default decay 0.99: a window of about 100
batches, longer than a typical calibration run, so short runs average every batch and long runs
forget the earliest ones. (Jacob et al. smooth over thousands of training steps; with a few
dozen calibration batches any decay close to 1 gives nearly the same range after bias
correction.)

Symmetric specs use max(-a, b), unsigned ones (0, b). Merging shard B into shard A gives exactly
the state of observing A's batches followed by B's: a = decay**t_B * a_A + a_B (the recurrence is
linear in the batch values and both start from 0).
"""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from qcompile.calibration import Calibrator, Range, channel_view
from qcompile.errors import CalibrationError
from qcompile.histogram import range_for_spec
from qcompile.registry import register_calibrator

__all__ = ["EmaMaxCalibrator", "EmaMaxOptions"]


class EmaMaxOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decay: float = Field(0.99, gt=0.0, lt=1.0)


@register_calibrator("ema_max")
class EmaMaxCalibrator(Calibrator):
    Options = EmaMaxOptions

    def __init__(self, spec, options=None):
        super().__init__(spec, options)
        self._lo: np.ndarray | None = None  # a_t, not yet bias-corrected
        self._hi: np.ndarray | None = None  # b_t

    def observe(self, x: np.ndarray) -> None:
        view = channel_view(x, self.spec.axis)
        if view.shape[1] == 0:
            return
        lo, hi = view.min(axis=1).astype(np.float64), view.max(axis=1).astype(np.float64)
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise CalibrationError("tensor contains NaN or infinite values; cannot calibrate it")
        if self._lo is not None and self._lo.shape != lo.shape:
            raise CalibrationError(f"batch has {lo.size} channels, earlier batches had {self._lo.size}")
        decay = self.options.decay
        self._lo = (1 - decay) * lo + (0.0 if self._lo is None else decay * self._lo)
        self._hi = (1 - decay) * hi + (0.0 if self._hi is None else decay * self._hi)
        self.samples += 1

    def merge(self, other: Calibrator) -> None:
        if type(other) is not type(self) or other.spec != self.spec or other.options != self.options:
            raise CalibrationError(f"cannot merge calibrator '{other.name}' {other.spec} {other.options} "
                                   f"into 'ema_max' {self.spec} {self.options}")
        if other._lo is None:
            return
        if self._lo is None:
            self._lo, self._hi = other._lo.copy(), other._hi.copy()
        elif self._lo.shape != other._lo.shape:
            raise CalibrationError(f"cannot merge statistics of {self._lo.size} "
                                   f"and {other._lo.size} channels")
        else:
            carry = self.options.decay ** other.samples
            self._lo = carry * self._lo + other._lo
            self._hi = carry * self._hi + other._hi
        self.samples += other.samples

    def compute_range(self) -> Range:
        self._require_data()
        correction = 1.0 - self.options.decay ** self.samples
        return range_for_spec(self._lo / correction, self._hi / correction, self.spec)
