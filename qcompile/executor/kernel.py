"""What every kernel sees: the node context, the kernel table entry, and the executor errors.

A kernel is a plain function ``kernel(ctx, *inputs) -> tuple[np.ndarray, ...]``: ``inputs`` are
the node's input arrays in order (``None`` for an omitted optional input), ``ctx`` carries
the node, its parsed attributes, the opset, the requantization mode and a per-node cache for
work that depends only on constant inputs (packed weights, multipliers, lookup tables).

Each op-family module exports ``KERNELS: dict[(domain, op_type), Kernel]``; the package
merges them into one table, so adding an op is one entry in one module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper

from ..errors import QCompileError

MODES = ("onnx", "fixed-point")
MS_DOMAIN = "com.microsoft"


class ExecutionError(QCompileError):
    """The integer executor cannot run this model (or these inputs); the message names the node."""


class UnsupportedOpError(ExecutionError):
    """An op has no kernel, or only a float kernel and sits inside the integer region."""


class IntegerOverflowError(ExecutionError):
    """An integer accumulator left the int32 range the ONNX integer ops guarantee."""


class KernelKind(Enum):
    """Where a kernel may run.

    INTEGER: integer arithmetic (and the QuantizeLinear / DequantizeLinear boundary); anywhere.
    MOVEMENT: moves or selects elements without arithmetic (Reshape, MaxPool, Shape, ...), so it
        is exact on integer codes; anywhere.
    FLOAT: float fallback; only outside the integer region (before the first QuantizeLinear or
        after the last DequantizeLinear), or on int64 shape tensors.
    """

    INTEGER = "integer"
    MOVEMENT = "movement"
    FLOAT = "float"


@dataclass(frozen=True)
class Kernel:
    fn: Callable[..., tuple]
    kind: KernelKind


def integer(fn: Callable) -> Kernel:
    return Kernel(fn, KernelKind.INTEGER)


def movement(fn: Callable) -> Kernel:
    return Kernel(fn, KernelKind.MOVEMENT)


def float_fallback(fn: Callable) -> Kernel:
    return Kernel(fn, KernelKind.FLOAT)


def describe(node: onnx.NodeProto) -> str:
    domain = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
    return f"node '{node.name or '<unnamed>'}' ({domain}{node.op_type})"


@dataclass
class NodeContext:
    """Everything a kernel may read besides its input arrays."""

    node: onnx.NodeProto
    opset: int
    mode: str
    static_inputs: tuple[bool, ...]  # input i is an initializer / Constant output
    attrs: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # survives across runs; constant inputs only

    def __post_init__(self) -> None:
        self.attrs = {a.name: helper.get_attribute_value(a) for a in self.node.attribute}

    @property
    def name(self) -> str:
        return self.node.name

    def attr(self, name: str, default: Any = None) -> Any:
        value = self.attrs.get(name, default)
        if isinstance(value, bytes):
            return value.decode()
        return value

    def error(self, message: str, cls: type[ExecutionError] = ExecutionError) -> ExecutionError:
        return cls(f"{describe(self.node)}: {message}")

    def memo(self, key: str, inputs: tuple[int, ...], compute: Callable[[], Any]) -> Any:
        """compute(), cached across runs when every input index listed is constant."""
        if all(i >= len(self.static_inputs) or self.static_inputs[i] for i in inputs):  # omitted = constant
            if key not in self.cache:
                self.cache[key] = compute()
            return self.cache[key]
        return compute()

    def check_int32(self, acc: np.ndarray, what: str = "accumulator") -> None:
        if acc.size and (acc.min() < -(2**31) or acc.max() > 2**31 - 1):
            raise self.error(f"{what} leaves the int32 range ([{acc.min()}, {acc.max()}]); ONNX integer ops "
                             "accumulate in int32 and onnxruntime would wrap around", IntegerOverflowError)


# ----------------------------------------------------------------------------- small helpers


def integer_range(dtype) -> tuple[int, int]:
    info = np.iinfo(np.dtype(dtype)) if np.dtype(dtype).kind in "iu" else None
    if info is None:  # ml_dtypes int4 / uint4 / int2 / uint2
        import ml_dtypes

        info = ml_dtypes.iinfo(np.dtype(dtype))
    return int(info.min), int(info.max)


def is_code_dtype(dtype) -> bool:
    """8-bit integer codes, the operand type of the QLinear* kernels."""
    return np.dtype(dtype) in (np.dtype(np.int8), np.dtype(np.uint8))


def require_8bit(ctx: NodeContext, array: np.ndarray, what: str) -> None:
    if not is_code_dtype(array.dtype):
        raise ctx.error(f"{what} must be int8 or uint8 codes, got {array.dtype}")


@dataclass(frozen=True)
class Affine:
    """Per-tensor quantization parameters of one operand: real = scale * (code - zero_point)."""

    scale: np.float32
    zero_point: int


def affine(ctx: NodeContext, scale, zero_point, what: str) -> Affine:
    return Affine(np.float32(scalar(ctx, scale, f"{what} scale")), int(scalar(ctx, zero_point, f"{what} zero point")))


def scalar(ctx: NodeContext, array: np.ndarray | None, what: str, default=0):
    """A per-tensor quantization parameter (scalar or 1-element tensor) as a 0-d array."""
    if array is None:
        return np.asarray(default)
    if np.size(array) != 1:
        raise ctx.error(f"{what} must be a scalar or a 1-element tensor, got shape {np.shape(array)}")
    return np.asarray(array).reshape(())
