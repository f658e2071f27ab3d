"""Requantization by mode, and the few float32 sequences needed to match onnxruntime bit for bit.

Two modes (``IntegerExecutor(mode=...)``):

- ``"onnx"``: ONNX semantics as onnxruntime's CPU provider computes them. int32 accumulators
  are requantized with a float32 multiplier, one float32 multiply, round half to even, + zero
  point, saturate (qcompile.numerics.requantize_float32 = MLAS MlasRequantizeOutput).
- ``"fixed-point"``: gemmlowp / TensorFlow Lite integer requantization, M = M0 * 2^shift with
  SaturatingRoundingDoublingHighMul (ties toward +inf, like NEON VQRDMULH) then
  RoundingDivideByPOT (ties away from zero), TFLite's default double rounding
  (qcompile.numerics.requantize_fixed_point; Jacob et al. 2018 eq. 5-6). It can be 1 LSB off
  the correctly rounded value, most often when the accumulator is small.

Both differ only in the requantization step; accumulation is exact integer arithmetic in both.

The rest of this module is onnxruntime emulation for ops whose MLAS kernels compute in float32
(QLinearAdd, the lookup tables of QLinearSigmoid / QLinearLeakyRelu / QLinearConcat,
QLinearAveragePool): float32 rounding after every operation, and fused multiply-add where the
x86-64 AVX2 kernels use it.
"""
from __future__ import annotations

import numpy as np

from ..numerics import requantize_fixed_point, requantize_float32, round_half_even
from .kernel import NodeContext, integer_range


def requantize(ctx: NodeContext, acc: np.ndarray, *, ort_multiplier: np.ndarray, real_multiplier: np.ndarray,
               zero_point: np.ndarray, dtype) -> np.ndarray:
    """int32 accumulator (bias included) -> codes of `dtype`, by the executor's mode.

    acc: integers, or a float array holding exact integers (the BLAS accumulators).
    ort_multiplier: the float32 multiplier onnxruntime computes for this op (mode "onnx").
    real_multiplier: the real multiplier in float64, the way TFLite computes it (mode
    "fixed-point"); quantized to (M0, shift) by qcompile.numerics.quantize_multiplier.
    """
    ctx.check_int32(acc)
    qmin, qmax = integer_range(dtype)
    if ctx.mode == "onnx":
        return requantize_float32(acc, np.asarray(ort_multiplier, np.float32), zero_point, qmin, qmax, dtype)
    codes = requantize_fixed_point(np.asarray(acc).astype(np.int64), np.asarray(real_multiplier, np.float64),
                                   np.asarray(zero_point).astype(np.int64), qmin, qmax)
    return codes.astype(dtype)


def tflite_real_multiplier(input_scale, weight_scale, output_scale) -> np.ndarray:
    """TFLite's effective scale: double(float(s_x * s_w)) / double(s_y) (PopulateConvolutionQuantizationParams)."""
    product = np.asarray(input_scale, np.float32) * np.asarray(weight_scale, np.float32)
    return product.astype(np.float64) / np.asarray(output_scale, np.float64)


# ------------------------------------------------------------------- float32 emulation helpers


def fma_float32(a, b, c) -> np.ndarray:
    """fl32(a * b + c) with a single rounding, like the x86 vfmadd instructions.

    a * b is exact in float64 (24 + 24 bits); the float64 sum s can round, and rounding s to
    float32 could then round twice. That goes wrong only when s lands exactly on a midpoint
    between two float32 values while the exact sum does not; the exact error of the float64
    sum (Knuth's TwoSum) tells which side the true value is on.
    """
    product = np.asarray(a, np.float32).astype(np.float64) * np.asarray(b, np.float32).astype(np.float64)
    addend = np.asarray(c, np.float32).astype(np.float64)
    s = product + addend
    virtual = s - product
    error = (product - (s - virtual)) + (addend - virtual)  # s + error == product + addend exactly
    r = s.astype(np.float32)
    gap = s - r.astype(np.float64)  # where s sits relative to the nearest float32
    neighbour = np.nextafter(r, np.where(gap > 0, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32))
    midpoint = (gap != 0) & (s == (r.astype(np.float64) + neighbour.astype(np.float64)) / 2)
    # At a midpoint numpy rounded to even; the exact value lies on the side of `error`.
    beyond = midpoint & (error != 0) & (np.sign(error) == np.sign(gap))
    return np.where(beyond, neighbour, r).astype(np.float32)


def mlas_quantize_linear(values: np.ndarray, scale, zero_point, dtype) -> np.ndarray:
    """MLAS MlasQuantizeLinear: clamp(round_half_even(fl32(v / scale)), qmin - zp, qmax - zp) + zp."""
    qmin, qmax = integer_range(dtype)
    zp = int(zero_point)
    v = np.asarray(values, np.float32) / np.float32(scale)
    v = np.clip(v, np.float32(qmin - zp), np.float32(qmax - zp))
    return (round_half_even(v).astype(np.int64) + zp).astype(dtype)


def dequantized_codes(dtype, scale, zero_point) -> np.ndarray:
    """fl32(scale * (code - zp)) for each of the 256 byte values, indexed by the code's raw byte.

    This is the first step of onnxruntime's QlinearBuildLookupTable (qlinear_lookup_table.cc).
    """
    codes = np.arange(256, dtype=np.uint8).view(dtype).astype(np.int64)
    return np.float32(scale) * (codes - int(zero_point)).astype(np.float32)


def lookup(table: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Apply a 256-entry table to 8-bit codes (indexed by raw byte, as onnxruntime does)."""
    return table[codes.view(np.uint8)]


# MlasLogisticConstants (core/mlas/lib/logistic.cpp; the rational approximation from Eigen).
_LOGISTIC_ALPHA = np.array([4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05,
                            8.51377133304701e-03, 2.48287947061529e-01], np.float32)  # alpha_9 .. alpha_1
_LOGISTIC_BETA = np.array([6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06,
                           1.70198817374094e-03, 1.16817656904453e-01, 9.93151921023180e-01],
                          np.float32)  # beta_10 .. beta_0


def mlas_logistic(x: np.ndarray) -> np.ndarray:
    """onnxruntime's float32 sigmoid (MlasComputeLogistic, AVX2/FMA3 kernel LogisticKernelFma3).

    x clamped to [-18, 18]; p = x * P(x^2), q = Q(x^2) by Horner's rule with fused
    multiply-adds; sigmoid = max(0, p / q + 0.5). Not the exact sigmoid: within a few float32
    ulps of it, which is what a bit-exact lookup table needs.
    """
    v = np.clip(np.asarray(x, np.float32), np.float32(-18.0), np.float32(18.0))
    v2 = v * v
    p = fma_float32(v2, _LOGISTIC_ALPHA[0], _LOGISTIC_ALPHA[1])
    for coefficient in _LOGISTIC_ALPHA[2:]:
        p = fma_float32(v2, p, coefficient)
    q = fma_float32(v2, _LOGISTIC_BETA[0], _LOGISTIC_BETA[1])
    for coefficient in _LOGISTIC_BETA[2:]:
        q = fma_float32(v2, q, coefficient)
    y = (v * p) / q + np.float32(0.5)
    return np.maximum(y, np.float32(0.0))
