"""Calibrator interface and the statistics runner.

A calibrator has two verbs (style guide R10): observe() accumulates statistics of one batch of a
tensor, compute_range() decides the real range [lo, hi] to quantize. It knows nothing about
models, sessions or files; qcompile.collect feeds it.
"""
from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from .errors import CalibrationError
from .qtypes import QuantSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Range:
    """Real range chosen for a tensor: scalars per tensor, 1-d arrays per channel."""

    lo: np.ndarray
    hi: np.ndarray


class NoCalibratorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Calibrator(abc.ABC):
    """Base of every calibrator; registered by name with @register_calibrator."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoCalibratorOptions

    def __init__(self, spec: QuantSpec, options: BaseModel | None = None):
        self.spec = spec
        self.options = options if options is not None else self.Options()
        self.samples = 0

    @abc.abstractmethod
    def observe(self, x: np.ndarray) -> None:
        """Accumulate statistics of one batch (for per-channel specs, channels on spec.axis)."""

    @abc.abstractmethod
    def compute_range(self) -> Range:
        """The range to quantize; raises CalibrationError if nothing was observed."""

    def merge(self, other: "Calibrator") -> None:
        """Fold in the statistics `other` (same class, spec and options) collected on another
        shard of the data, as if this calibrator had also observed other's batches, after its
        own. Exact for max, histogram and moment statistics; raises CalibrationError for a
        calibrator of another kind or spec."""
        raise NotImplementedError(f"calibrator '{self.name}' ({type(self).__name__}) cannot merge shards")

    def _require_data(self, tensor: str = "tensor") -> None:
        if self.samples == 0:
            raise CalibrationError(f"calibrator '{self.name}' has observed no data for {tensor}")


def channel_view(x: np.ndarray, axis: int | None) -> np.ndarray:
    """Reshape to (channels, -1) for per-channel statistics, or (1, -1) per tensor."""
    x = np.asarray(x)
    if axis is None:
        return x.reshape(1, -1)
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def make_calibrator(spec: QuantSpec) -> Calibrator:
    from .registry import CALIBRATORS

    cls = CALIBRATORS.get(spec.calibrator)
    return cls(spec, cls.Options(**spec.calibrator_options))
