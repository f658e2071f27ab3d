"""Float fallback: a few float ops for the parts of a model outside the integer region.

The executor runs these only before the first QuantizeLinear or after the last
DequantizeLinear (input normalisation, Softmax on the logits, computing a dynamic scale), or on
int64 shape tensors (shape arithmetic). Inside the integer region they are refused
(UnsupportedOpError), so a model that still has float ops between its quantize and dequantize
nodes is never silently run in float.

Plain numpy in the input's dtype (float32): exact for the arithmetic ops (Add, Sub, Mul, Div,
Min, Max, Clip, Round, Cast, ReduceMin/Max, Relu); Sigmoid and Softmax use numpy's exp and are
not bit-exact with onnxruntime's approximations (a few float32 ulps).
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from .kernel import Kernel, NodeContext, float_fallback


def _binary(numpy_fn):
    def kernel(ctx: NodeContext, a, b):
        if a.dtype != b.dtype:
            raise ctx.error(f"input types differ: {a.dtype} and {b.dtype}")
        return (numpy_fn(a, b).astype(a.dtype),)

    return kernel


def _divide(a, b):
    if a.dtype.kind in "iu":  # C-style integer division truncates toward zero
        return np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b))
    return a / b


def _variadic(numpy_fn):
    def kernel(ctx: NodeContext, *inputs):
        arrays = [x for x in inputs if x is not None]
        out = arrays[0]
        for x in arrays[1:]:
            out = numpy_fn(out, x)
        return (out,)

    return kernel


def clip(ctx: NodeContext, x, low=None, high=None):
    if ctx.opset < 11:
        low, high = ctx.attr("min"), ctx.attr("max")
    out = x
    if low is not None and np.size(low):
        out = np.maximum(out, np.asarray(low, x.dtype))
    if high is not None and np.size(high):
        out = np.minimum(out, np.asarray(high, x.dtype))
    return (out.astype(x.dtype),)


def round_(ctx: NodeContext, x):
    return (np.rint(x),)  # ONNX Round: half to even


def relu(ctx: NodeContext, x):
    return (np.maximum(x, np.zeros((), x.dtype)),)


def sigmoid(ctx: NodeContext, x):
    return ((1 / (1 + np.exp(-x))).astype(x.dtype),)


def softmax(ctx: NodeContext, x):
    axis = ctx.attr("axis", -1 if ctx.opset >= 13 else 1)
    if ctx.opset < 13:  # coerce to 2-D at axis, softmax over the flattened tail
        axis %= x.ndim
        flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
        shifted = np.exp(flat - flat.max(axis=1, keepdims=True))
        return ((shifted / shifted.sum(axis=1, keepdims=True)).reshape(x.shape).astype(x.dtype),)
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return ((shifted / shifted.sum(axis=axis, keepdims=True)).astype(x.dtype),)


def cast(ctx: NodeContext, x):
    target = np.dtype(helper.tensor_dtype_to_np_dtype(ctx.attr("to")))
    return (np.asarray(x).astype(target),)


def _reduce(numpy_fn):
    def kernel(ctx: NodeContext, x, axes=None):
        if axes is None:
            axes = ctx.attr("axes")
        if axes is not None and np.size(axes):
            axes = tuple(int(a) % x.ndim for a in np.asarray(axes).reshape(-1))
        else:
            axes = None
        if axes is None and ctx.attr("noop_with_empty_axes", 0):
            return (x,)
        return (numpy_fn(x, axis=axes, keepdims=bool(ctx.attr("keepdims", 1))),)

    return kernel


KERNELS: dict[tuple[str, str], Kernel] = {
    ("", "Add"): float_fallback(_binary(np.add)),
    ("", "Sub"): float_fallback(_binary(np.subtract)),
    ("", "Mul"): float_fallback(_binary(np.multiply)),
    ("", "Div"): float_fallback(_binary(_divide)),
    ("", "Min"): float_fallback(_variadic(np.minimum)),
    ("", "Max"): float_fallback(_variadic(np.maximum)),
    ("", "Clip"): float_fallback(clip),
    ("", "Round"): float_fallback(round_),
    ("", "Relu"): float_fallback(relu),
    ("", "Sigmoid"): float_fallback(sigmoid),
    ("", "Softmax"): float_fallback(softmax),
    ("", "Cast"): float_fallback(cast),
    ("", "ReduceMin"): float_fallback(_reduce(np.min)),
    ("", "ReduceMax"): float_fallback(_reduce(np.max)),
}
