"""Fixed-point (gemmlowp / TFLite) and ORT-float requantization helpers against hand-worked values.

Every expected value below is worked out by hand from the reference definitions quoted in
qcompile.numerics (gemmlowp fixedpoint.h, TFLite quantization_util.cc / common.h, MLAS
MlasRequantizeOutput).
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from qcompile.executor.requant import fma_float32
from qcompile.numerics import (INT32_MAX, INT32_MIN, multiply_by_quantized_multiplier, ort_requant_multiplier,
                               quantize_multiplier, requantize_fixed_point, requantize_float32,
                               rounding_divide_by_pot, saturating_rounding_doubling_high_mul)

Q30 = 1 << 30


def _qm(m):
    m0, shift = quantize_multiplier(m)
    return int(m0), int(shift)


# ----------------------------------------------------------------------------- QuantizeMultiplier


def test_quantize_multiplier_exact_powers_and_fractions():
    assert _qm(0.5) == (Q30, 0)  # 0.5 = 2^30 / 2^31
    assert _qm(1.0) == (Q30, 1)  # frexp(1) = 0.5 * 2^1
    assert _qm(0.75) == (3 * (1 << 29), 0)
    assert _qm(3.0) == (3 * (1 << 29), 2)  # multipliers > 1 get a positive (left) shift
    assert _qm(0.1) == (1717986918, -3)  # 0.8 * 2^-3; 0.8 * 2^31 = 1717986918.4 -> 1717986918


def test_quantize_multiplier_zero():
    assert _qm(0.0) == (0, 0)


def test_quantize_multiplier_rounds_ties_away_from_zero():
    # q * 2^31 = 2^30 + 2.5 exactly: std::round gives 2^30 + 3 (ties-to-even would give + 2)
    assert _qm((Q30 + 2.5) / 2**31) == (Q30 + 3, 0)


def test_quantize_multiplier_m0_rounding_up_to_2_pow_31_renormalises():
    # q = 1 - 2^-33: q * 2^31 = 2^31 - 0.25 rounds to 2^31, which does not fit; TFLite halves it
    # and bumps the shift: (2^30, shift + 1).
    assert _qm(1.0 - 2.0**-33) == (Q30, 1)


def test_quantize_multiplier_tiny_multipliers():
    assert _qm(2.0**-32) == (Q30, -31)  # the smallest shift kept
    assert _qm(2.0**-33) == (0, 0)  # shift -32 would shift every bit out: flushed to zero
    assert _qm(1e-12) == (0, 0)


def test_quantize_multiplier_vectorised_per_channel():
    m0, shift = quantize_multiplier(np.array([0.5, 0.75, 0.0, 3.0]))
    assert m0.tolist() == [Q30, 3 * (1 << 29), 0, 3 * (1 << 29)]
    assert shift.tolist() == [0, 0, 0, 2]


def test_quantize_multiplier_rejects_negative():
    with pytest.raises(ValueError):
        quantize_multiplier(-0.5)


# --------------------------------------------------------------- SaturatingRoundingDoublingHighMul


def test_srdhm_exact_products():
    assert saturating_rounding_doubling_high_mul(Q30, Q30) == 1 << 29  # 0.5 * 0.5 in Q31
    assert saturating_rounding_doubling_high_mul(100, Q30) == 50
    assert saturating_rounding_doubling_high_mul(INT32_MIN, INT32_MAX) == -INT32_MAX  # -1 * (1 - 2^-31)


def test_srdhm_ties_round_toward_positive_infinity():
    # a * b / 2^31 = +-0.5, +-1.5, +-72.5 exactly. The nudge is 2^30, or 1 - 2^30 for negative
    # products, and C division truncates: positive halves go up, negative halves toward zero.
    # (This is NEON VQRDMULH rounding, not ties away from zero.)
    assert saturating_rounding_doubling_high_mul(1, Q30) == 1
    assert saturating_rounding_doubling_high_mul(-1, Q30) == 0
    assert saturating_rounding_doubling_high_mul(3, Q30) == 2
    assert saturating_rounding_doubling_high_mul(-3, Q30) == -1
    assert saturating_rounding_doubling_high_mul(-116, 5 * (1 << 28)) == -72  # -116 * 0.625 = -72.5


def test_srdhm_non_ties_round_to_nearest():
    assert saturating_rounding_doubling_high_mul(5, 1717986918) == 4  # 5 * 0.79999999981 = 3.9999999991
    assert saturating_rounding_doubling_high_mul(-7, 3 * (1 << 29)) == -5  # -5.25 -> -5
    assert saturating_rounding_doubling_high_mul(-7, 5 * (1 << 28)) == -4  # -4.375 -> -4


def test_srdhm_int32_min_squared_saturates():
    assert saturating_rounding_doubling_high_mul(INT32_MIN, INT32_MIN) == INT32_MAX
    out = saturating_rounding_doubling_high_mul(np.array([INT32_MIN, INT32_MIN, 4]), np.array([INT32_MIN, 1, Q30]))
    assert out.tolist() == [INT32_MAX, -1, 2]


def test_srdhm_matches_the_c_definition_on_random_int32():
    rng = np.random.default_rng(0)
    a = rng.integers(INT32_MIN, INT32_MAX, 2000, endpoint=True)
    b = rng.integers(INT32_MIN, INT32_MAX, 2000, endpoint=True)
    expected = []
    for x, y in zip(a.tolist(), b.tolist()):
        ab = x * y
        v = ab + ((1 << 30) if ab >= 0 else 1 - (1 << 30))
        expected.append(abs(v) // (1 << 31) * (1 if v >= 0 else -1))  # C truncating division
    assert saturating_rounding_doubling_high_mul(a, b).tolist() == expected


def test_srdhm_rejects_non_int32_operands():
    with pytest.raises(OverflowError):
        saturating_rounding_doubling_high_mul(2**31, 1)


# --------------------------------------------------------------------------- RoundingDivideByPOT


def test_rounding_divide_by_pot_ties_away_from_zero():
    assert rounding_divide_by_pot(5, 1) == 3  # 2.5
    assert rounding_divide_by_pot(-5, 1) == -3  # -2.5
    assert rounding_divide_by_pot(6, 2) == 2  # 1.5
    assert rounding_divide_by_pot(-6, 2) == -2  # -1.5
    assert rounding_divide_by_pot(-73, 1) == -37  # -36.5


def test_rounding_divide_by_pot_nearest():
    assert rounding_divide_by_pot(-7, 2) == -2  # -1.75
    assert rounding_divide_by_pot(-5, 2) == -1  # -1.25
    assert rounding_divide_by_pot(9, 3) == 1  # 1.125
    assert rounding_divide_by_pot(123, 0) == 123
    assert rounding_divide_by_pot(INT32_MIN, 31) == -1
    assert rounding_divide_by_pot(INT32_MAX, 31) == 1  # 0.99999999953


def test_rounding_divide_by_pot_exponent_range():
    with pytest.raises(ValueError):
        rounding_divide_by_pot(1, 32)
    with pytest.raises(ValueError):
        rounding_divide_by_pot(1, -1)


# ------------------------------------------------------------------ MultiplyByQuantizedMultiplier


def test_multiply_by_quantized_multiplier_hand_worked():
    assert multiply_by_quantized_multiplier(100, *quantize_multiplier(0.5)) == 50
    # 3 * 0.25: SRDHM(3, 2^30) = 1.5 -> 2, then RoundingDivideByPOT(2, 1) = 1 (exact 0.75 -> 1)
    assert multiply_by_quantized_multiplier(3, *quantize_multiplier(0.25)) == 1
    # left shift for M > 1: 3 * 3.0 = SRDHM(3 * 2^2, 0.75 * 2^31) = 9
    assert multiply_by_quantized_multiplier(3, *quantize_multiplier(3.0)) == 9
    assert multiply_by_quantized_multiplier(-1000, *quantize_multiplier(0.1)) == -100


def test_multiply_by_quantized_multiplier_double_rounding():
    # M = 0.312500011641... (float32 scales 0.05 / (0.04 * 4)) -> M0 = 1342177330, shift -1.
    # -116 * M = -36.2500013 should round to -36, but SRDHM rounds -72.5000027 to -73 first and
    # RoundingDivideByPOT(-73, 1) = -36.5 -> -37: TFLite's default double rounding, 1 LSB off.
    m = float(np.float32(0.05)) / (float(np.float32(0.04)) * 4)
    assert _qm(m) == (1342177330, -1)
    assert multiply_by_quantized_multiplier(-116, *quantize_multiplier(m)) == -37


def test_multiply_by_quantized_multiplier_per_channel_broadcast():
    m0, shift = quantize_multiplier(np.array([0.5, 0.25]).reshape(2, 1))
    out = multiply_by_quantized_multiplier(np.array([[10, -10, 7], [10, -10, 7]]), m0, shift)
    assert out.tolist() == [[5, -5, 4], [3, -3, 2]]  # 3.5 -> 4; 2.5 -> 3, -2.5 -> -3, 1.75 -> 2


def test_multiply_by_quantized_multiplier_left_shift_overflow():
    with pytest.raises(OverflowError):
        multiply_by_quantized_multiplier(Q30, *quantize_multiplier(3.0))  # 2^30 * 2^2 leaves int32


def test_requantize_fixed_point_adds_zero_point_and_saturates():
    out = requantize_fixed_point(np.array([-1000, 0, 200, 2000, 3]), 0.1, 10, 0, 255)
    assert out.tolist() == [0, 10, 30, 210, 10]  # 0.3 -> 0


# ------------------------------------------------------------------------- ORT float requantization


def test_ort_requant_multiplier_is_float32_left_to_right():
    m = ort_requant_multiplier(0.1, np.array([0.2, 0.3]), 0.7)
    expected = [(np.float32(0.1) * np.float32(w)) / np.float32(0.7) for w in (0.2, 0.3)]
    assert m.dtype == np.float32 and m.tolist() == [float(e) for e in expected]


def test_requantize_float32_ties_to_even_and_saturation():
    acc = np.array([-300, 0, 301, 303, 1000])
    out = requantize_float32(acc, np.float32(0.5), 10, 0, 255)
    assert out.tolist() == [0, 10, 160, 162, 255]  # 150.5 -> 150, 151.5 -> 152


def test_requantize_float32_rounds_large_accumulators_to_float32_first():
    # 2^24 + 1 becomes 2^24 in float32, so 2^24 * 2^-25 = 0.5 rounds to even 0, though the
    # exact (2^24 + 1) * 2^-25 = 0.50000003 would round to 1: bit-exact with MLAS, not with exact math.
    assert requantize_float32(2**24 + 1, np.float32(2.0**-25), 0, 0, 255) == 0
    assert requantize_fixed_point(2**24 + 1, 2.0**-25, 0, 0, 255) == 1


def test_requantize_float32_accepts_exact_float_accumulators():
    acc = np.array([-300, 0, 301, 2**24 + 1])
    for as_float in (acc.astype(np.float64), acc[:3].astype(np.float32)):
        expected = requantize_float32(acc[: as_float.size], np.float32(0.5), 10, 0, 255)
        assert requantize_float32(as_float, np.float32(0.5), 10, 0, 255).tolist() == expected.tolist()


def test_requantize_float32_needs_a_float32_multiplier():
    with pytest.raises(TypeError):
        requantize_float32(np.array([1]), 0.5, 0, 0, 255)


# ---------------------------------------------------------------------------- float32 FMA emulation


def _exact_fma32(a: float, b: float, c: float) -> np.float32:
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    guess = np.float32(float(exact))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    return min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact), int(np.float32(v).view(np.uint32)) & 1))


def test_fma_float32_is_correctly_rounded():
    rng = np.random.default_rng(1)
    a = rng.integers(-255, 256, 3000).astype(np.float32)
    b = (rng.random(3000) * 2.0 ** rng.integers(-24, 4, 3000)).astype(np.float32)
    c = rng.normal(0, 50, 3000).astype(np.float32)
    got = fma_float32(a, b, c)
    expected = np.array([_exact_fma32(float(x), float(y), float(z)) for x, y, z in zip(a, b, c)], np.float32)
    assert np.array_equal(got, expected)


def test_fma_float32_single_rounding_differs_from_multiply_then_add():
    # a * b = 2^-24 - 2^-70 exactly; fl32(a * b) = 2^-24, so c + fl32(a * b) lands on the float32
    # tie 1 + 2^-23 + 2^-24 and rounds to even (1 + 2^-22), while the exact sum lies just below
    # the tie and a fused multiply-add gives 1 + 2^-23.
    a, b, c = np.float32(1 + 2.0**-23), np.float32(2.0**-24 - 2.0**-47), np.float32(1 + 2.0**-23)
    assert fma_float32(a, b, c) == np.float32(1 + 2.0**-23)
    assert (a * b) + c == np.float32(1 + 2.0**-22)
