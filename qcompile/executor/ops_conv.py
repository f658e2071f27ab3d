"""Integer convolution: QLinearConv (ONNX and com.microsoft NHWC variant) and ConvInteger.

Arithmetic (Jacob et al. 2018 eq. 4, ONNX QLinearConv): with centred codes x - Z_x and w - Z_w,
acc[n, m, p] = sum over taps (x - Z_x)(w - Z_w) + bias[m], an exact integer. Zero padding in the
real domain is padding the centred input with 0, i.e. padding the codes with Z_x, as the spec
and onnxruntime's im2col do. QLinearConv then requantizes acc by the executor's mode
(requant.requantize); ConvInteger returns acc as int32.

Implementation:
- general and grouped convolution: im2col (a strided window view, one copy) then one batched
  matrix product per group with float BLAS. Every product and partial sum is an integer of
  magnitude <= K * max|x - Z_x| * max|w - Z_w| (+ |bias|); float32 holds those exactly below
  2^24 and float64 below 2^53 (asserted), so the product is exact whatever the summation
  order, and the accumulator stays in that float type until requantization.
- depthwise (one input channel per group): a loop over kernel taps, each tap one strided slice
  of the padded input times a per-channel weight, accumulated the same way; no im2col.
Spatial rank 1, 2 or 3; strides, dilations, pads and auto_pad (SAME_UPPER, SAME_LOWER, VALID).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..numerics import ort_requant_multiplier
from .kernel import MS_DOMAIN, Kernel, NodeContext, integer, integer_range, require_8bit, scalar
from .requant import requantize, tflite_real_multiplier


@dataclass(frozen=True)
class Geometry:
    """Where the windows of a convolution or pooling sit on the (padded) input."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    out_shape: tuple[int, ...]


