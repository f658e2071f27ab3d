"""ONNX backend node tests for the quantization ops, run through the integer executor (mode "onnx").

Cases come from onnx.backend.test.case.node.collect_testcases(None) (onnx 1.23: every node test
case with its model and input/output data sets); we keep those whose model contains one of
QUANT_OPS (this includes the *_expanded DynamicQuantizeLinear cases, whose float ops run in the
executor's float fallback before the QuantizeLinear). Outputs must be bit-exact, float outputs
included (dtype, shape and every value; no tolerance). Exclusions are listed in EXCLUDED with
the reason and show up as skips.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qcompile.executor import ExecutionError, run_model

QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
             "DynamicQuantizeLinear"}

_FLOAT8 = "float8 codes (e4m3fn / e5m2) are not integers; the integer executor refuses them"
EXCLUDED = {
    "test_dequantizelinear_e4m3fn": _FLOAT8,
    "test_dequantizelinear_e4m3fn_float16": _FLOAT8 + " (float16 scale as well)",
    "test_dequantizelinear_e4m3fn_zero_point": _FLOAT8,
    "test_dequantizelinear_e5m2": _FLOAT8,
    "test_quantizelinear_e4m3fn": _FLOAT8,
    "test_quantizelinear_e5m2": _FLOAT8,
    "test_dequantizelinear_float4e2m1": "float4e2m1 codes are not integers; the integer executor refuses them",
    "test_quantizelinear_float4e2m1": "float4e2m1 codes are not integers; the integer executor refuses them",
}


def _collect():
    import onnx.backend.test.case.node as node_cases

    with warnings.catch_warnings():  # generating the whole suite emits numpy overflow warnings
        warnings.simplefilter("ignore")
        cases = node_cases.collect_testcases(None)
    return sorted((c for c in cases if {n.op_type for n in c.model.graph.node} & QUANT_OPS), key=lambda c: c.name)


CASES = _collect()


def _array(value) -> np.ndarray:
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)


def _comparable(array: np.ndarray) -> np.ndarray:
    """ml_dtypes int4/uint4/int2/uint2 -> int64 so numpy compares the values."""
    return array.astype(np.int64) if array.dtype.kind == "V" else array


def test_selection_is_not_empty():
    assert len(CASES) >= 40  # onnx 1.23 has 45 such cases
    assert set(EXCLUDED) <= {c.name for c in CASES}, "an exclusion names a case that no longer exists"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_backend_case_bit_exact(case):
    if case.name in EXCLUDED:
        pytest.skip(EXCLUDED[case.name])
    for inputs, expected in case.data_sets:
        feeds = {info.name: _array(value) for info, value in zip(case.model.graph.input, inputs)}
        got = run_model(case.model, feeds, mode="onnx")
        for info, want in zip(case.model.graph.output, expected):
            want = _array(want)
            out = got[info.name]
            assert out.dtype == want.dtype, f"{info.name}: dtype {out.dtype} != {want.dtype}"
            assert out.shape == want.shape, f"{info.name}: shape {out.shape} != {want.shape}"
            np.testing.assert_array_equal(_comparable(out), _comparable(want), err_msg=info.name)


@pytest.mark.parametrize("name", sorted(EXCLUDED))
def test_excluded_cases_are_refused_clearly(name):
    case = next(c for c in CASES if c.name == name)
    inputs, _ = case.data_sets[0]
    feeds = {info.name: _array(value) for info, value in zip(case.model.graph.input, inputs)}
    with pytest.raises(ExecutionError, match="not integer codes"):
        run_model(case.model, feeds)
