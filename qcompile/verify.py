"""`qcompile verify`: run an integer model in the integer reference executor and in onnxruntime,
and compare them tensor by tensor; optionally against the float model too.

A QDQ model is first lowered to QOperator with the fuse_requant pass (onnxruntime-x86 profile),
the same pass the compiler uses. Every integer tensor (the output of a QuantizeLinear, a QLinear*
op, a lookup table or an op on codes) is exposed as an extra output in both runtimes.

Each op is checked on onnxruntime's values of its inputs (IntegerExecutor.run_on_reference):
the share of identical codes and the largest difference in LSB say what that op computes
differently. Verification fails when any code differs by more than 1 LSB. The executor is also
run end to end on its own results: "drift" is the largest difference then, which in fixed-point
mode grows well past 1 LSB on deep nets (a requantization 1 LSB off, amplified by the layers
after it) without the model being any less accurate. With a float model, each tensor of the
end-to-end run is dequantized and compared with the float tensor of the same name (SQNR in dB).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .data import batch_size_for, load_dataset, model_inputs
from .errors import QCompileError
from .runtime import session, with_outputs

# Where an integer op keeps its output scale and zero point (input indices).
OUTPUT_PARAMS = {"QuantizeLinear": (1, 2), "QLinearConv": (6, 7), "QLinearMatMul": (6, 7), "QGemm": (7, 8),
                 "QLinearAdd": (6, 7), "QLinearMul": (6, 7), "QLinearConcat": (0, 1), "QLinearSigmoid": (3, 4),
                 "QLinearLeakyRelu": (3, 4), "QLinearGlobalAveragePool": (3, 4), "QLinearAveragePool": (3, 4)}
CODE_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
QDQ_SUFFIXES = ("_QuantizeLinear_out", "_unclamped")


@dataclass
class TensorCheck:
    name: str
    op: str
    elements: int = 0
    identical: int = 0
    max_lsb: int = 0
    drift_lsb: int = 0
    sqnr_db: float | None = None
    _signal: float = 0.0
    _noise: float = 0.0

    def as_dict(self) -> dict:
        return {"tensor": self.name, "op": self.op, "identical": self.identical / max(self.elements, 1),
                "max_lsb": self.max_lsb, "drift_lsb": self.drift_lsb, "sqnr_db": self.sqnr_db}


@dataclass
class Verification:
    model: str
    mode: str
    samples: int
    lowered_from_qdq: bool
    outputs: list[TensorCheck] = field(default_factory=list)
    layers: list[TensorCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.max_lsb <= 1 for c in self.outputs + self.layers)

    def as_dict(self) -> dict:
        return {"model": self.model, "mode": self.mode, "samples": self.samples, "passed": self.passed,
                "lowered_from_qdq": self.lowered_from_qdq, "outputs": [c.as_dict() for c in self.outputs],
                "layers": [c.as_dict() for c in self.layers]}

    def table(self) -> str:
        def row(c: TensorCheck) -> str:
            sqnr = "" if c.sqnr_db is None else f"{c.sqnr_db:8.1f}"
            return (f"  {c.name[:58]:<58} {c.op[:22]:<22} {100 * c.identical / max(c.elements, 1):9.3f} {c.max_lsb:7d}"
                    f" {c.drift_lsb:9d} {sqnr:>8}")
        head = f"  {'tensor':<58} {'op':<22} {'ident %':>9} {'max LSB':>7} {'drift LSB':>9} {'SQNR dB':>8}"
        lines = [f"verify {self.model} ({self.mode} mode, {self.samples} samples"
                 f"{', lowered from QDQ' if self.lowered_from_qdq else ''}): "
                 f"{'PASS' if self.passed else 'FAIL: some codes differ by more than 1 LSB'}",
                 "ident % and max LSB: each op on onnxruntime's inputs; drift LSB and SQNR: the executor end to end",
                 "outputs:", head]
        lines += [row(c) for c in self.outputs] + ["layers:", head] + [row(c) for c in self.layers]
        return "\n".join(lines)


def _is_qdq(model: onnx.ModelProto) -> bool:
    ops = {n.op_type for n in model.graph.node}
    return "QuantizeLinear" in ops and not ops & (set(OUTPUT_PARAMS) - {"QuantizeLinear"})


def _lower(path: Path) -> onnx.ModelProto:
    from .exporter import to_proto
    from .importer import import_model
    from .pipeline import PassContext
    from .registry import PASSES, load_builtins_and_entry_points

    load_builtins_and_entry_points()
    graph = import_model(path, fold_constants=False)
    cls = PASSES.get("fuse_requant")
    cls(cls.Options(profile="onnxruntime-x86")).run(graph, PassContext())
    graph.toposort()
    return to_proto(graph)


def _code_tensors(model: onnx.ModelProto) -> list[tuple[str, str, np.ndarray | None, np.ndarray | None]]:
    """(name, op, scale, zero point) of every integer tensor an op produces."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type in OUTPUT_PARAMS:
            s, z = OUTPUT_PARAMS[node.op_type]
            scale = inits.get(node.input[s]) if len(node.input) > s else None
            zp = inits.get(node.input[z]) if len(node.input) > z else None
            found.append((node.output[0], node.op_type, scale, zp))
        elif node.op_type == "Gather" and node.input[0] in inits and inits[node.input[0]].dtype in (np.int8, np.uint8):
            found.append((node.output[0], "lookup table", None, inits[node.input[0]][:0]))
    return found


