"""All quantization arithmetic lives here; passes, calibrators and the executor share it.

Conventions (ONNX QuantizeLinear / DequantizeLinear, opset 13+):
    q = saturate(round_half_even(x / scale) + zero_point),   x' = (q - zero_point) * scale
Range → parameters follows Jacob et al. 2018 §2.1 (real 0 exactly representable, so the
range is widened to contain 0) and Wu et al. 2020 §3 for symmetric ("scale") quantization.
"""
from __future__ import annotations

import numpy as np

from .qtypes import QParams, QuantSpec

# Smallest scale we emit. A channel whose range is 0 (dead channel) gets this scale: its codes are
# all zero-point, any positive scale represents it exactly, and a tiny one would overflow an
# int32 bias (see bias_qparams).
_SCALE_FOR_EMPTY_RANGE = 1.0
INT32_MAX = 2**31 - 1


def round_half_even(x: np.ndarray) -> np.ndarray:
    """Round to nearest, ties to even: the rounding of ONNX QuantizeLinear and onnxruntime."""
    return np.rint(x)


def _broadcast(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    param = np.asarray(param)
    if param.ndim == 0 or axis is None:
        return param
    shape = [1] * ndim
    shape[axis] = param.size
    return param.reshape(shape)


def quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """QuantizeLinear: real values to integer codes (stored in the spec's numpy dtype).

    Computed in float32 like onnxruntime (x / scale in float32, ties to even).
    """
    x = np.asarray(x, dtype=np.float32)
    scale = _broadcast(qp.scale.astype(np.float32), x.ndim, qp.axis)
    zp = _broadcast(qp.zero_point.astype(np.float32), x.ndim, qp.axis)
    q = round_half_even(x / scale) + zp
    return np.clip(q, qp.spec.qmin, qp.spec.qmax).astype(qp.spec.numpy_type)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    """DequantizeLinear: integer codes to real values (float32)."""
    scale = _broadcast(qp.scale.astype(np.float32), np.ndim(q), qp.axis)
    zp = _broadcast(qp.zero_point.astype(np.int32), np.ndim(q), qp.axis)
    return ((np.asarray(q).astype(np.int32) - zp).astype(np.float32) * scale).astype(np.float32)


def fake_quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """Quantize then dequantize: the value a QDQ pair lets through."""
    return dequantize(quantize(x, qp), qp)


def qparams_from_range(lo, hi, spec: QuantSpec) -> QParams:
    """Scale and zero point that cover the real range [lo, hi] (scalars or per-channel arrays).

    Symmetric: scale = max(|lo|, |hi|) / qmax, zero point 0 (or 0 for unsigned codes, where the
    tensor must be non-negative), Wu et al. 2020 eq. 3. Asymmetric: the range is widened to
    contain 0 and the zero point is the integer code of real 0 (Jacob et al. 2018 §2.1),
    scale = (hi - lo) / (qmax - qmin), zero_point = round(qmin - lo / scale).
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if spec.symmetric:
        if spec.signed:
            amax = np.maximum(-lo, hi)
            scale = amax / spec.qmax
        else:
            scale = hi / spec.qmax
        zero_point = np.zeros_like(scale)
    else:
        scale = (hi - lo) / (spec.qmax - spec.qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero_point = np.clip(round_half_even(spec.qmin - lo / safe), spec.qmin, spec.qmax)
    scale = np.where(scale > 0, scale, _SCALE_FOR_EMPTY_RANGE).astype(np.float32)
    return QParams(
        scale=scale,
        zero_point=zero_point.astype(spec.numpy_type),
        spec=spec,
        lo=lo.astype(np.float32),
        hi=hi.astype(np.float32),
    )


def bias_qparams(bias: np.ndarray, input_qp: QParams, weight_qp: QParams) -> tuple[QParams, QParams]:
    """int32 bias parameters: scale = s_x * s_w, zero point 0 (Jacob et al. 2018 §2.4).

    Returns (bias_qp, weight_qp). If a bias value would overflow int32 with that scale (it
    happens for dead channels whose weights are ~1e-8 after BatchNorm folding), the weight
    scale of that channel is enlarged until it fits, as onnxruntime's quantizer does; the
    returned weight_qp then differs from the one passed in.
    """
    s_x = np.float64(input_qp.scale)
    s_w = weight_qp.scale.astype(np.float64)
    needed = np.abs(bias.astype(np.float64)) / (s_x * INT32_MAX * 0.5)
    if s_w.ndim == 0:
        needed = needed.max(initial=0.0)
    if np.any(needed > s_w):
        s_w = np.maximum(s_w, needed).astype(np.float32)
        weight_qp = QParams(s_w, weight_qp.zero_point, weight_qp.spec, weight_qp.lo, weight_qp.hi)
    bias_spec = QuantSpec(bits=32, signed=True, symmetric=True, axis=0 if np.ndim(s_w) == 1 else None,
                          calibrator="derived")
    scale = (s_x * weight_qp.scale.astype(np.float64)).astype(np.float32)
    return QParams(scale, np.zeros(np.shape(scale), np.int32), bias_spec, scale * 0, scale * 0), weight_qp


def quantize_bias(bias: np.ndarray, bias_qp: QParams) -> np.ndarray:
    """Bias to int32 codes with the s_x * s_w scale (computed in float64, then saturated)."""
    q = round_half_even(bias.astype(np.float64) / bias_qp.scale.astype(np.float64))
    return np.clip(q, -INT32_MAX - 1, INT32_MAX).astype(np.int32)
