"""Elementwise quantized ops (onnxruntime com.microsoft contrib ops).

QLinearAdd, QLinearMul (numpy broadcasting), QLinearLeakyRelu, QLinearSigmoid, QLinearConcat;
all per-tensor scales and zero points, 8-bit codes.

Mode "onnx" reproduces onnxruntime's x86-64 MLAS kernels (qladd_avx2.cpp, qlmul.cpp,
qlinear_lookup_table.cc), which compute in float32:
- QLinearAdd: r_a = fl32(s_a / s_c), r_b = fl32(s_b / s_c); fixed = fl32(z_c - fma(r_a, z_a, r_b z_b));
  out = round_half_even(fma(a, r_a, fma(b, r_b, fixed))) on raw codes, saturated. When A is
  constant along the innermost broadcast run, onnxruntime hands it to MLAS as the second
  (scalar) operand, which swaps the roles of a and b in that formula; we do the same
  (_ort_scalar_operand), so results match bit for bit.
- QLinearMul: out = round_half_even(fl32(fl32(float((a - z_a)(b - z_b)) * r) + z_c)),
  r = fl32(fl32(s_a * s_b) / s_c).
- QLinearSigmoid / QLinearLeakyRelu / QLinearConcat (when an input's scale or zero point differs
  from the output's): a 256-entry lookup table built once from the scales, the standard integer
  implementation of a unary op on 8-bit codes. Entry i = MlasQuantizeLinear(f(fl32(s_x (i - z_x))))
  with f = onnxruntime's float32 logistic approximation (requant.mlas_logistic), the float32
  leaky relu, or the identity. Float math happens only while building the table.
The FMA and operand-order details are those of onnxruntime's x86-64 (AVX2/FMA) build, the
reference we test against; builds for other CPUs (NEON integer QLinearAdd, no FMA) can differ
from it, and so from us, by 1 LSB on rare ties.

Mode "fixed-point" uses the TensorFlow Lite integer kernels instead:
- QLinearAdd: reference_ops::Add with left_shift 20: each centred input is scaled by 2^20 and a
  Q31 multiplier s_i / (2 max(s_a, s_b)), summed, and rescaled to the output.
- QLinearMul: (a - z_a)(b - z_b) requantized with M = s_a s_b / s_c.
- QLinearLeakyRelu: integer LeakyRelu (two multipliers, identity and alpha).
- QLinearConcat: each input requantized with M = s_x / s_y (copied when the parameters agree).
- QLinearSigmoid: TFLite's LUTPopulate table (float32 sigmoid, ties away from zero).
"""
from __future__ import annotations

import numpy as np

from ..numerics import (multiply_by_quantized_multiplier, quantize_multiplier, round_half_away_from_zero,
                        round_half_even)
from .kernel import MS_DOMAIN, Affine, Kernel, NodeContext, affine, integer, integer_range, require_8bit
from .requant import dequantized_codes, fma_float32, lookup, mlas_logistic, mlas_quantize_linear

_TFLITE_ADD_LEFT_SHIFT = 20  # reference_ops::Add for 8-bit inputs


def _saturate(values: np.ndarray, dtype) -> np.ndarray:
    qmin, qmax = integer_range(dtype)
    return np.clip(values, qmin, qmax).astype(dtype)


