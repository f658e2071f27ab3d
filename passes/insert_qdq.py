"""`insert_qdq`: lower calibrated annotations to ONNX QuantizeLinear / DequantizeLinear pairs.

Before:  x -> Conv(W, b) -> Clip(0, 6) -> y      (x, W, y annotated and calibrated)
After:   x -> Q -> DQ -> Conv(DQ(W_int8), DQ(b_int32)) -> Q -> DQ -> y

- Activations: one Q -> DQ pair per tensor; every consumer reads the DQ output. A graph output
  keeps its name (the DQ output takes it).
- Constants (weights, constant operands): stored as integer initializers with a DQ node, like
  onnxruntime's QDQ format; per-channel weights carry the DQ `axis`.
- Bias of Conv / Gemm: int32 with scale s_x * s_w and zero point 0 (Jacob et al. 2018 §2.4),
  so runtimes fold DQ -> Conv -> Q into an integer convolution.
- Fused Relu / Clip: removed when the output quantizer already clamps to the same codes
  (Q(clip_lo) == qmin and Q(clip_hi) == qmax), which is the runtime fusion done exactly;
  otherwise kept between the op and its Q.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx

from qcompile.ir import Graph, Node, Value
from qcompile.numerics import bias_qparams, quantize, quantize_bias
from qcompile.op_rules import clamp_bounds, rule_for
from qcompile.pipeline import Pass, PassContext, PassResult, Phase
from qcompile.qtypes import QParams
from qcompile.registry import register_pass

__all__ = ["InsertQDQPass"]
logger = logging.getLogger(__name__)


def _qparam_inputs(graph: Graph, base: str, qp: QParams) -> tuple[Value, Value]:
    scale = graph.add_constant(f"{base}_scale", np.asarray(qp.scale, dtype=np.float32))
    zero_point = graph.add_constant(f"{base}_zero_point", np.asarray(qp.zero_point))
    return scale, zero_point


def _axis_attr(qp: QParams) -> dict:
    return {"axis": int(qp.axis)} if qp.axis is not None else {}


def _clamp_is_redundant(node: Node, qp: QParams) -> bool:
    """True when quantizing with qp already saturates exactly where the Relu/Clip clamps."""
    bounds = clamp_bounds(node)
    if bounds is None:
        return False
    bounds = np.clip(np.array(bounds, dtype=np.float64), -3e38, 3e38).astype(np.float32)
    with np.errstate(over="ignore"):
        codes = quantize(bounds, qp).astype(np.int64)
    return int(codes[0]) == qp.spec.qmin and int(codes[1]) == qp.spec.qmax


@register_pass("insert_qdq")
class InsertQDQPass(Pass):
    """Emit QuantizeLinear/DequantizeLinear for every calibrated tensor (ONNX QDQ format)."""

    phase = Phase.LOWER
    requires = frozenset({"calibrated"})
    establishes = frozenset({"lowered"})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats = {"activation_qdq": 0, "weight_dq": 0, "bias_dq": 0, "clamps_absorbed": 0}
        self._quantize_biases(graph, stats)
        for value in list(graph.values.values()):
            if value.qparams is None or value.meta.get("lowered"):
                continue
            if value.is_const:
                self._lower_constant(graph, value)
                stats["weight_dq"] += 1
            elif value.producer is not None and value.meta.get("fused_into") is None:
                self._lower_activation(graph, value, stats)
            elif value.producer is None:  # graph input
                self._lower_activation(graph, value, stats)
        stats["float_constants_dropped"] = graph.remove_unused()
        return PassResult(modified=any(stats.values()), stats=stats)

    # -- biases --------------------------------------------------------------------------------
    @staticmethod
    def _quantize_biases(graph: Graph, stats: dict) -> None:
        for node in graph.nodes:
            rule = rule_for(node)
            if not node.meta.get("quantized") or rule is None or rule.bias_input is None:
                continue
            bias, x, w = node.input(rule.bias_input), node.input(0), node.input(rule.weight_input)
            if bias is None or not bias.is_const or x is None or w is None:
                continue
            if x.qparams is None or w.qparams is None or bias.const.ndim != 1 or x.qparams.axis is not None:
                continue
            b_qp, w_qp = bias_qparams(bias.const, x.qparams, w.qparams)
            if w_qp is not w.qparams:
                logger.info("%s: enlarged weight scale of %d channel(s) so the int32 bias fits",
                            node.describe(), int(np.sum(w_qp.scale != w.qparams.scale)))
                w.qparams = w_qp
            codes = graph.add_constant(f"{bias.name}_quantized", quantize_bias(bias.const, b_qp))
            scale = graph.add_constant(f"{bias.name}_scale", b_qp.scale)
            zero_point = graph.add_constant(f"{bias.name}_zero_point", np.zeros(b_qp.scale.shape, np.int32))
            dq = graph.add_node("DequantizeLinear", [codes, scale, zero_point], 1, name=f"{bias.name}_DequantizeLinear",
                                attributes={"axis": 0} if b_qp.scale.ndim == 1 else {}, before=node)
            dq.outputs[0].dtype, dq.outputs[0].shape = onnx.TensorProto.FLOAT, bias.shape
            node.replace_input(rule.bias_input, dq.outputs[0])
            stats["bias_dq"] += 1

    # -- constants -----------------------------------------------------------------------------
    @staticmethod
    def _lower_constant(graph: Graph, value: Value) -> None:
        qp = value.qparams
        codes = graph.add_constant(f"{value.name}_quantized", quantize(value.const, qp))
        scale, zero_point = _qparam_inputs(graph, value.name, qp)
        first_user = min((graph.nodes.index(n) for n in value.consumers()), default=len(graph.nodes))
        dq = graph.add_node("DequantizeLinear", [codes, scale, zero_point], 1, name=f"{value.name}_DequantizeLinear",
                            attributes=_axis_attr(qp))
        graph.nodes.remove(dq)
        graph.nodes.insert(first_user, dq)
        dq.outputs[0].dtype, dq.outputs[0].shape = onnx.TensorProto.FLOAT, value.shape
        dq.outputs[0].meta["lowered"] = True
        value.replace_all_uses_with(dq.outputs[0])
        value.meta["lowered"] = True

    # -- activations ---------------------------------------------------------------------------
    def _lower_activation(self, graph: Graph, value: Value, stats: dict) -> None:
        qp = value.qparams
        source, replaced = value, value
        producer = value.producer
        if producer is not None and rule_for(producer) and rule_for(producer).fusable_activation \
                and producer.inputs[0].meta.get("fused_into") == producer.name and _clamp_is_redundant(producer, qp):
            source = producer.inputs[0]  # quantize the fused op's output directly; the clamp is in Q
            stats["clamps_absorbed"] += 1
        if replaced in graph.outputs:
            graph.rename_value(replaced, graph.fresh_name(f"{replaced.name}_float"))
            final_name = replaced.name.removesuffix("_float")
        else:
            final_name = None
        anchor = source.producer
        q = graph.add_node("QuantizeLinear", [source, *_qparam_inputs(graph, f"{value.name}", qp)], 1,
                           name=f"{value.name}_QuantizeLinear", attributes=_axis_attr(qp), after=anchor)
        q.outputs[0].dtype, q.outputs[0].shape = qp.spec.onnx_type, value.shape
        dq_out = graph.add_value(final_name or f"{value.name}_dequantized", dtype=onnx.TensorProto.FLOAT,
                                 shape=value.shape, exact_name=final_name is not None)
        scale, zero_point = q.inputs[1], q.inputs[2]
        graph.add_node("DequantizeLinear", [q.outputs[0], scale, zero_point], [dq_out],
                            name=f"{value.name}_DequantizeLinear", attributes=_axis_attr(qp), after=q)
        dq_out.meta["lowered"] = True
        value.meta["lowered"] = True
        replaced.replace_all_uses_with(dq_out, except_nodes=[q])
        if replaced in graph.outputs:
            graph.outputs[graph.outputs.index(replaced)] = dq_out
        if source is not replaced and not replaced.uses() and replaced not in graph.outputs:
            graph.remove_node(producer)
        stats["activation_qdq"] += 1
