"""Integer-only reference executor for integer-lowered ONNX models.

    from qcompile.executor import IntegerExecutor, run_model
    outputs = run_model(model, {"input": x}, mode="onnx")        # one shot
    executor = IntegerExecutor(model, mode="fixed-point")         # reusable; caches weight prep
    outputs = executor.run({"input": x})

Between an input QuantizeLinear and an output DequantizeLinear every op runs on 8-bit integer
codes with exact int32 accumulation (int8/uint8 operands, int32 bias); only requantization
depends on the mode:

- "onnx": onnxruntime's float32 multiplier, round half to even, saturate. Bit-exact with
  onnxruntime's CPU provider (x86-64) on every op we test, and with the ONNX backend test data.
- "fixed-point": gemmlowp / TensorFlow Lite, M = M0 * 2^shift applied with
  SaturatingRoundingDoublingHighMul and RoundingDivideByPOT (Jacob et al. 2018 eq. 5-6);
  within 1 LSB of "onnx" per requantization.

Ops (one module per family, each with a KERNELS table; executor.KERNELS merges them):
- ops_quantize: QuantizeLinear, DequantizeLinear (per-tensor, per-axis, blocked; 8/16-bit and
  int4/uint4/int2/uint2 codes; int32 input), DynamicQuantizeLinear.
- ops_conv: QLinearConv (also com.microsoft, channels_last), ConvInteger.
- ops_matmul: QLinearMatMul, MatMulInteger, com.microsoft QGemm.
- ops_elementwise: com.microsoft QLinearAdd, QLinearMul, QLinearSigmoid, QLinearLeakyRelu,
  QLinearConcat.
- ops_pool: com.microsoft QLinearGlobalAveragePool, QLinearAveragePool; MaxPool, GlobalMaxPool.
- ops_shape: Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Concat, Pad, Slice, Identity,
  Shape, Gather, Constant, ConstantOfShape (data movement: exact on codes, allowed anywhere).
- ops_float: float fallback (Add, Sub, Mul, Div, Min, Max, Clip, Round, Relu, Sigmoid, Softmax,
  Cast, ReduceMin, ReduceMax).

The integer region is every node on a path from a node that produces codes to one that
consumes them. A float-fallback op there is refused (UnsupportedOpError naming op and node)
unless all its inputs are int64 shape tensors; outside it (input normalisation before the first
QuantizeLinear, Softmax after the last DequantizeLinear) it runs in numpy float32. Ops with no
kernel at all are refused when the executor is built.
"""
from __future__ import annotations

from .executor import KERNELS, IntegerExecutor, kernel_for, run_model
from .kernel import MODES, ExecutionError, IntegerOverflowError, Kernel, KernelKind, UnsupportedOpError

__all__ = [
    "KERNELS", "MODES", "ExecutionError", "IntegerExecutor", "IntegerOverflowError", "Kernel", "KernelKind",
    "UnsupportedOpError", "kernel_for", "run_model",
]