def verify(model_path: str | Path, data: str | Path, *, float_model: str | Path | None = None, mode: str = "onnx",
           samples: int = 50, preprocessing=None) -> Verification:
    from .executor import IntegerExecutor
    from .importer import load_model_proto

    model_path = Path(model_path)
    model, _ = load_model_proto(model_path)
    lowered = _is_qdq(model)
    if lowered:
        model = _lower(model_path)
    codes = _code_tensors(model)
    if not codes:
        raise QCompileError(f"{model_path}: no integer operators to verify (not a quantized model?)")
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for name, _, _, zp in codes:  # contrib ops have no inferred types: the zero point's type is the codes' type
        if zp is not None:
            types[name] = helper.np_dtype_to_tensor_dtype(zp.dtype)
    names = [name for name, *_ in codes]
    probe = with_outputs(model, names, types, default=onnx.TensorProto.UINT8)
    ort_session = session(probe)
    executor = IntegerExecutor(probe, mode=mode)

    from .importer import graph_from_proto
    inputs = model_inputs(graph_from_proto(inferred))
    dataset = load_dataset(data, inputs, preprocessing)
    batch = batch_size_for(inputs, 8)
    float_session = None
    float_names: dict[str, str] = {}
    if float_model is not None:
        float_proto, _ = load_model_proto(float_model)
        float_values = {o for n in float_proto.graph.node for o in n.output}
        for name in names:
            base = name
            for suffix in QDQ_SUFFIXES:
                base = base.removesuffix(suffix)
            if base in float_values:
                float_names[name] = base
        float_session = session(with_outputs(float_proto, sorted(set(float_names.values()))))

    output_names = [o.name for o in model.graph.output]
    out_scales = _output_scales(model)
    checks = {name: TensorCheck(name, op) for name, op, *_ in codes}
    out_checks = {name: TensorCheck(name, "graph output") for name in output_names}
    params = {name: (scale, zp) for name, _, scale, zp in codes}
    seen = 0
    for feeds in dataset.batches(batch, samples):
        ort_out = dict(zip([o.name for o in ort_session.get_outputs()], ort_session.run(None, feeds)))
        per_op = executor.run_on_reference(feeds, ort_out)
        end_to_end = executor.run(feeds)
        float_out = {}
        if float_session is not None:
            float_out = dict(zip([o.name for o in float_session.get_outputs()], float_session.run(None, feeds)))
        for name, check in checks.items():
            _compare(check, ort_out[name], per_op.get(name, end_to_end[name]), end_to_end[name], 1.0)
            base = float_names.get(name)
            scale, zp = params[name]
            if base is not None and scale is not None and base in float_out:
                real = (end_to_end[name].astype(np.float64) - zp.astype(np.float64)) * scale.astype(np.float64)
                _accumulate_sqnr(check, float_out[base], real)
        for name, check in out_checks.items():
            _compare(check, ort_out[name], per_op.get(name, end_to_end[name]), end_to_end[name], out_scales.get(name))
            if name in float_out:
                _accumulate_sqnr(check, float_out[name], end_to_end[name])
        seen += len(next(iter(feeds.values())))
    for check in list(checks.values()) + list(out_checks.values()):
        if check._signal or check._noise:
            check.sqnr_db = float("inf") if check._noise == 0 else float(10 * np.log10(check._signal / check._noise))
    return Verification(str(model_path), mode, seen, lowered, list(out_checks.values()), list(checks.values()))


def _output_scales(model: onnx.ModelProto) -> dict[str, float]:
    """LSB of each float graph output that a DequantizeLinear produces (per-tensor scale)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    scales = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[1] in inits and inits[node.input[1]].ndim == 0:
            scales[node.output[0]] = float(inits[node.input[1]])
    return scales


def _compare(check: TensorCheck, expected: np.ndarray, per_op: np.ndarray, end_to_end: np.ndarray,
             lsb: float | None) -> None:
    diff = _lsb_difference(expected, per_op, lsb)
    check.elements += expected.size
    check.identical += int(np.sum(diff == 0))
    check.max_lsb = max(check.max_lsb, int(diff.max(initial=0)))
    check.drift_lsb = max(check.drift_lsb, int(_lsb_difference(expected, end_to_end, lsb).max(initial=0)))


def _lsb_difference(expected: np.ndarray, got: np.ndarray, lsb: float | None) -> np.ndarray:
    """|expected - got| in codes; float tensors in units of `lsb` (without one, any difference counts 2)."""
    if expected.dtype.kind in "iu":
        return np.abs(expected.astype(np.int64) - got.astype(np.int64))
    diff = np.abs(expected.astype(np.float64) - got.astype(np.float64)) / (lsb or 1.0)
    return np.rint(diff).astype(np.int64) if lsb else np.where(diff > 0, 2, 0)


def _accumulate_sqnr(check: TensorCheck, reference: np.ndarray, test: np.ndarray) -> None:
    reference = reference.astype(np.float64)
    check._signal += float(np.sum(reference ** 2))
    check._noise += float(np.sum((reference - test) ** 2))
