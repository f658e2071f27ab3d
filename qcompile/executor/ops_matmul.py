"""Integer matrix products: QLinearMatMul, MatMulInteger and com.microsoft QGemm.

acc = (A - Z_a) @ (B - Z_b) (+ C for QGemm), exact: the centred operands are multiplied with
numpy's float BLAS in float32 when every partial sum is below 2^24 (K * max|A - Z_a| *
max|B - Z_b|) and in float64 otherwise (below 2^53, asserted), so the product is exact whatever
the summation order. N-d inputs broadcast their batch dimensions like numpy.matmul.

Quantization parameters:
- QLinearMatMul / MatMulInteger: A's scale and zero point per tensor or per row (1-D, one per
  row of A), B's per tensor or per column (1-D, one per column of B); N-d parameters that
  broadcast against [..., M, 1] / [..., 1, N] are accepted too (onnxruntime accepts B's).
- QGemm (onnxruntime contrib, quant_gemm.cc): alpha, transA, transB; B's scale and zero point
  per tensor or per column; C an int32 bias broadcast to (M, N); without y_scale the output is
  float32, fl32(multiplier * float32(acc)), with multiplier fl32(fl32(alpha * s_a) * s_b).
"""
from __future__ import annotations

import numpy as np

from .kernel import MS_DOMAIN, Kernel, NodeContext, integer, integer_range, require_8bit, scalar
from .ops_conv import exact_float_dtype
from .requant import requantize, tflite_real_multiplier


def _row_param(param, a: np.ndarray) -> np.ndarray:
    """A's per-tensor / per-row parameter, shaped to broadcast against A (..., M, K) and the output."""
    param = np.asarray(param)
    if param.size == 1:
        return param.reshape(())
    if param.ndim == 1:
        if a.ndim < 2 or param.size != a.shape[-2]:
            rows = a.shape[-2] if a.ndim >= 2 else 1
            raise ValueError(f"a per-row parameter needs {rows} elements, got {param.size}")
        return param.reshape(-1, 1)
    return param


def _column_param(param, b: np.ndarray) -> np.ndarray:
    """B's per-tensor / per-column parameter, shaped to broadcast against B (..., K, N) and the output."""
    param = np.asarray(param)
    if param.size == 1:
        return param.reshape(())
    if param.ndim == 1 and param.size != b.shape[-1]:
        raise ValueError(f"a per-column parameter needs {b.shape[-1]} elements, got {param.size}")
    return param


def integer_matmul(ctx: NodeContext, a, a_zero_point, b, b_zero_point, *, b_index: int,
                   transpose_b: bool = False) -> np.ndarray:
    """(A - Z_a) @ (B - Z_b), numpy.matmul broadcasting, as a float array of exact integers.

    b_index: input index of B (B and its zero point at b_index + 2 are cached when constant).
    """
    require_8bit(ctx, a, "A")
    require_8bit(ctx, b, "B")
    if transpose_b:
        b = b.T

    def centre_b():
        zb = _column_param(0 if b_zero_point is None else b_zero_point, b).astype(np.int64)
        centred = b.astype(np.int64) - zb
        return centred, int(np.abs(centred).max(initial=0))

    try:
        za = _row_param(0 if a_zero_point is None else a_zero_point, a).astype(np.int64)
        centred_b, max_b = ctx.memo(f"b{int(transpose_b)}", (b_index, b_index + 2), centre_b)
    except ValueError as exc:
        raise ctx.error(f"zero point: {exc}") from None
    k = a.shape[-1]
    if centred_b.shape[0 if centred_b.ndim == 1 else -2] != k:
        raise ctx.error(f"inner dimensions differ: A {a.shape}, B {b.shape}")
    qmin, qmax = integer_range(a.dtype)
    max_a = int(np.max(np.maximum(za - qmin, qmax - za)))
    dtype = exact_float_dtype(k * max_a * max_b)  # every partial sum is exact in this type
    centred_a = np.subtract(a, za, dtype=dtype)
    weights = ctx.memo(f"b{int(transpose_b)}_{np.dtype(dtype).name}", (b_index, b_index + 2),
                       lambda: centred_b.astype(dtype))
    return np.matmul(centred_a, weights)


