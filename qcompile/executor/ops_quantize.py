"""The boundary of the integer region: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear.

These are the only kernels that touch float values on purpose. Semantics follow the ONNX spec
(opsets 10 to 25: per-tensor, per-axis, blocked; default zero point and uint8 output when it
is omitted; output_dtype) computed in float32 as onnxruntime and the ONNX reference do:

    QuantizeLinear:   q = saturate(round_half_even(fl32(x / scale)) + zero_point)
    DequantizeLinear: x = fl32(float32(q - zero_point) * scale)

Codes may be int8/uint8/int16/uint16 and (via ml_dtypes) int4/uint4/int2/uint2; DequantizeLinear
also accepts int32 (bias). Float8 / float4 codes are not integers and are refused.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ..numerics import round_half_even
from .kernel import Kernel, NodeContext, integer, integer_range

_INTEGER_CODE_TYPES = {
    TensorProto.UINT8, TensorProto.INT8, TensorProto.UINT16, TensorProto.INT16,
    TensorProto.UINT4, TensorProto.INT4, TensorProto.UINT2, TensorProto.INT2,
}


def _integer_code_dtype(ctx: NodeContext, dtype) -> np.dtype:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    if elem not in _INTEGER_CODE_TYPES and not (ctx.node.op_type == "DequantizeLinear" and elem == TensorProto.INT32):
        raise ctx.error(f"{TensorProto.DataType.Name(elem).lower()} codes are not integer codes; "
                        "the integer executor supports int8/uint8/int16/uint16/int4/uint4/int2/uint2")
    return np.dtype(dtype)


def _broadcast_param(ctx: NodeContext, param: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Scale / zero point -> array broadcastable to `shape`: per-tensor, per-axis or blocked."""
    param = np.asarray(param)
    axis = ctx.attr("axis", 1)
    block_size = ctx.attr("block_size", 0)
    if param.size == 1 and not block_size:
        return param.reshape(())
    rank = len(shape)
    if not -rank <= axis < rank:
        raise ctx.error(f"axis {axis} is out of range for a rank-{rank} input")
    axis %= rank
    if block_size:  # blocked: param has the input's shape except along axis, one value per block
        expanded = np.repeat(param, block_size, axis=axis)
        expanded = expanded.take(np.arange(shape[axis]), axis=axis)
        if expanded.shape != tuple(shape):
            raise ctx.error(f"{what} of shape {param.shape} does not block input shape {shape} "
                            f"with block_size {block_size} along axis {axis}")
        return expanded
    if param.ndim != 1 or param.size != shape[axis]:
        raise ctx.error(f"per-axis {what} must be 1-D with {shape[axis]} elements (axis {axis}), "
                        f"got shape {param.shape}")
    view = [1] * rank
    view[axis] = param.size
    return param.reshape(view)


def quantize_linear(ctx: NodeContext, x, scale, zero_point=None):
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float16):
        raise ctx.error(f"input must be float32 (or float16), got {x.dtype}")
    output_dtype = ctx.attr("output_dtype", 0)
    if zero_point is not None:
        dtype = _integer_code_dtype(ctx, zero_point.dtype)
        if output_dtype and helper.np_dtype_to_tensor_dtype(dtype) != output_dtype:
            raise ctx.error("output_dtype disagrees with the zero point's type")
    else:
        dtype = _integer_code_dtype(ctx, helper.tensor_dtype_to_np_dtype(output_dtype) if output_dtype else np.uint8)
    precision = ctx.attr("precision", 0)
    compute = helper.tensor_dtype_to_np_dtype(precision) if precision else np.result_type(x.dtype, scale.dtype)
    scale = _broadcast_param(ctx, scale, x.shape, "scale").astype(compute)
    zp = 0 if zero_point is None else _broadcast_param(ctx, zero_point, x.shape, "zero point").astype(np.int64)
    qmin, qmax = integer_range(dtype)
    rounded = round_half_even(x.astype(compute) / scale).astype(np.float64)  # float64 holds every code exactly
    codes = np.clip(rounded + zp, qmin, qmax)
    return (codes.astype(np.int64).astype(dtype),)


def dequantize_linear(ctx: NodeContext, x, scale, zero_point=None):
    x = np.asarray(x)
    _integer_code_dtype(ctx, x.dtype)
    if x.dtype == np.int32 and zero_point is not None and np.any(np.asarray(zero_point) != 0):
        raise ctx.error("int32 input takes no (or a zero) zero point")
    if zero_point is not None and np.dtype(zero_point.dtype) != x.dtype:
        raise ctx.error(f"zero point type {zero_point.dtype} differs from input type {x.dtype}")
    out_elem = ctx.attr("output_dtype", 0)
    out_dtype = helper.tensor_dtype_to_np_dtype(out_elem) if out_elem else np.asarray(scale).dtype
    scale = _broadcast_param(ctx, scale, x.shape, "scale").astype(np.float32)
    zp = 0 if zero_point is None else _broadcast_param(ctx, zero_point, x.shape, "zero point").astype(np.int64)
    centred = (x.astype(np.int64) - zp).astype(np.float64).astype(np.float32)  # exact, or one rounding above 2^24
    return ((centred * scale).astype(out_dtype),)


def dynamic_quantize_linear(ctx: NodeContext, x):
    """uint8 codes with a scale and zero point computed from the tensor's range (ONNX opset 11).

    scale = (max(0, max x) - min(0, min x)) / 255 and zero_point = round(saturate(-min/scale)),
    all in float32. For an all-zero tensor the spec divides by zero; we follow onnxruntime
    (dynamicquantizelinear.cc), which uses scale 1.0 there.
    """
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise ctx.error(f"input must be float32, got {x.dtype}")
    hi = np.float32(max(0.0, float(x.max()))) if x.size else np.float32(0)
    lo = np.float32(min(0.0, float(x.min()))) if x.size else np.float32(0)
    scale = np.float32(1.0) if hi == lo else (hi - lo) / np.float32(255)
    zero_point = round_half_even(np.clip(np.float32(0) - lo / scale, np.float32(0), np.float32(255)))
    codes = np.clip(round_half_even(x / scale) + zero_point, 0, 255)
    return codes.astype(np.uint8), np.asarray(scale, np.float32), np.asarray(zero_point).astype(np.uint8)


KERNELS: dict[tuple[str, str], Kernel] = {
    ("", "QuantizeLinear"): integer(quantize_linear),
    ("", "DequantizeLinear"): integer(dequantize_linear),
    ("", "DynamicQuantizeLinear"): integer(dynamic_quantize_linear),
}
