"""Data movement and shape plumbing: exact on integer codes, so allowed anywhere in the graph.

Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Concat, Pad, Slice, Identity, Shape, Gather,
Constant, ConstantOfShape. (Arithmetic on int64 shape tensors, e.g. Cast / Mul / Div, uses the
float-fallback kernels, which the executor allows anywhere when every input is int64.)

Concat of codes is only meaningful when its inputs share one scale and zero point, and Pad of
codes with the zero point as constant value; the lowering guarantees both (the executor sees
codes, not scales, and cannot check it).
"""
from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from .kernel import Kernel, NodeContext, movement


def _ints(array) -> list[int]:
    return [int(v) for v in np.asarray(array).reshape(-1)]


def _axes(ctx: NodeContext, axes_input) -> list[int] | None:
    """Axes from the input (opset 13+, or 18+ for reductions) or the attribute (older opsets)."""
    if axes_input is not None:
        return _ints(axes_input)
    axes = ctx.attr("axes")
    return None if axes is None else list(axes)


def identity(ctx: NodeContext, x):
    return (x,)


def reshape(ctx: NodeContext, data, shape=None):
    if shape is None:  # opset 1-4: shape attribute
        shape = ctx.attr("shape")
    target = _ints(shape)
    if not ctx.attr("allowzero", 0):
        target = [data.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return (data.reshape(target),)


def flatten(ctx: NodeContext, x):
    axis = ctx.attr("axis", 1) % (x.ndim + 1) if x.ndim else 0
    outer = int(np.prod(x.shape[:axis])) if axis else 1
    return (x.reshape(outer, -1),)


def transpose(ctx: NodeContext, x):
    perm = ctx.attr("perm")
    return (np.ascontiguousarray(np.transpose(x, perm)),)


def squeeze(ctx: NodeContext, x, axes=None):
    axes = _axes(ctx, axes)
    if axes is None:
        return (np.squeeze(x),)
    return (np.squeeze(x, axis=tuple(a % x.ndim for a in axes)),)


def unsqueeze(ctx: NodeContext, x, axes=None):
    axes = _axes(ctx, axes)
    rank = x.ndim + len(axes)
    out = x
    for axis in sorted(a % rank for a in axes):
        out = np.expand_dims(out, axis)
    return (out,)


def concat(ctx: NodeContext, *inputs):
    arrays = [a for a in inputs if a is not None]
    return (np.concatenate(arrays, axis=ctx.attr("axis")),)


def pad(ctx: NodeContext, data, pads=None, constant_value=None, axes=None):
    mode = ctx.attr("mode", "constant")
    if pads is None:  # opset < 11: attributes
        pads, value = ctx.attr("pads"), ctx.attr("value", 0.0)
    else:
        value = 0 if constant_value is None or np.size(constant_value) == 0 else np.asarray(constant_value).item()
    pads = _ints(pads)
    axes = list(range(data.ndim)) if axes is None else [a % data.ndim for a in _ints(axes)]
    widths = [(0, 0)] * data.ndim
    for i, axis in enumerate(axes):
        widths[axis] = (pads[i], pads[i + len(axes)])
    if any(b < 0 or e < 0 for b, e in widths):
        crop = tuple(slice(max(-b, 0), data.shape[i] - max(-e, 0)) for i, (b, e) in enumerate(widths))
        data = data[crop]
        widths = [(max(b, 0), max(e, 0)) for b, e in widths]
    if mode == "constant":
        return (np.pad(data, widths, mode="constant", constant_values=np.asarray(value).astype(data.dtype)),)
    numpy_mode = {"reflect": "reflect", "edge": "edge", "wrap": "wrap"}.get(mode)
    if numpy_mode is None:
        raise ctx.error(f"unknown pad mode '{mode}'")
    return (np.pad(data, widths, mode=numpy_mode),)


def slice_(ctx: NodeContext, data, starts=None, ends=None, axes=None, steps=None):
    if starts is None:  # opset 1-9: attributes
        starts, ends, axes = ctx.attr("starts"), ctx.attr("ends"), ctx.attr("axes")
    starts, ends = _ints(starts), _ints(ends)
    axes = list(range(len(starts))) if axes is None else _ints(axes)
    steps = [1] * len(starts) if steps is None else _ints(steps)
    index = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[axis % data.ndim] = slice(start, end, step)  # numpy clamps out-of-range bounds as ONNX does
    return (data[tuple(index)],)


def shape(ctx: NodeContext, data):
    dims = np.asarray(data.shape, np.int64)
    start, end = ctx.attr("start", 0), ctx.attr("end", None)
    return (dims[start:end],)


def gather(ctx: NodeContext, data, indices):
    axis = ctx.attr("axis", 0)
    indices = np.asarray(indices).astype(np.int64)
    indices = np.where(indices < 0, indices + data.shape[axis], indices)
    return (np.take(data, indices, axis=axis),)


def constant(ctx: NodeContext):
    for name in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if name in ctx.attrs:
            value = ctx.attrs[name]
            if name == "value":
                return (numpy_helper.to_array(value),)
            dtype = np.float32 if "float" in name else np.int64
            return (np.asarray(value, dtype),)
    raise ctx.error("only tensor / float / int Constant values are supported")


def constant_of_shape(ctx: NodeContext, shape_):
    value = ctx.attrs.get("value")
    fill = numpy_helper.to_array(value).reshape(-1) if value is not None else np.zeros(1, np.float32)
    return (np.full(_ints(shape_), fill[0], dtype=fill.dtype),)


KERNELS: dict[tuple[str, str], Kernel] = {
    ("", "Identity"): movement(identity),
    ("", "Reshape"): movement(reshape),
    ("", "Flatten"): movement(flatten),
    ("", "Transpose"): movement(transpose),
    ("", "Squeeze"): movement(squeeze),
    ("", "Unsqueeze"): movement(unsqueeze),
    ("", "Concat"): movement(concat),
    ("", "Pad"): movement(pad),
    ("", "Slice"): movement(slice_),
    ("", "Shape"): movement(shape),
    ("", "Gather"): movement(gather),
    ("", "Constant"): movement(constant),
    ("", "ConstantOfShape"): movement(constant_of_shape),
}
