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


# --------------------------------------------------------------------------------------------
# Integer requantization (int32 accumulator -> 8-bit code), two flavours.
#
# Fixed-point, Jacob et al. 2018 §2.2 eq. 5-6: the real multiplier M = S1*S2/S3 is written as
# M = M0 * 2^shift with M0 a Q31 int32 in [2^30, 2^31), and applied with integer operations
# only. The exact rounding rules are those of gemmlowp `fixedpoint/fixedpoint.h`
# (SaturatingRoundingDoublingHighMul, RoundingDivideByPOT) and TensorFlow Lite
# `kernels/internal/quantization_util.cc` / `common.h` (QuantizeMultiplier,
# MultiplyByQuantizedMultiplier, default double-rounding build): SRDHM rounds to nearest with
# ties toward +infinity, RoundingDivideByPOT to nearest with ties away from zero; rounding twice
# can be 1 LSB off the correctly rounded product.
#
# ORT-compatible float, onnxruntime MLAS `MlasRequantizeOutput` (core/mlas/lib/quantize.cpp)
# and the multiplier computed by `qlinearconv.cc` / `quantize_linear_matmul.cc`: a float32
# multiplier, one float32 multiply, round half to even (SSE cvtps2dq / NEON vcvtnq), + zero
# point, saturate. numpy float32 reproduces it bit for bit.
#
# All helpers are vectorized over numpy int64 arrays (inputs must be int32-valued).
# --------------------------------------------------------------------------------------------

INT32_MIN = -(2**31)


def _as_int64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64)


def _check_int32(x: np.ndarray, what: str) -> None:
    if x.size and (x.min() < INT32_MIN or x.max() > INT32_MAX):
        raise OverflowError(f"{what} does not fit int32 (range [{x.min()}, {x.max()}])")


def round_half_away_from_zero(x: np.ndarray) -> np.ndarray:
    """C/C++ std::round (and TFLite's TfLiteRound): nearest integer, ties away from zero."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def quantize_multiplier(multiplier) -> tuple[np.ndarray, np.ndarray]:
    """Real multiplier M >= 0 -> (M0, shift) with M ~= M0 * 2^(shift - 31), TFLite QuantizeMultiplier.

    M0 is a Q31 int32 in [2^30, 2^31) (Jacob et al. 2018 eq. 6: M = 2^-n * M0 with M0 in
    [0.5, 1); here shift = -n). Steps, as in TFLite `quantization_util.cc`:
    (q, shift) = frexp(M) so q in [0.5, 1); M0 = round(q * 2^31) with std::round (ties away
    from zero); if M0 rounds up to 2^31 it becomes 2^30 and shift += 1; a shift below -31
    would shift every bit out, so the multiplier is flushed to (0, 0). M = 0 -> (0, 0).

    Accepts a scalar or an array (per-channel multipliers); returns int64 arrays of the same
    shape (M0 values fit int32).
    """
    m = np.asarray(multiplier, dtype=np.float64)
    if np.any(m < 0) or not np.all(np.isfinite(m)):
        raise ValueError("quantize_multiplier expects finite multipliers >= 0")
    q, shift = np.frexp(m)
    m0 = round_half_away_from_zero(q * float(1 << 31)).astype(np.int64)
    shift = shift.astype(np.int64)
    carry = m0 == (1 << 31)
    m0 = np.where(carry, m0 // 2, m0)
    shift = np.where(carry, shift + 1, shift)
    flush = (m == 0) | (shift < -31)
    m0 = np.where(flush, 0, m0)
    shift = np.where(flush, 0, shift)
    return m0, shift


def saturating_rounding_doubling_high_mul(a, b) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul for int32 a, b: round(a * b / 2^31).

    Computed as (a*b + nudge) / 2^31 in int64 with C truncating division, nudge = 2^30 for
    a*b >= 0 and 1 - 2^30 otherwise (gemmlowp fixedpoint.h). The "1 -" makes negative halves
    truncate toward zero, so exact halves round toward +infinity (2.5 -> 3, -2.5 -> -2), the
    same computation as the ARM NEON VQRDMULH instruction it models; it is not ties-away-from-
    zero. The only overflow, a = b = INT32_MIN, saturates to INT32_MAX.
    """
    a = _as_int64(a)
    b = _as_int64(b)
    _check_int32(a, "SaturatingRoundingDoublingHighMul operand a")
    _check_int32(b, "SaturatingRoundingDoublingHighMul operand b")
    ab = a * b
    nudged = ab + ((1 << 30) - (ab < 0) * ((1 << 31) - 1))  # nudge 2^30, or 1 - 2^30 when ab < 0
    high = (nudged + ((nudged >> 63) & ((1 << 31) - 1))) >> 31  # C division by 2^31: truncate toward zero
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    if np.any(overflow):
        high = np.where(overflow, INT32_MAX, high)
    return high


