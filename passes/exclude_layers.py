"""`exclude_layers`: keep chosen layers float (the first / last layers, by name, by op type).

Before:  x -> Conv[first] -> ... -> Gemm[last] -> y          (nothing decided yet)
After:   the same graph; Conv[first].meta["keep_float"] = "excluded by exclude_layers (first layer)"
         and Gemm[last].meta["keep_float"] = "excluded by exclude_layers (last layer)"

Partial quantization (Wu et al. 2020, papers.md §5.4): the first and last layers are the usual
sensitive ones. `annotate` honours node.meta["keep_float"] (a reason string), so this pass must
run before it: it is an annotate-phase pass placed before `annotate` in the recipe, e.g.

    passes: [fold_batchnorm, {exclude_layers: {first: 1, last: 1}}, annotate, calibrate, insert_qdq]

and it refuses to run on a graph that `annotate` has already marked.

Options:
- first / last: the number of first / last quantizable layers (Conv, ConvTranspose, Gemm,
  MatMul, counted in topological order) to exclude;
- names: node names, each an exact name or a full-match regular expression;
- op_types: op types, every node of which is excluded (any op, e.g. Add or HardSwish);
- fused_activations (default true): an excluded Conv / ConvTranspose / Gemm / MatMul takes the
  Relu or Clip that is the only reader of its output with it (reason e.g. "(first layer, fused
  activation)"). Runtimes fuse that activation into the layer; left quantized, it would turn the
  layer's pre-activation output (wide and signed) into a quantized tensor of its own, a
  quantization point the fully quantized model does not have. On EfficientNet-Lite0 (W8A8
  per-tensor, 400 images) excluding the first and last layer without their activations gave
  72.25% top-1 against 81.5% for quantizing everything; with them, 79.75%.

The reason names the first rule that matched: "(first layer)", "(first 3 layers)",
"(last layer)", "(name matches '/fc/.*')", "(op type Gemm)". A node an earlier pass already
marked keep_float keeps its reason.

16-bit activations for the excluded layers instead of float are not offered: QuantizeLinear with
16-bit codes needs opset 21, and compile_model imports models at opset 13 or their own, so the
export would be refused for most models. It needs annotate to honour a per-node activation width
(e.g. node.meta["activation_bits"]) and compile_model to import at opset 21 when 16-bit codes
are in use.
"""
from __future__ import annotations

import logging
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from qcompile.errors import PassError
from qcompile.ir import Graph, Node
from qcompile.pipeline import Pass, PassContext, PassResult, Phase
from qcompile.registry import register_pass

__all__ = ["ExcludeLayersOptions", "ExcludeLayersPass", "quantizable_layers"]
logger = logging.getLogger(__name__)

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class ExcludeLayersOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    first: int = Field(0, ge=0)
    last: int = Field(0, ge=0)
    names: list[str] = Field(default_factory=list)
    op_types: list[str] = Field(default_factory=list)
    fused_activations: bool = True

    @field_validator("names")
    @classmethod
    def _valid_patterns(cls, names: list[str]) -> list[str]:
        for name in names:
            try:
                re.compile(name)
            except re.error as exc:
                raise ValueError(f"'{name}' is not a valid regular expression ({exc})") from exc
        return names


def quantizable_layers(graph: Graph) -> list[Node]:
    """Conv / ConvTranspose / Gemm / MatMul nodes of the default domain, in topological order."""
    return [n for n in graph.nodes if n.op_type in LAYER_OPS and n.domain in ("", "ai.onnx")]


def _count(label: str, n: int) -> str:
    return f"{label} layer" if n == 1 else f"{label} {n} layers"


def _fused_activation(graph: Graph, node: Node) -> Node | None:
    """The Relu / Clip that is the only reader of the layer's output, if any."""
    out = node.outputs[0]
    uses = out.uses()
    if len(uses) != 1 or out in graph.outputs or uses[0].index != 0:
        return None
    act = uses[0].node
    return act if act.op_type in ("Relu", "Clip") and act.domain in ("", "ai.onnx") else None


def _matches(pattern: str, name: str) -> bool:
    return name == pattern or re.fullmatch(pattern, name) is not None


@register_pass("exclude_layers")
class ExcludeLayersPass(Pass):
    """Mark the chosen layers keep_float before `annotate` decides what is quantized."""

    phase = Phase.ANNOTATE
    Options = ExcludeLayersOptions
    establishes = frozenset({"exclusions"})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if any(node.meta.get("quantized") for node in graph.nodes) or \
                any(value.quant is not None for value in graph.values.values()):
            raise PassError(f"[{self.name}] the graph is already annotated; put '{self.name}' before 'annotate' "
                            "in the recipe's passes")
        options = self.options
        reasons: dict[int, str] = {}
        layers = quantizable_layers(graph)
        for node in layers[:options.first]:
            reasons.setdefault(id(node), _count("first", options.first))
        for node in layers[len(layers) - min(options.last, len(layers)):]:
            reasons.setdefault(id(node), _count("last", options.last))
        for node in graph.nodes:
            if id(node) in reasons:
                continue
            pattern = next((p for p in options.names if _matches(p, node.name)), None)
            if pattern is not None:
                reasons[id(node)] = f"name matches '{pattern}'"
            elif node.op_type in options.op_types:
                reasons[id(node)] = f"op type {node.op_type}"

        if options.fused_activations:
            for node in graph.nodes:
                if node.op_type in LAYER_OPS and id(node) in reasons:
                    act = _fused_activation(graph, node)
                    if act is not None:
                        reasons.setdefault(id(act), f"{reasons[id(node)]}, fused activation")

        unmatched = [p for p in options.names if not any(_matches(p, n.name) for n in graph.nodes)]
        for pattern in unmatched:
            logger.warning("exclude_layers: no node name matches '%s'", pattern)
            ctx.note("exclude_layers", {"unmatched_name": pattern})

        excluded = 0
        for node in graph.nodes:
            if id(node) not in reasons or node.meta.get("keep_float"):
                continue
            node.meta["keep_float"] = f"excluded by exclude_layers ({reasons[id(node)]})"
            excluded += 1
        return PassResult(modified=excluded > 0, stats={"excluded": excluded, "layers": len(layers),
                                                        "unmatched_names": len(unmatched)})
