"""`annotate`: decide which tensors are quantized and how, from the recipe's quantization block.

Before:  x -> Conv(W, b) -> Clip(0, 6) -> y            (float, no annotations)
After:   the same graph, with QuantSpecs on x, W, y and the Conv output marked fused into the
         Clip (runtimes apply Relu/Clip as the clamp of the Conv's requantization, so the Conv
         output is never quantized on its own).

Rules come from qcompile.op_rules (one entry per op type). A node is quantized when its op has
a rule, no override says `quantize: false` and no earlier pass set node.meta["keep_float"] (a
reason string); a value whose meta["nonnegative"] an earlier pass set counts as non-negative; the output of a
Conv/Gemm/MatMul kept float is not quantized (onnxruntime would quantize such a layer's weights
itself if a QuantizeLinear followed it); everything else stays float and is reported with
its reason. Activations that are provably non-negative (outputs of Relu, Clip(min >= 0),
Sigmoid, HardSigmoid, and ops that preserve non-negativity) get unsigned codes when the recipe's
`unsigned_when_nonnegative` is on: the symmetric grid [0, 255] with zero point 0 doubles the
resolution of such tensors (Wu et al. 2020 §3.1 uses unsigned int8 after ReLU the same way).
"""
from __future__ import annotations

import logging

from qcompile.ir import Graph, Node, Value
from qcompile.op_rules import activation_inputs, rule_for
from qcompile.pipeline import Pass, PassContext, PassResult, Phase
from qcompile.registry import register_pass

__all__ = ["AnnotatePass"]
logger = logging.getLogger(__name__)

FLOAT_TYPES = {1}  # FLOAT; QuantizeLinear takes float16/bfloat16 only from opset 19 (not yet supported)


def _nonnegative_values(graph: Graph) -> set[int]:
    """ids of values that are >= 0 for every input, by a forward sweep over the op rules."""
    nonneg: set[int] = set()
    for value in graph.values.values():
        if value.is_const and value.const.size and value.const.dtype.kind == "f" and value.const.min() >= 0:
            nonneg.add(id(value))
        if value.meta.get("nonnegative"):  # proven by the pass that made it (e.g. hswish_shift)
            nonneg.add(id(value))
    for node in graph.nodes:
        rule = rule_for(node)
        if rule is None:
            continue
        flags = [v is not None and id(v) in nonneg for v in node.inputs]
        if node.op_type in ("Reshape", "Squeeze", "Unsqueeze", "Pad"):
            flags = flags[:1]  # shape / pads inputs say nothing about the data
        if rule.nonnegative_output(node, flags) or all(o.meta.get("nonnegative") for o in node.outputs):
            nonneg.update(id(o) for o in node.outputs)
    return nonneg


def _is_float(value: Value) -> bool:
    return value.dtype in FLOAT_TYPES


# Layers onnxruntime quantizes by itself when they sit between a DequantizeLinear and a
# QuantizeLinear: its WeightBiasQuantization transformer turns their float weights into per-tensor
# int8. A layer kept float must therefore not have its output quantized.
_REQUANTIZED_BY_RUNTIME = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def _output_of_float_layer(value: Value) -> bool:
    """value comes from a float-kept Conv/Gemm/MatMul (directly or through a float Relu/Clip)."""
    producer = value.producer
    if producer is not None and producer.op_type in ("Relu", "Clip") and not producer.meta.get("quantized"):
        source = producer.inputs[0]
        producer = source.producer if source is not None else None
    return producer is not None and producer.op_type in _REQUANTIZED_BY_RUNTIME and not producer.meta.get("quantized")


@register_pass("annotate")
class AnnotatePass(Pass):
    """Attach QuantSpecs to the inputs, weights and outputs of every quantizable node."""

    phase = Phase.ANNOTATE
    establishes = frozenset({"annotated"})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        scheme = ctx.scheme
        if scheme is None:
            raise ValueError("annotate needs ctx.scheme (the recipe's quantization block)")
        nonneg = _nonnegative_values(graph)
        quantized: list[Node] = []
        for node in graph.nodes:
            reason = self._float_reason(node, scheme)
            node.meta.pop("quantized", None)
            if reason:
                ctx.note("float_nodes", {"node": node.name, "op": node.op_type, "reason": reason})
                continue
            node.meta["quantized"] = True
            quantized.append(node)

        annotated = 0
        for node in quantized:
            rule = rule_for(node)

            def act_spec(value: Value, node: Node = node):
                return scheme.activations_for(node.name, value.name).spec(nonnegative=id(value) in nonneg)

            for index in activation_inputs(node, rule):
                value = node.input(index)
                if value is None or not _is_float(value) or value.meta.get("fused_into"):
                    continue
                if _output_of_float_layer(value):
                    continue
                if value.quant is None:
                    value.quant = act_spec(value)
                    annotated += 1
            if rule.weight_input is not None:
                weight = node.input(rule.weight_input)
                if weight is not None and _is_float(weight):
                    if weight.is_const:
                        axis = rule.weight_axis(node) if rule.weight_axis else None
                        spec = scheme.weights_for(node.name, weight.name).spec(axis=axis)
                    else:
                        spec = act_spec(weight)
                    if weight.quant is None or weight.quant == spec:
                        weight.quant = spec
                        annotated += 1
                    else:  # a constant shared by two layers with different settings: keep the first
                        logger.info("%s: weight '%s' already annotated; keeping its first spec",
                                    node.describe(), weight.name)
            if rule.quantize_outputs:
                for out in node.outputs:
                    if not _is_float(out):
                        continue
                    if self._fuses_into_activation(graph, node, out):
                        out.meta["fused_into"] = out.consumers()[0].name
                        continue
                    out.quant = act_spec(out)
                    if rule.share_input_scale:
                        out.meta["shares_scale_with"] = node.inputs[0].name
                    annotated += 1
        return PassResult(modified=annotated > 0, stats={"quantized_nodes": len(quantized),
                                                         "float_nodes": len(graph.nodes) - len(quantized),
                                                         "annotated_tensors": annotated})

    @staticmethod
    def _float_reason(node: Node, scheme) -> str:
        rule = rule_for(node)
        if rule is None:
            return f"no quantization rule for op '{node.domain + '.' if node.domain else ''}{node.op_type}'"
        override = scheme.override_for(node.name)
        if override is not None and not override.quantize:
            return f"recipe override '{override.match}' keeps it float"
        if node.meta.get("keep_float"):  # set by an earlier pass, e.g. exclude_layers
            return str(node.meta["keep_float"])
        first = node.inputs[0]
        if rule.fusable_activation and first is not None and _output_of_float_layer(first):
            return f"activation of the float layer '{first.producer.name}'"
        if rule.share_input_scale and first is not None and first.producer is not None \
                and (not first.producer.meta.get("quantized") or _output_of_float_layer(first)):
            return f"shares the scale of '{first.name}', which stays float"
        data = [node.input(i) for i in activation_inputs(node, rule)] or [node.input(0)]
        if not any(v is not None and _is_float(v) for v in data):
            return "no floating-point data input"
        return rule.refuse(node)

    @staticmethod
    def _fuses_into_activation(graph: Graph, node: Node, out: Value) -> bool:
        """True when out's only consumer is a quantized Relu/Clip that runtimes fuse as a clamp."""
        if rule_for(node).share_input_scale or out in graph.outputs:
            return False
        consumers = out.consumers()
        if len(consumers) != 1 or len(out.uses()) != 1:
            return False
        act = consumers[0]
        act_rule = rule_for(act)
        return bool(act_rule and act_rule.fusable_activation and act.meta.get("quantized") and act.inputs[0] is out)