def qlinear_matmul(ctx: NodeContext, a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point=None):
    acc = integer_matmul(ctx, a, a_zero_point, b, b_zero_point, b_index=3)
    try:
        s_a = _row_param(a_scale, a)
        s_b = _column_param(b_scale, b)
    except ValueError as exc:
        raise ctx.error(f"scale: {exc}") from None
    s_y = scalar(ctx, y_scale, "y_scale")
    # onnxruntime: a_scale * b_scale[i] / y_scale in float32. float16 scales (opset 21) are
    # combined in their own precision, as the ONNX reference does, then widened exactly.
    compute = np.result_type(s_a.dtype, s_b.dtype, s_y.dtype)
    ort_m = ((s_a.astype(compute) * s_b.astype(compute)) / s_y.astype(compute)).astype(np.float32)
    real_m = tflite_real_multiplier(s_a, s_b, s_y)
    out_dtype = y_zero_point.dtype if y_zero_point is not None else a.dtype
    y = requantize(ctx, acc, ort_multiplier=ort_m, real_multiplier=real_m,
                   zero_point=scalar(ctx, y_zero_point, "y_zero_point"), dtype=out_dtype)
    return (y,)


def matmul_integer(ctx: NodeContext, a, b, a_zero_point=None, b_zero_point=None):
    acc = integer_matmul(ctx, a, a_zero_point, b, b_zero_point, b_index=1)
    ctx.check_int32(acc)
    return (acc.astype(np.int32),)


def qgemm(ctx: NodeContext, a, a_scale, a_zero_point, b, b_scale, b_zero_point, c=None, y_scale=None,
          y_zero_point=None):
    if a.ndim != 2 or b.ndim != 2:
        raise ctx.error(f"A and B must be 2-D, got {a.shape} and {b.shape}")
    if ctx.attr("transA", 0):
        a = a.T
    transpose_b = bool(ctx.attr("transB", 0))
    acc = integer_matmul(ctx, a, scalar(ctx, a_zero_point, "a_zero_point"), b, b_zero_point, b_index=3,
                         transpose_b=transpose_b)
    if transpose_b:
        b = b.T
    if c is not None:
        if c.dtype != np.int32:
            raise ctx.error(f"C must be an int32 bias, got {c.dtype}")
        acc = acc.astype(np.float64) + np.broadcast_to(c, acc.shape)  # exact: |acc| + |C| < 2^53
    ctx.check_int32(acc)
    alpha = np.float32(ctx.attr("alpha", 1.0))
    s_a = scalar(ctx, a_scale, "a_scale").astype(np.float32)
    s_b = _column_param(b_scale, b).astype(np.float32)
    scale = (alpha * s_a) * s_b  # quant_gemm.cc ComputeOutputScale, float32 left to right
    if y_scale is None:
        if y_zero_point is not None:
            raise ctx.error("y_zero_point without y_scale")
        return ((np.asarray(acc).astype(np.float32) * scale).astype(np.float32),)
    s_y = scalar(ctx, y_scale, "y_scale").astype(np.float32)
    ort_m = (scale / s_y).astype(np.float32)
    real_m = tflite_real_multiplier(alpha * s_a, s_b, s_y)
    out_dtype = y_zero_point.dtype if y_zero_point is not None else a.dtype
    y = requantize(ctx, acc, ort_multiplier=ort_m, real_multiplier=real_m,
                   zero_point=scalar(ctx, y_zero_point, "y_zero_point"), dtype=out_dtype)
    return (y,)


KERNELS: dict[tuple[str, str], Kernel] = {
    ("", "QLinearMatMul"): integer(qlinear_matmul),
    ("", "MatMulInteger"): integer(matmul_integer),
    (MS_DOMAIN, "QGemm"): integer(qgemm),
}
