"""Quantization annotations carried by IR values: what to quantize (QuantSpec) and how (QParams)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor is to be quantized, before any data is seen.

    bits/signed pick the integer grid; symmetric forces zero point 0 (Wu et al. 2020 "scale
    quantization"); narrow drops the most negative code (int8 [-127, 127]) so that -x is
    representable, as TFLite and onnxruntime do for symmetric weights; axis is the per-channel
    axis, or None for one scale per tensor. calibrator names the registered calibrator that
    turns statistics into a range.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow: bool = False
    axis: int | None = None
    calibrator: str = "max"
    calibrator_options: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def qmin(self) -> int:
        if self.signed:
            return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)
        return 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def storage_bits(self) -> int:
        """Codes narrower than 8 bits are stored in an 8-bit container (values stay in [qmin, qmax])."""
        return 8 if self.bits <= 8 else 16 if self.bits <= 16 else 32

    @property
    def onnx_type(self) -> int:
        """The ONNX element type that stores codes of this spec."""
        table = {(8, True): TensorProto.INT8, (8, False): TensorProto.UINT8,
                 (16, True): TensorProto.INT16, (16, False): TensorProto.UINT16, (32, True): TensorProto.INT32}
        return table[(self.storage_bits, self.signed)]

    @property
    def numpy_type(self) -> type:
        table = {(8, True): np.int8, (8, False): np.uint8, (16, True): np.int16, (16, False): np.uint16,
                 (32, True): np.int32}
        return table[(self.storage_bits, self.signed)]


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of a quantized tensor: real = scale * (q - zero_point).

    scale/zero_point are 0-d arrays for per-tensor and 1-d arrays along `axis` for
    per-channel. lo/hi record the real range the calibrator chose (before any rounding of the
    zero point), for the report.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    spec: QuantSpec
    lo: np.ndarray
    hi: np.ndarray

    @property
    def axis(self) -> int | None:
        return self.spec.axis if np.ndim(self.scale) == 1 else None

    def summary(self) -> dict:
        """JSON-ready description for the report (per-channel arrays summarised)."""
        def compact(a: np.ndarray):
            a = np.asarray(a)
            return float(a) if a.ndim == 0 else {"min": float(a.min()), "max": float(a.max()), "channels": int(a.size)}

        return {
            "bits": self.spec.bits,
            "signed": self.spec.signed,
            "symmetric": self.spec.symmetric,
            "axis": self.axis,
            "calibrator": self.spec.calibrator,
            "scale": compact(self.scale),
            "zero_point": compact(self.zero_point.astype(np.float64)),
            "range": [compact(self.lo), compact(self.hi)],
        }