def rounding_divide_by_pot(x, exponent) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT: x / 2^exponent rounded to nearest, ties away from zero.

    0 <= exponent <= 31. floor(x / 2^e) (arithmetic shift), plus one when the remainder
    x & (2^e - 1) exceeds (2^e - 1) >> 1, the threshold being one larger for negative x.
    """
    x = _as_int64(x)
    exponent = _as_int64(exponent)
    if np.any(exponent < 0) or np.any(exponent > 31):
        raise ValueError("rounding_divide_by_pot: exponent must be in [0, 31]")
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(x, m0, shift) -> np.ndarray:
    """TFLite MultiplyByQuantizedMultiplier: x * M0 * 2^(shift - 31), integer only.

    Default TFLite build (double rounding): left = max(shift, 0), right = max(-shift, 0);
    RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x * 2^left, M0), right).
    x, m0, shift broadcast against each other (per-channel multipliers). x * 2^left must fit
    int32, as in TFLite; OverflowError otherwise.
    """
    x = _as_int64(x)
    shift = _as_int64(shift)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    shifted = x * (np.int64(1) << left)
    _check_int32(shifted, "x * 2^left_shift in MultiplyByQuantizedMultiplier")
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, m0), right)


def requantize_fixed_point(acc, multiplier, zero_point, qmin: int, qmax: int) -> np.ndarray:
    """int32 accumulator (bias included) -> codes, gemmlowp/TFLite style.

    q = clamp(MultiplyByQuantizedMultiplier(acc, M0, shift) + zero_point, qmin, qmax), with
    (M0, shift) = quantize_multiplier(multiplier); `multiplier` is the real M = S1*S2/S3
    (float64), broadcastable against acc. Returns int64 codes.
    """
    m0, shift = quantize_multiplier(multiplier)
    scaled = multiply_by_quantized_multiplier(acc, m0, shift)
    return np.clip(scaled + _as_int64(zero_point), qmin, qmax)


def ort_requant_multiplier(input_scale, weight_scale, output_scale) -> np.ndarray:
    """The float32 multiplier onnxruntime computes for QLinearConv / QLinearMatMul.

    m = float32(float32(s_x * s_w) / s_y), evaluated left to right in float32
    (`X_scale * W_scale[i] / Y_scale` in qlinearconv.cc). Per-channel s_w gives a vector.
    """
    s_x = np.asarray(input_scale, dtype=np.float32)
    s_w = np.asarray(weight_scale, dtype=np.float32)
    s_y = np.asarray(output_scale, dtype=np.float32)
    return np.asarray((s_x * s_w) / s_y, dtype=np.float32)


def requantize_float32(acc, multiplier, zero_point, qmin: int, qmax: int, dtype=np.int64) -> np.ndarray:
    """int32 accumulator (bias included) -> codes, bit-exact with onnxruntime MlasRequantizeOutput.

    v = float32(acc) * m in float32 (one rounding each: int32 -> float32 rounds to nearest even
    above 2^24, like cvtdq2ps); v is clamped to [qmin - zp, qmax - zp], rounded half to even
    and shifted by the zero point. `multiplier` must be the float32 m (ort_requant_multiplier);
    it and zero_point broadcast against acc. `acc` is an integer array, or a float32/float64
    array holding exact integers (a float BLAS result): converting those to float32 rounds the
    same way. Returns codes as `dtype` (int64 by default).
    """
    acc = np.asarray(acc)
    m = np.asarray(multiplier)
    if m.dtype != np.float32:
        raise TypeError("requantize_float32 needs the float32 multiplier (see ort_requant_multiplier)")
    if acc.dtype.kind == "f":
        value = acc.astype(np.float32)  # exact integer -> float32: a single rounding
    else:
        acc = _as_int64(acc)
        _check_int32(acc, "accumulator")
        value = acc.astype(np.float64).astype(np.float32)  # exact in float64, one rounding to float32
    value = np.asarray(np.multiply(value, m, dtype=np.float32))
    zp = np.asarray(zero_point, dtype=np.float32)  # small integers, exact in float32
    np.clip(value, np.float32(qmin) - zp, np.float32(qmax) - zp, out=value)
    np.rint(value, out=value)
    value += zp
    return value.astype(dtype)
