"""Pooling: QLinearGlobalAveragePool, QLinearAveragePool (com.microsoft), MaxPool, GlobalMaxPool.

QLinearGlobalAveragePool (both modes integer): acc = sum(x) - Z_x * N over the N spatial
positions, exact; requantized with M = s_x / (s_y N). Mode "onnx" uses onnxruntime's float32
multiplier fl32(s_x / fl32(s_y * N)) (MLAS qlgavgpool.cpp) and MlasRequantizeOutput.
channels_last selects NHWC.

QLinearAveragePool:
- mode "onnx" reproduces onnxruntime's kernel (contrib qlinear_pool.cc), which is float inside:
  each code is dequantized in float32, the window is summed in float32 in row-major tap order,
  divided by the count (kernel size with count_include_pad, else the taps inside the image),
  and quantized as round_half_even(fl32(fl32(sum / count) / s_y) + Z_y). A window covering the
  whole unpadded image takes the integer global-average path, as in onnxruntime.
- mode "fixed-point": exact integer window sum of x - Z_x, requantized with the multiplier
  s_x / (s_y * count) per output position.

MaxPool and GlobalMaxPool only select elements, so they run unchanged on integer codes (max
commutes with the monotone dequantization); padding never wins (it is the type's minimum).
"""
from __future__ import annotations

import math

import numpy as np

from ..numerics import requantize_float32, requantize_fixed_point, round_half_even
from .kernel import MS_DOMAIN, Affine, Kernel, NodeContext, affine, integer, integer_range, movement, require_8bit
from .ops_conv import conv_geometry, pad_spatial, tap_slices


def _to_channels_first(ctx: NodeContext, x: np.ndarray) -> tuple[np.ndarray, bool]:
    channels_last = bool(ctx.attr("channels_last", 0))
    return (np.moveaxis(x, -1, 1) if channels_last else x), channels_last


def _requantize_sum(ctx: NodeContext, acc: np.ndarray, px: Affine, py: Affine, count, dtype) -> np.ndarray:
    """Window sums of centred codes -> codes, multiplier s_x / (s_y * count) (count per position or scalar)."""
    ctx.check_int32(acc)
    qmin, qmax = integer_range(dtype)
    if ctx.mode == "onnx":
        multiplier = px.scale / (py.scale * np.asarray(count, np.float32))  # qlgavgpool.cpp, float32
        codes = requantize_float32(acc, multiplier.astype(np.float32), py.zero_point, qmin, qmax)
    else:
        multiplier = float(px.scale) / (float(py.scale) * np.asarray(count, np.float64))
        codes = requantize_fixed_point(acc, multiplier, py.zero_point, qmin, qmax)
    return codes.astype(dtype)


def _global_average(ctx: NodeContext, x: np.ndarray, px: Affine, py: Affine) -> np.ndarray:
    count = math.prod(x.shape[2:])
    acc = x.astype(np.int64).sum(axis=tuple(range(2, x.ndim)), keepdims=True) - px.zero_point * count
    return _requantize_sum(ctx, acc, px, py, count, x.dtype)


def _pool_params(ctx: NodeContext, x, x_scale, x_zero_point, y_scale, y_zero_point) -> tuple[Affine, Affine]:
    require_8bit(ctx, x, "X")
    if x.ndim < 3:
        raise ctx.error(f"input rank must be >= 3, got {x.ndim}")
    return affine(ctx, x_scale, x_zero_point, "X"), affine(ctx, y_scale, y_zero_point, "Y")


def qlinear_global_average_pool(ctx: NodeContext, x, x_scale, x_zero_point, y_scale, y_zero_point):
    px, py = _pool_params(ctx, x, x_scale, x_zero_point, y_scale, y_zero_point)
    x, channels_last = _to_channels_first(ctx, x)
    y = _global_average(ctx, x, px, py)
    return (np.moveaxis(y, 1, -1) if channels_last else y,)


def qlinear_average_pool(ctx: NodeContext, x, x_scale, x_zero_point, y_scale, y_zero_point=None):
    px, py = _pool_params(ctx, x, x_scale, x_zero_point, y_scale, y_zero_point)
    x, channels_last = _to_channels_first(ctx, x)
    kernel = tuple(ctx.attr("kernel_shape") or ())
    if len(kernel) != x.ndim - 2:
        raise ctx.error(f"kernel_shape {kernel} does not fit input rank {x.ndim}")
    if ctx.attr("dilations") and any(d != 1 for d in ctx.attr("dilations")):
        raise ctx.error("dilations are not supported by QLinearAveragePool")
    g = conv_geometry(ctx, x.shape[2:], kernel, pool=True)
    if kernel == x.shape[2:] and not any(g.pads_begin + g.pads_end):  # onnxruntime: global average path
        y = _global_average(ctx, x, px, py)
        return (np.moveaxis(y, 1, -1) if channels_last else y,)

    if ctx.attr("count_include_pad", 0):
        count = np.full((1, 1) + g.out_shape, math.prod(kernel), np.int64)
    else:  # taps that fall inside the image
        inside = pad_spatial(np.ones((1, 1) + x.shape[2:], np.int64), g, 0)
        count = sum(tap_slices(inside, g))

    if ctx.mode == "onnx":
        real = (x.astype(np.int64) - px.zero_point).astype(np.float32) * px.scale  # dequantize_value, float32
        total = np.zeros(x.shape[:2] + g.out_shape, np.float32)
        for view in tap_slices(pad_spatial(real, g, 0.0), g):
            total += view  # float32 in onnxruntime's tap order; padding adds exact zeros
        mean = total / count.astype(np.float32)
        qmin, qmax = integer_range(x.dtype)
        y = np.clip(round_half_even(mean / py.scale + np.float32(py.zero_point)), qmin, qmax).astype(x.dtype)
    else:
        acc = sum(tap_slices(pad_spatial(x.astype(np.int64) - px.zero_point, g, 0), g))
        y = _requantize_sum(ctx, acc, px, py, count, x.dtype)
    return (np.moveaxis(y, 1, -1) if channels_last else y,)


def _lowest(dtype):
    return np.iinfo(dtype).min if np.dtype(dtype).kind in "iu" else -np.inf


def max_pool(ctx: NodeContext, x):
    if len(ctx.node.output) > 1 and ctx.node.output[1]:
        raise ctx.error("the Indices output is not supported")
    if ctx.attr("storage_order", 0):
        raise ctx.error("storage_order=1 is not supported")
    kernel = tuple(ctx.attr("kernel_shape") or ())
    if len(kernel) != x.ndim - 2:
        raise ctx.error(f"kernel_shape {kernel} does not fit input rank {x.ndim}")
    g = conv_geometry(ctx, x.shape[2:], kernel, pool=True)
    views = tap_slices(pad_spatial(x, g, _lowest(x.dtype)), g)
    y = next(views).copy()
    for view in views:
        np.maximum(y, view, out=y)
    return (y,)


def global_max_pool(ctx: NodeContext, x):
    return (x.max(axis=tuple(range(2, x.ndim)), keepdims=True),)


KERNELS: dict[tuple[str, str], Kernel] = {
    (MS_DOMAIN, "QLinearGlobalAveragePool"): integer(qlinear_global_average_pool),
    (MS_DOMAIN, "QLinearAveragePool"): integer(qlinear_average_pool),
    ("", "MaxPool"): movement(max_pool),
    ("", "GlobalMaxPool"): movement(global_max_pool),
}
