"""`fold_batchnorm`: fold inference-mode BatchNormalization into the preceding linear layer.

Before:  x -> Conv(W, b) -> BatchNormalization(γ, β, μ, σ²) -> y
After:   x -> Conv(W', b') -> y
with σ̂ = sqrt(σ² + ε), W'[oc] = W[oc] · γ[oc]/σ̂[oc] and b' = (b − μ) · γ/σ̂ + β
(Jacob et al. 2018 §3.2; Nagel et al. 2019 (DFQ) §1.1 of ../shared/papers.md).

Handled producers: Conv (any group), ConvTranspose (group 1; output channels on weight axis 1)
and Gemm (B constant; output features on axis 0 if transB else 1). The BN must be the
producer's only consumer and have constant parameters. A weight shared with other nodes is
copied rather than changed under them.

The folded BN's γ and β per output channel are kept on the producer as node.meta["batchnorm"]
= {"gamma": γ, "beta": β}: DFQ's high-bias absorption and analytic bias correction model the
pre-activation of channel c as N(β_c, γ_c²) and need them.
"""
from __future__ import annotations

import logging

import numpy as np

from qcompile.ir import Graph, Node
from qcompile.pipeline import Pass, PassContext, PassResult, Phase
from qcompile.registry import register_pass

__all__ = ["FoldBatchNormPass"]
logger = logging.getLogger(__name__)


def _output_axis(node: Node) -> int | None:
    """Axis of the producer's weight that indexes output channels, or None if not foldable."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if node.attr("group", 1) == 1 else None
    if node.op_type == "Gemm":
        return 0 if node.attr("transB", 0) else 1
    return None


def _why_not(graph: Graph, bn: Node) -> str:
    """Empty when bn can be folded into its producer; otherwise the reason."""
    if len(bn.outputs) != 1 or bn.attr("training_mode", 0):
        return "BatchNormalization in training mode"
    if not all(v is not None and v.is_const for v in bn.inputs[1:5]):
        return "BatchNormalization parameters are not constants"
    x = bn.inputs[0]
    producer = x.producer
    if producer is None or _output_axis(producer) is None:
        return "no foldable producer (Conv, ConvTranspose with group 1, Gemm)"
    if len(x.uses()) != 1 or x in graph.outputs:
        return f"producer output '{x.name}' has other uses"
    if any(use.index < 0 for use in bn.outputs[0].uses()):
        return "a subgraph reads the BatchNormalization output by name"
    weight = producer.input(1)
    if weight is None or not weight.is_const:
        return f"{producer.describe()} weight is not a constant"
    bias = producer.input(2)
    if bias is not None and not bias.is_const:
        return f"{producer.describe()} bias is not a constant"
    if producer.op_type == "Gemm" and (producer.attr("alpha", 1.0) != 1.0 or producer.attr("beta", 1.0) != 1.0
                                       or (bias is not None and bias.const.ndim != 1)):
        return "Gemm with alpha/beta != 1 or a non-vector bias"
    return ""


def _try_fold(graph: Graph, bn: Node) -> bool:
    if _why_not(graph, bn):
        return False
    producer = bn.inputs[0].producer
    gamma, beta, mean, var = (v.const.astype(np.float64) for v in bn.inputs[1:5])
    eps = bn.attr("epsilon", 1e-5)
    factor = gamma / np.sqrt(var + eps)
    weight = producer.input(1)
    axis = _output_axis(producer)
    shape = [1] * weight.const.ndim
    shape[axis] = -1
    new_w = (weight.const.astype(np.float64) * factor.reshape(shape)).astype(weight.const.dtype)
    bias = producer.input(2)
    old_b = bias.const.astype(np.float64) if bias is not None else np.zeros_like(mean)
    new_b = ((old_b - mean) * factor + beta).astype(weight.const.dtype)

    w_value = graph.add_constant(f"{weight.name}_bnfolded", new_w)
    b_value = graph.add_constant(f"{producer.name}_bias_bnfolded", new_b)
    producer.replace_input(1, w_value)
    producer.set_input(2, b_value)
    producer.meta["batchnorm"] = {"gamma": gamma.astype(np.float32), "beta": beta.astype(np.float32)}
    out, folded = bn.outputs[0], bn.inputs[0]
    is_graph_output = out in graph.outputs
    out.replace_all_uses_with(folded)
    if is_graph_output:
        graph.outputs[graph.outputs.index(out)] = folded
    graph.remove_node(bn, safe=False)
    if is_graph_output:  # the model's output keeps its name
        graph.rename_value(folded, out.name)
    return True


@register_pass("fold_batchnorm")
class FoldBatchNormPass(Pass):
    """Fold every foldable BatchNormalization into its Conv / ConvTranspose / Gemm producer."""

    phase = Phase.TRANSFORM
    establishes = frozenset({"batchnorm_folded"})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        folded = 0
        for node in graph:
            if node.op_type == "BatchNormalization" and node in graph.nodes:
                if _try_fold(graph, node):
                    folded += 1
                else:
                    ctx.note("not_folded", {"node": node.name, "reason": _why_not(graph, node)})
        graph.remove_unused()
        return PassResult(modified=folded > 0, stats={"folded": folded})