def _ort_scalar_operand(shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> int | None:
    """Which input onnxruntime's broadcaster passes to the MLAS kernel as a scalar (0, 1 or None).

    A one-element input is a scalar for the whole op. Otherwise the broadcaster walks spans of
    the innermost run of output dimensions that share one broadcast pattern; an input that is
    broadcast (size 1) along that run is a scalar within each span.
    """
    if int(np.prod(shape_a)) == 1:
        return 0
    if int(np.prod(shape_b)) == 1:
        return 1
    rank = max(len(shape_a), len(shape_b))
    a = (1,) * (rank - len(shape_a)) + tuple(shape_a)
    b = (1,) * (rank - len(shape_b)) + tuple(shape_b)
    for da, db in zip(reversed(a), reversed(b)):
        if max(da, db) == 1:
            continue
        if da == 1:
            return 0
        if db == 1:
            return 1
        return None
    return None


def _ort_qlinear_add(a, ra, za, b, rb, zb, zc) -> np.ndarray:
    """MlasQLinearAddKernelAvx2Helper on raw codes: round(fma(a, r_a, fma(b, r_b, fixed))).

    onnxruntime's x86-64 build contracts the scalar expression r_a z_a + r_b z_b into
    fma(r_a, z_a, r_b z_b), and the scalar-operand path (fixed + b r_b, written with separate
    multiply and add intrinsics) into fma(b, r_b, fixed) as well (GCC -ffp-contract=fast), so
    both paths reduce to this formula; only the roles of a and b depend on the broadcast.
    """
    fixed = np.float32(zc) - fma_float32(ra, np.float32(za), rb * np.float32(zb))
    inner = fma_float32(b.astype(np.float32), rb, fixed)
    return round_half_even(fma_float32(a.astype(np.float32), ra, inner))


def _binary_operands(ctx: NodeContext, a, b) -> None:
    require_8bit(ctx, a, "A")
    require_8bit(ctx, b, "B")
    if a.dtype != b.dtype:
        raise ctx.error(f"A and B must have the same type, got {a.dtype} and {b.dtype}")


def qlinear_add(ctx: NodeContext, a, a_scale, a_zero_point, b, b_scale, b_zero_point, c_scale, c_zero_point=None):
    _binary_operands(ctx, a, b)
    pa, pb, pc = (affine(ctx, a_scale, a_zero_point, "A"), affine(ctx, b_scale, b_zero_point, "B"),
                  affine(ctx, c_scale, c_zero_point, "C"))
    if ctx.mode == "onnx":
        r_a, r_b = pa.scale / pc.scale, pb.scale / pc.scale
        out_shape = np.broadcast_shapes(a.shape, b.shape)
        wide_a, wide_b = np.broadcast_to(a, out_shape), np.broadcast_to(b, out_shape)
        if _ort_scalar_operand(a.shape, b.shape) == 0:  # onnxruntime swaps: B is the vector, A the scalar
            values = _ort_qlinear_add(wide_b, r_b, pb.zero_point, wide_a, r_a, pa.zero_point, pc.zero_point)
        else:
            values = _ort_qlinear_add(wide_a, r_a, pa.zero_point, wide_b, r_b, pb.zero_point, pc.zero_point)
        return (_saturate(values, a.dtype),)
    # TFLite reference_ops::Add
    twice_max = 2.0 * max(float(pa.scale), float(pb.scale))
    total = 0
    for codes, p in ((a, pa), (b, pb)):
        m0, shift = quantize_multiplier(float(p.scale) / twice_max)
        shifted = (codes.astype(np.int64) - p.zero_point) << _TFLITE_ADD_LEFT_SHIFT
        total = total + multiply_by_quantized_multiplier(shifted, m0, shift)
    m0, shift = quantize_multiplier(twice_max / ((1 << _TFLITE_ADD_LEFT_SHIFT) * float(pc.scale)))
    return (_saturate(multiply_by_quantized_multiplier(total, m0, shift) + pc.zero_point, a.dtype),)


def qlinear_mul(ctx: NodeContext, a, a_scale, a_zero_point, b, b_scale, b_zero_point, c_scale, c_zero_point=None):
    _binary_operands(ctx, a, b)
    pa, pb, pc = (affine(ctx, a_scale, a_zero_point, "A"), affine(ctx, b_scale, b_zero_point, "B"),
                  affine(ctx, c_scale, c_zero_point, "C"))
    product = (a.astype(np.int64) - pa.zero_point) * (b.astype(np.int64) - pb.zero_point)  # exact, |.| <= 255^2
    if ctx.mode == "onnx":
        ratio = (pa.scale * pb.scale) / pc.scale
        values = round_half_even(product.astype(np.float32) * ratio + np.float32(pc.zero_point))
    else:
        m0, shift = quantize_multiplier(float(np.float32(pa.scale * pb.scale)) / float(pc.scale))
        values = multiply_by_quantized_multiplier(product, m0, shift) + pc.zero_point
    return (_saturate(values, a.dtype),)


# ------------------------------------------------------------------------------ lookup tables


def _ort_table(dtype, x: Affine, y: Affine, function) -> np.ndarray:
    """onnxruntime QlinearBuildLookupTable: quantize(function(dequantize(code))) for all 256 codes."""
    return mlas_quantize_linear(function(dequantized_codes(dtype, x.scale, x.zero_point)), y.scale, y.zero_point, dtype)


def qlinear_sigmoid(ctx: NodeContext, x, x_scale, x_zero_point, y_scale, y_zero_point=None):
    require_8bit(ctx, x, "X")
    px, py = affine(ctx, x_scale, x_zero_point, "X"), affine(ctx, y_scale, y_zero_point, "Y")

    def build() -> np.ndarray:
        if ctx.mode == "onnx":
            return _ort_table(x.dtype, px, py, mlas_logistic)
        # TFLite LUTPopulate: float32 transform, multiply by 1 / s_y, TfLiteRound (ties away from zero).
        real = dequantized_codes(x.dtype, px.scale, px.zero_point)
        sigmoid = np.float32(1) / (np.float32(1) + np.exp(-real))
        return _saturate(round_half_away_from_zero(sigmoid * (np.float32(1) / py.scale)) + py.zero_point, x.dtype)

    return (lookup(ctx.memo("table", (1, 2, 3, 4), build), x),)


def qlinear_leaky_relu(ctx: NodeContext, x, x_scale, x_zero_point, y_scale, y_zero_point=None):
    require_8bit(ctx, x, "X")
    px, py = affine(ctx, x_scale, x_zero_point, "X"), affine(ctx, y_scale, y_zero_point, "Y")
    alpha = np.float32(ctx.attr("alpha", 0.01))

    def build() -> np.ndarray:
        if ctx.mode == "onnx":
            return _ort_table(x.dtype, px, py, lambda v: np.where(v >= 0, v, alpha * v))
        # TFLite reference_ops::LeakyRelu (integer): identity and alpha multipliers.
        if alpha < 0:
            raise ctx.error("fixed-point LeakyRelu needs alpha >= 0")
        centred = np.arange(256, dtype=np.uint8).view(x.dtype).astype(np.int64) - px.zero_point
        identity = quantize_multiplier(float(px.scale) / float(py.scale))
        leak = quantize_multiplier(float(alpha) * float(px.scale) / float(py.scale))
        scaled = np.where(centred >= 0, multiply_by_quantized_multiplier(centred, *identity),
                          multiply_by_quantized_multiplier(centred, *leak))
        return _saturate(scaled + py.zero_point, x.dtype)

    return (lookup(ctx.memo("table", (1, 2, 3, 4), build), x),)


def qlinear_concat(ctx: NodeContext, y_scale, y_zero_point, *triples):
    if len(triples) == 0 or len(triples) % 3:
        raise ctx.error("inputs after Y_scale, Y_zero_point must be (X, X_scale, X_zero_point) triples")
    axis = ctx.attr("axis")
    if axis is None:
        raise ctx.error("attribute 'axis' is required")
    py = affine(ctx, y_scale, y_zero_point, "Y")
    dtype = np.asarray(y_zero_point).dtype if y_zero_point is not None else triples[0].dtype
    parts = []
    for index in range(0, len(triples), 3):
        x, x_scale, x_zero_point = triples[index:index + 3]
        what = f"input {index // 3}"
        require_8bit(ctx, x, what)
        if x.dtype != dtype:
            raise ctx.error(f"{what} is {x.dtype}, output is {np.dtype(dtype)}")
        px = affine(ctx, x_scale, x_zero_point, what)
        if px == py:
            parts.append(x)
        elif ctx.mode == "onnx":  # inputs 2 + index .. 4 + index are this triple
            table = ctx.memo(f"table{index}", (0, 1, index + 3, index + 4),
                             lambda: _ort_table(dtype, px, py, lambda v: v))
            parts.append(lookup(table, x))
        else:
            m0, shift = quantize_multiplier(float(px.scale) / float(py.scale))
            scaled = multiply_by_quantized_multiplier(x.astype(np.int64) - px.zero_point, m0, shift)
            parts.append(_saturate(scaled + py.zero_point, dtype))
    return (np.concatenate(parts, axis=axis),)


KERNELS: dict[tuple[str, str], Kernel] = {
    (MS_DOMAIN, "QLinearAdd"): integer(qlinear_add),
    (MS_DOMAIN, "QLinearMul"): integer(qlinear_mul),
    (MS_DOMAIN, "QLinearSigmoid"): integer(qlinear_sigmoid),
    (MS_DOMAIN, "QLinearLeakyRelu"): integer(qlinear_leaky_relu),
    (MS_DOMAIN, "QLinearConcat"): integer(qlinear_concat),
}