def conv_geometry(ctx: NodeContext, spatial: tuple[int, ...], kernel: tuple[int, ...], *,
                  pool: bool = False) -> Geometry:
    """Strides, dilations, pads and output spatial shape from the node's attributes.

    Output size follows ONNX Conv: floor((I + pads - ((k - 1) * d + 1)) / s) + 1, with auto_pad
    SAME_UPPER / SAME_LOWER giving ceil(I / s) and the extra pad at the end / beginning. With
    pool=True, ceil_mode is honoured as onnxruntime's PoolAttributes does (a window that would
    start in the end padding is dropped).
    """
    rank = len(spatial)
    strides = list(ctx.attr("strides", None) or [1] * rank)
    dilations = list(ctx.attr("dilations", None) or [1] * rank)
    pads = list(ctx.attr("pads", None) or [0] * (2 * rank))
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    ceil_mode = pool and bool(ctx.attr("ceil_mode", 0))
    if len(strides) != rank or len(dilations) != rank or len(pads) != 2 * rank:
        raise ctx.error(f"strides/dilations/pads do not match the {rank}-d kernel {kernel}")
    begin, end, out = [], [], []
    for i in range(rank):
        effective = (kernel[i] - 1) * dilations[i] + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            size = math.ceil(spatial[i] / strides[i])
            total = max(0, (size - 1) * strides[i] + effective - spatial[i])
            small, large = total // 2, total - total // 2
            b, e = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
        elif auto_pad == "VALID":
            b, e = 0, 0
        elif auto_pad == "NOTSET":
            b, e = pads[i], pads[i + rank]
        else:
            raise ctx.error(f"unknown auto_pad '{auto_pad}'")
        span = spatial[i] + b + e - effective
        if span < 0:
            raise ctx.error(f"kernel {kernel} is larger than the padded input {spatial}")
        size = span // strides[i] + 1
        if ceil_mode and auto_pad in ("NOTSET", "VALID"):
            size = -(-span // strides[i]) + 1
            if (size - 1) * strides[i] >= spatial[i] + b:
                size -= 1
        begin.append(b)
        end.append(e)
        out.append(size)
    return Geometry(tuple(kernel), tuple(strides), tuple(dilations), tuple(begin), tuple(end), tuple(out))


def pad_spatial(x: np.ndarray, g: Geometry, value) -> np.ndarray:
    """Pad the spatial axes (2..) so every window of the output exists (ceil_mode may need more)."""
    widths = [(0, 0), (0, 0)]
    for i, size in enumerate(g.out_shape):
        needed = (size - 1) * g.strides[i] + (g.kernel[i] - 1) * g.dilations[i] + 1
        widths.append((g.pads_begin[i], max(g.pads_end[i], needed - x.shape[2 + i] - g.pads_begin[i])))
    if all(w == (0, 0) for w in widths):
        return x
    return np.pad(x, widths, constant_values=value)


def tap_slices(x_padded: np.ndarray, g: Geometry):
    """Yield, for each kernel tap in row-major order, the strided view of the padded input it sees."""
    for tap in np.ndindex(*g.kernel):
        index = [slice(None), slice(None)]
        for i, t in enumerate(tap):
            start = t * g.dilations[i]
            index.append(slice(start, start + (g.out_shape[i] - 1) * g.strides[i] + 1, g.strides[i]))
        yield x_padded[tuple(index)]


def im2col(x_padded: np.ndarray, g: Geometry, groups: int) -> np.ndarray:
    """(N, C, *padded) -> (N, G, Cg * prod(kernel), P) columns, one copy."""
    n, c = x_padded.shape[:2]
    rank = len(g.kernel)
    effective = [(k - 1) * d + 1 for k, d in zip(g.kernel, g.dilations)]
    windows = sliding_window_view(x_padded, effective, axis=tuple(range(2, 2 + rank)))  # (N, C, *pos, *effective)
    select = (slice(None), slice(None)) + tuple(slice(0, (o - 1) * s + 1, s) for o, s in zip(g.out_shape, g.strides)) \
        + tuple(slice(None, None, d) for d in g.dilations)
    windows = windows[select]  # (N, C, *out, *kernel)
    cg = c // groups
    windows = windows.reshape((n, groups, cg) + g.out_shape + g.kernel)
    order = (0, 1, 2) + tuple(range(3 + rank, 3 + 2 * rank)) + tuple(range(3, 3 + rank))
    return windows.transpose(order).reshape(n, groups, cg * math.prod(g.kernel), math.prod(g.out_shape))


def exact_float_dtype(bound: float):
    """The narrowest float type that holds every integer of magnitude <= bound exactly.

    With every partial sum bounded by `bound`, a float BLAS product or an elementwise
    accumulation is exact whatever its summation order.
    """
    if bound < 2**24:
        return np.float32
    assert bound < 2**53, "accumulation would not be exact in float64"
    return np.float64


def _max_centred(dtype, zero_point: int) -> int:
    qmin, qmax = integer_range(dtype)
    return max(zero_point - qmin, qmax - zero_point)


def integer_conv(ctx: NodeContext, x: np.ndarray, x_zero_point, w: np.ndarray, w_zero_point, bias=None, *,
                 w_index: int, bias_index: int | None = None) -> np.ndarray:
    """Exact sum over taps of (x - Z_x)(w - Z_w), plus bias[m], shape (N, M, *out).

    Returned as float32 or float64 holding exact integers (see exact_float_dtype); w_index and
    bias_index are the input indices of w and the bias, for caching work on constant weights.
    """
    if x.ndim < 3 or w.ndim != x.ndim:
        raise ctx.error(f"input rank {x.ndim} and weight rank {w.ndim} must match and be >= 3")
    groups = int(ctx.attr("group", 1))
    n, c = x.shape[:2]
    m, cg = w.shape[:2]
    kernel = tuple(w.shape[2:])
    if ctx.attr("kernel_shape") and tuple(ctx.attr("kernel_shape")) != kernel:
        raise ctx.error(f"kernel_shape {ctx.attr('kernel_shape')} disagrees with the weight shape {w.shape}")
    if c != cg * groups or m % groups:
        raise ctx.error(f"input channels {c}, weight shape {w.shape} and group {groups} do not fit")
    if bias is not None and (bias.dtype != np.int32 or bias.shape != (m,)):
        raise ctx.error(f"bias must be int32 of shape ({m},), got {bias.dtype} {bias.shape}")
    g = conv_geometry(ctx, x.shape[2:], kernel)
    zx = int(scalar(ctx, x_zero_point, "x_zero_point"))
    taps = cg * math.prod(kernel)
    static = (w_index, w_index + 2) + ((bias_index,) if bias_index is not None else ())

    def prepare():
        w_zp = np.asarray(0 if w_zero_point is None else w_zero_point).astype(np.int64)
        if w_zp.ndim == 1 and w_zp.size not in (1, m):
            raise ctx.error(f"w_zero_point must be a scalar or have {m} elements, got {w_zp.size}")
        centred_w = w.astype(np.int64) - (w_zp.reshape((-1,) + (1,) * (w.ndim - 1)) if w_zp.ndim == 1 else w_zp)
        bias_bound = 0 if bias is None else int(np.abs(bias.astype(np.int64)).max(initial=0))
        bound = taps * _max_centred(x.dtype, zx) * int(np.abs(centred_w).max(initial=0)) + bias_bound
        dtype = exact_float_dtype(bound)
        bias_column = None if bias is None else bias.astype(dtype).reshape((1, m) + (1,) * len(kernel))
        return centred_w.reshape(m, taps).astype(dtype), bias_column

    weights, bias_column = ctx.memo(f"conv_{zx}", static, prepare)  # (M, K); the bound depends on Z_x
    dtype = weights.dtype
    centred = np.subtract(x, zx, dtype=dtype)

    if cg == 1 and groups == c:  # depthwise: a loop over kernel taps, no im2col
        padded = pad_spatial(centred, g, 0)
        if m != c:  # channel multiplier: output channel j reads input channel j // (m // c)
            padded = np.repeat(padded, m // c, axis=1)
        acc = np.zeros((n, m) + g.out_shape, dtype)
        product = np.empty_like(acc)
        for index, view in enumerate(tap_slices(padded, g)):
            np.multiply(view, weights[:, index].reshape((m,) + (1,) * len(kernel)), out=product)
            acc += product
    else:
        pointwise = all(k == 1 for k in kernel) and all(s == 1 for s in g.strides) and \
            not any(g.pads_begin + g.pads_end)
        if pointwise:
            columns = centred.reshape(n, groups, cg, -1)
        else:
            columns = im2col(pad_spatial(centred, g, 0), g, groups)
        acc = np.matmul(weights.reshape(groups, m // groups, taps), columns)  # (N, G, Mg, P), exact
        acc = acc.reshape((n, m) + g.out_shape)
    if bias_column is not None:
        acc += bias_column
    return acc


def qlinear_conv(ctx: NodeContext, x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point,
                 bias=None):
    require_8bit(ctx, x, "x")
    require_8bit(ctx, w, "w")
    channels_last = ctx.node.domain == MS_DOMAIN and bool(ctx.attr("channels_last", 0))
    if channels_last:
        x = np.moveaxis(x, -1, 1)
    m = w.shape[0]
    acc = integer_conv(ctx, x, x_zero_point, w, w_zero_point, bias, w_index=3, bias_index=8)
    s_x = scalar(ctx, x_scale, "x_scale")
    s_y = scalar(ctx, y_scale, "y_scale")
    s_w = np.asarray(w_scale).reshape(-1)
    if s_w.size not in (1, m):
        raise ctx.error(f"w_scale must be a scalar or have {m} elements, got {s_w.size}")
    channel_axis = (-1,) + (1,) * (acc.ndim - 2)
    ort_m, real_m = ctx.memo("multipliers", (1, 4, 6), lambda: (
        ort_requant_multiplier(s_x, s_w, s_y).reshape(channel_axis),
        tflite_real_multiplier(s_x, s_w, s_y).reshape(channel_axis)))
    out_dtype = np.asarray(y_zero_point).dtype if y_zero_point is not None else x.dtype
    y = requantize(ctx, acc, ort_multiplier=ort_m, real_multiplier=real_m,
                   zero_point=scalar(ctx, y_zero_point, "y_zero_point"), dtype=out_dtype)
    if channels_last:
        y = np.ascontiguousarray(np.moveaxis(y, 1, -1))
    return (y,)


def conv_integer(ctx: NodeContext, x, w, x_zero_point=None, w_zero_point=None):
    require_8bit(ctx, x, "x")
    require_8bit(ctx, w, "w")
    acc = integer_conv(ctx, x, x_zero_point, w, w_zero_point, w_index=1)
    ctx.check_int32(acc)
    return (acc.astype(np.int32),)


KERNELS: dict[tuple[str, str], Kernel] = {
    ("", "QLinearConv"): integer(qlinear_conv),
    (MS_DOMAIN, "QLinearConv"): integer(qlinear_conv),
    ("", "ConvInteger"): integer(conv_integer),
}
