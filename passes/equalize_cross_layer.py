"""`equalize_cross_layer`: rescale channels between consecutive layers so their weight ranges match.

Before:  x -> Conv(W1, b1) -> Clip(0, 6) -> Pad -> Conv_dw(W2, b2) -> Clip(0, 6) -> Conv(W3, b3) -> y
After:   x -> Conv(S1⁻¹W1, S1⁻¹b1) -> Clip(0, max 6/s1) -> Min(6/s1) -> Pad
              -> Conv_dw(S2⁻¹W2 S1, S2⁻¹b2) -> Clip(0, max 6/s2) -> Min(6/s2) -> Conv(W3 S2, b3) -> y
float-equivalent: W2·f(W1x + b1) = (W2 S)·f(S⁻¹W1x + S⁻¹b1) for every positive-homogeneous f
(Nagel et al. 2019, "Data-Free Quantization", §4.1; ../shared/papers.md §1.2). With r1_i the
range max|W1| of output channel i and r2_i that of input channel i of the next layer, the
scale s_i = sqrt(r1_i / r2_i) makes both ranges sqrt(r1_i·r2_i), which is what a per-tensor
weight quantizer needs.

What is equalized (a link): Conv / Gemm -> path -> Conv / Gemm, where every value on the way has
a single use and the path holds only ops that commute with a positive per-channel scale: Relu,
LeakyRelu, PRelu, Identity, Clip(0, hi), Min with a constant (rescaled), Pad over spatial axes
(not constant-mode with a non-zero value), MaxPool, AveragePool, GlobalAveragePool,
GlobalMaxPool, and a final Flatten / Reshape [N,C,H,W] -> [N,C·H·W] into a Gemm (input channel i
of the Gemm is then its H·W columns). Grouped layers are handled per channel (a scale never
crosses a group), depthwise ones included. Links form chains (a depthwise conv is the second
layer of one link and the first of the next); chains are swept until no scale of a sweep moves
by more than `tolerance` (in |log s|) or `max_iterations` sweeps ran. With
`depthwise: closed_form` a conv -> depthwise -> conv triple is set in one step to the common
range c = (r0·r1·r2)^(1/3) (AIMET's form, papers.md §1.2) — the same fixed point the pairwise
sweeps reach, in fewer sweeps; `pairwise` uses only pairs.

ReLU6 is kept exact. After scaling channel i by 1/s_i, Clip(x, 0, 6) becomes a clip at 6/s_i per
channel, written as Clip(0, max_i 6/s_i) -> Min(x, c) with c = 6/s_i of shape [C, 1, 1]: the
scalar Clip bounds the tensor the quantizer sees (insert_qdq absorbs it into the output
quantizer as usual, so onnxruntime fuses one clamp value into its int8 Conv), and the Min applies
the per-channel bound. Replacing ReLU6 by ReLU, as the paper and AIMET do, changes
EfficientNet-Lite0's float top-1 from 88.75 to 60.50 (../shared/findings.md): not offered.
op_rules quantizes Min with a constant >= 0 as a clamp sharing its input's scale: the codes pass
through unchanged except for the per-channel bound (DequantizeLinear -> Min -> QuantizeLinear
with one scale; an integer runtime can do it as a per-channel integer min).
Measured with benchmarks/bench_dfq_ablation.py (EfficientNet-Lite0 with BN, fold_batchnorm first,
W8A8 per-tensor symmetric, max calibration, 400 images; int8 top-1 / agreement with FP32 top-1 %,
mean KL(FP32 || INT8); the float model stays 88.75 / 100 in every row; the two op-rule variants
were measured by swapping the Min rule in-process):
    no CLE                                          81.25 / 85.50  KL 0.242
    relu6: skip (only 2 of 35 links have no ReLU6)  82.25 / 86.50  KL 0.205
    Clip + Min, Min without an op rule              85.50 / 91.75  KL 0.090  (Min output not proven
                                                                    >= 0 -> signed codes, half the resolution)
    Clip + Min, Min with its own range              87.75 / 96.25  KL 0.029
    Clip + Min, Min sharing its input's scale       87.75 / 96.50  KL 0.029  <- chosen (same accuracy,
                                                                    no requantization)
    depthwise: pairwise instead of closed_form      87.50 / 96.25  KL 0.029  (46 sweeps instead of 35)
    min_relative_range: 0 (no dead-channel guard)   87.75 / 96.50  KL 0.040
Choosing the scales so that every channel's clip 6/s_i lies above the tensor's quantization range
(the clip then being implied by the output quantizer) would need every channel that reaches 6 to
share one scale. On EfficientNet-Lite0 most channels do (the stem and the first depthwise layer
clip 3.7% and 7.9% of their values), so that constraint leaves little to equalize, and it is
data-dependent. It is not offered.
Convergence (tolerance 1e-6): 35 links in 15 chains with 16 depthwise triples, 35 sweeps
closed_form / 46 pairwise (62 pairwise sweeps at 1e-8), ~2 s. Depthwise weight spread
(max / median of the per-channel max|W|) goes from 3.3-17.5 to 1.4-3.3.

Dead channels (range below `min_relative_range` × the layer's largest: 123 in EfficientNet-Lite0,
where 130 channels have BN variance 0) are left unscaled: scaling them by ~1e-3 would blow
their constant bias up into the activation range (findings.md).

The folded BatchNorm statistics a producer keeps in node.meta["batchnorm"] = {"gamma", "beta"}
are divided by s_i with its output channels, so absorb_high_bias and bias correction still see
the distribution of the (rescaled) pre-activation.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from qcompile.ir import Graph, Node, Value
from qcompile.pipeline import Pass, PassContext, PassResult, Phase
from qcompile.registry import register_pass

__all__ = ["EqualizeCrossLayerPass", "Layer", "Link", "UpperBound", "clip_bounds", "find_links",
           "min_constant_is_per_channel", "per_channel", "set_upper_bound"]
logger = logging.getLogger(__name__)

# Ops on the path between two layers that commute with a positive per-channel scale as they are.
_HOMOGENEOUS = {"Relu", "LeakyRelu", "PRelu", "Identity", "MaxPool", "AveragePool",
                "GlobalAveragePool", "GlobalMaxPool"}


# ---- layers -----------------------------------------------------------------------------------
def layer_reason(node: Node) -> str:
    """Empty when node can take part in equalization as a Conv / Gemm layer; otherwise why not."""
    if node.op_type not in ("Conv", "Gemm") or node.domain not in ("", "ai.onnx"):
        return "not a Conv or Gemm"
    weight, bias = node.input(1), node.input(2)
    if weight is None or not weight.is_const or weight.const.dtype.kind != "f":
        return "weight is not a float constant"
    if bias is not None and not bias.is_const:
        return "bias is not a constant"
    if node.op_type == "Conv":
        if weight.const.ndim < 3:
            return "Conv weight of rank < 3"
        groups = node.attr("group", 1)
        if weight.const.shape[0] % groups:
            return "output channels not divisible by group"
    else:
        if weight.const.ndim != 2 or node.attr("transA", 0):
            return "Gemm with transA or a non-matrix B"
        if node.attr("alpha", 1.0) != 1.0 or node.attr("beta", 1.0) != 1.0:
            return "Gemm with alpha/beta != 1"
    out_channels = weight.const.shape[0] if node.op_type == "Conv" or node.attr("transB", 0) else weight.const.shape[1]
    if bias is not None and bias.const.shape != (out_channels,):
        return "bias is not a vector over output channels"
    return ""


class Layer:
    """A Conv / Gemm's weight in float64, canonical [C_out, C_in/group, ...] (Gemm: [N, K]).

    Edits accumulate here; commit() writes new constants into the graph once.
    """

    def __init__(self, node: Node):
        self.node = node
        w = node.input(1).const.astype(np.float64)
        self.transposed = node.op_type == "Gemm" and not node.attr("transB", 0)
        self.w = w.T.copy() if self.transposed else w.copy()
        bias = node.input(2)
        self.b = bias.const.astype(np.float64) if bias is not None else None
        self.group = node.attr("group", 1) if node.op_type == "Conv" else 1
        self.out_scale = np.ones(self.out_channels)  # product of the divisors applied to each output channel
        self.bias_shift = np.zeros(self.out_channels)  # added to b (and BN beta) by absorption
        self.changed = False

    @property
    def out_channels(self) -> int:
        return self.w.shape[0]

    @property
    def in_channels(self) -> int:
        return self.w.shape[1] * self.group

    @property
    def is_depthwise(self) -> bool:
        """One input channel per group and one output channel per input channel."""
        return self.node.op_type == "Conv" and self.w.shape[1] == 1 and self.group == self.out_channels > 1

    def _grouped(self) -> np.ndarray:  # [groups, C_out/group, C_in/group, taps]
        return self.w.reshape(self.group, self.out_channels // self.group, self.w.shape[1], -1)

    def out_ranges(self) -> np.ndarray:
        return np.abs(self.w).reshape(self.out_channels, -1).max(axis=1)

    def in_ranges(self, columns: int = 1) -> np.ndarray:
        """max|W| per input channel; `columns` input features per channel (after a Flatten)."""
        r = np.abs(self._grouped()).max(axis=(1, 3)).reshape(-1)
        return r.reshape(-1, columns).max(axis=1)

    def in_sums(self, shift: np.ndarray, columns: int = 1) -> np.ndarray:
        """Σ over taps and input channels of W · shift[input channel]: what a constant input adds per output."""
        per_input = np.repeat(shift, columns).reshape(self.group, 1, self.w.shape[1])
        return (self._grouped().sum(axis=3) * per_input).sum(axis=2).reshape(-1)

    def divide_outputs(self, s: np.ndarray) -> None:
        self.w /= s.reshape((-1,) + (1,) * (self.w.ndim - 1))
        if self.b is not None:
            self.b /= s
        self.out_scale *= s
        self.changed = True

    def multiply_inputs(self, s: np.ndarray, columns: int = 1) -> None:
        factor = np.repeat(s, columns).reshape(self.group, 1, self.w.shape[1], 1)
        self.w = (self._grouped() * factor).reshape(self.w.shape)
        self.changed = True

    def add_to_bias(self, delta: np.ndarray, *, batchnorm_shift: bool) -> None:
        self.b = (self.b if self.b is not None else np.zeros(self.out_channels)) + delta
        if batchnorm_shift:
            self.bias_shift += delta
        self.changed = True

    def commit(self, graph: Graph, tag: str) -> None:
        if not self.changed:
            return
        node = self.node
        weight, bias = node.input(1), node.input(2)
        w = self.w.T if self.transposed else self.w
        node.replace_input(1, graph.add_constant(f"{weight.name}_{tag}", w.astype(weight.const.dtype)))
        if self.b is not None:
            dtype = bias.const.dtype if bias is not None else weight.const.dtype
            node.set_input(2, graph.add_constant(f"{node.name}_bias_{tag}", self.b.astype(dtype)))
        bn = node.meta.get("batchnorm")
        if bn is not None:
            gamma = bn["gamma"].astype(np.float64) / self.out_scale
            beta = bn["beta"].astype(np.float64) / self.out_scale + self.bias_shift
            node.meta["batchnorm"] = {"gamma": gamma.astype(np.float32), "beta": beta.astype(np.float32)}
        self.changed = False


# ---- per-channel upper bounds (ReLU6 and its rescaled forms) ----------------------------------
def _const_input(node: Node, index: int) -> np.ndarray | None:
    value = node.input(index)
    return value.const if value is not None and value.is_const else None


def clip_bounds(node: Node) -> tuple[float | None, float | None] | None:
    """(low, high) of a Clip with constant bounds (None: unbounded), or None if not constant."""
    bounds = []
    for index, attr in ((1, "min"), (2, "max")):
        value = node.input(index)
        if value is not None:
            if not value.is_const or value.const.size != 1:
                return None
            bounds.append(float(value.const.reshape(-1)[0]))
        else:
            bound = node.attr(attr)
            bounds.append(float(bound) if bound is not None else None)
    low, high = bounds
    if high is not None and math.isinf(high):
        high = None
    if low is not None and math.isinf(low) and low < 0:
        low = None
    return low, high


def _min_constant_index(node: Node, data: Value) -> int | None:
    """Index of the constant operand of a two-input Min whose other operand is data."""
    if node.op_type != "Min" or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    index = 1 if node.input(0) is data else 0 if node.input(1) is data else None
    if index is None or node.input(index) is None or not node.input(index).is_const:
        return None
    return index


@dataclass
class UpperBound:
    """A per-channel upper clamp on the path: Clip(0, hi) and/or a following Min with a constant."""

    clip: Node | None
    minimum: Node | None  # Min node
    channels: int
    rank: int  # rank of the clamped tensor (the Min constant is [C] + [1]*(rank-2))
    min_index: int = 1  # which input of the Min is the constant

    def bounds(self) -> np.ndarray:
        """The effective upper bound of every channel (inf where none)."""
        out = np.full(self.channels, np.inf)
        if self.clip is not None:
            high = clip_bounds(self.clip)[1]
            if high is not None:
                out = np.minimum(out, high)
        if self.minimum is not None:
            out = np.minimum(out, per_channel(self.minimum.input(self.min_index).const, self.channels))
        return out


def per_channel(const: np.ndarray, channels: int) -> np.ndarray:
    """A constant broadcast against [N, C, ...] as one value per channel (float64 [C])."""
    a = np.asarray(const, dtype=np.float64)
    if a.size == 1:
        return np.full(channels, float(a.reshape(-1)[0]))
    return np.broadcast_to(a.reshape(-1), (channels,)).copy()


def min_constant_is_per_channel(const: np.ndarray, channels: int, rank: int) -> bool:
    if const.size == 1:
        return const.ndim <= rank
    shape = (1,) * (rank - const.ndim) + tuple(const.shape)
    return len(shape) == rank and shape[1] == channels and all(d == 1 for i, d in enumerate(shape) if i != 1)


def set_upper_bound(graph: Graph, bound: UpperBound, new: np.ndarray, tag: str) -> None:
    """Make the clamp clip channel i at new[i]: Clip(0, max new) [-> Min(new [C,1,1])].

    A uniform bound needs no Min (an existing one is removed); otherwise the existing Min's
    constant is replaced or a Min is inserted after the Clip.
    """
    new = np.asarray(new, dtype=np.float64)
    uniform = bool(np.all(new == new[0]))
    if bound.clip is not None:
        clip = bound.clip
        high = np.float32(new.max())
        if "max" in clip.attributes:  # Clip-6 attribute form
            clip.set_attr("max", float(high))
        else:
            clip.set_input(2, graph.add_constant(f"{clip.name}_max_{tag}", np.asarray(high, np.float32)))
        data = clip.outputs[0]
    else:
        data = None
    if uniform and bound.clip is not None:
        if bound.minimum is not None:
            out = bound.minimum.outputs[0]
            out.replace_all_uses_with(data)
            graph.remove_node(bound.minimum)
            bound.minimum = None
        return
    shape = (bound.channels,) + (1,) * (bound.rank - 2)
    const = graph.add_constant(f"{(bound.clip or bound.minimum).name}_per_channel_max_{tag}",
                               new.astype(np.float32).reshape(shape))
    if bound.minimum is not None:
        bound.minimum.replace_input(bound.min_index, const)
        return
    out = data
    m = graph.add_node("Min", [out, const], 1, name=f"{bound.clip.name}_per_channel", after=bound.clip)
    m.outputs[0].dtype, m.outputs[0].shape = out.dtype, out.shape
    out.replace_all_uses_with(m.outputs[0], except_nodes=[m])
    bound.minimum, bound.min_index = m, 1


# ---- links ------------------------------------------------------------------------------------
@dataclass
class Link:
    """first -> path -> second, with channel i of first's output feeding `columns` inputs of second."""

    first: Node
    second: Node
    path: list[Node]
    columns: int = 1
    bound: UpperBound | None = None  # the per-channel clamp on the path, if any
    activation: str = "identity"  # identity | relu | clip | leaky (LeakyRelu / PRelu)
    padded: bool = False  # second sees zero padding (its own pads or a Pad on the path)
    scale: np.ndarray | None = field(default=None, repr=False)  # accumulated s (first's channels / s)


def _tensor_rank(layer_node: Node) -> int:
    if layer_node.op_type == "Gemm":
        return 2
    return layer_node.input(1).const.ndim


def _pads_nonzero(node: Node) -> bool:
    if node.op_type == "Conv":
        auto_pad = node.attr("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        return auto_pad not in ("NOTSET", "VALID") or any(node.attr("pads", []) or [])
    return False


def _pad_step(node: Node, rank: int) -> tuple[bool, bool] | None:
    """(ok, pads anything) for a Pad on the path: spatial pads only, padding value 0 if constant."""
    mode = node.attr("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if node.input(1) is not None:
        pads = _const_input(node, 1)
        if pads is None:
            return None
        value = _const_input(node, 2) if node.input(2) is not None else np.zeros(1)
        if value is None or (len(node.inputs) > 3 and node.input(3) is not None):
            return None  # non-constant value, or the opset-18 `axes` input
    else:
        pads = np.asarray(node.attr("pads", []))
        value = np.asarray(node.attr("value", 0.0))
    pads = np.asarray(pads).reshape(-1)
    if pads.size != 2 * rank or pads[[0, 1, rank, rank + 1]].any():
        return None  # pads the batch or channel axis
    if mode == "constant" and float(np.asarray(value).reshape(-1)[0]) != 0.0:
        return None
    return True, bool(pads.any()) and mode == "constant"


def _flatten_columns(node: Node, channels: int) -> int | None:
    """Columns per channel when node flattens [N, C, ...] to [N, C·rest]; None otherwise."""
    src, dst = node.inputs[0].shape, node.outputs[0].shape
    if src is None or dst is None or len(dst) != 2 or len(src) < 2:
        return None
    if node.op_type == "Flatten" and node.attr("axis", 1) != 1:
        return None
    rest = src[2:]
    if not all(isinstance(d, int) for d in (*rest, src[1], dst[1])) or src[1] != channels:
        return None
    columns = int(np.prod(rest)) if rest else 1
    return columns if dst[1] == channels * columns else None


def follow_link(graph: Graph, first: Node) -> tuple[Link | None, str]:
    """The link starting at first's output, or (None, why not)."""
    if layer_reason(first):
        return None, layer_reason(first)
    channels = Layer(first).out_channels if first.op_type == "Gemm" else first.input(1).const.shape[0]
    rank = _tensor_rank(first)
    value = first.outputs[0]
    link = Link(first, first, [])
    while True:
        if value in graph.outputs or len(value.uses()) != 1:
            return None, f"'{value.name}' has more than one use"
        use = value.uses()[0]
        node = use.node
        if node.op_type in ("Conv", "Gemm") and use.index == 0:
            reason = layer_reason(node)
            if reason:
                return None, f"{node.describe()}: {reason}"
            second = Layer(node)
            if second.in_channels != channels * link.columns:
                return None, f"{node.describe()}: input channels do not match"
            link.second = node
            link.padded = link.padded or _pads_nonzero(node)
            return link, ""
        if link.columns != 1 or use.index < 0 or len([o for o in node.outputs if o.uses() or o in graph.outputs]) > 1:
            return None, f"{node.describe()} cannot be scaled through"
        if node.op_type in _HOMOGENEOUS:
            if use.index != 0:
                return None, f"{node.describe()}: data is not input 0"
            if node.op_type in ("LeakyRelu", "PRelu"):
                link.activation = "leaky" if link.activation == "identity" else "mixed"
            elif node.op_type == "Relu":
                link.activation = "relu" if link.activation in ("identity", "relu") else "mixed"
            elif node.op_type == "AveragePool" and any(node.attr("pads", []) or []) \
                    and node.attr("count_include_pad", 0):
                link.padded = True
        elif node.op_type == "Clip" and use.index == 0:
            bounds = clip_bounds(node)
            if bounds is None or bounds[0] != 0.0 or link.bound is not None:
                return None, f"{node.describe()}: only Clip(0, hi) with constant bounds, once per link"
            link.activation = "clip" if link.activation in ("identity", "relu") else "mixed"
            if bounds[1] is not None:
                link.bound = UpperBound(node, None, channels, rank)
        elif node.op_type == "Min" and _min_constant_index(node, value) is not None:
            index = _min_constant_index(node, value)
            if not min_constant_is_per_channel(node.input(index).const, channels, rank):
                return None, f"{node.describe()}: constant is not per channel"
            if link.bound is not None and link.bound.minimum is None and link.path and link.path[-1] is link.bound.clip:
                link.bound.minimum, link.bound.min_index = node, index
            elif link.bound is None and link.activation in ("relu", "clip"):
                link.bound = UpperBound(None, node, channels, rank, index)
            else:
                return None, f"{node.describe()}: more than one clamp on the path"
        elif node.op_type == "Pad" and use.index == 0:
            step = _pad_step(node, rank)
            if step is None:
                return None, f"{node.describe()}: pads the channel axis or a non-zero value"
            link.padded = link.padded or step[1]
        elif node.op_type in ("Flatten", "Reshape") and use.index == 0:
            columns = _flatten_columns(node, channels)
            if columns is None:
                return None, f"{node.describe()}: not a flatten of [N, C, ...] into [N, C*rest]"
            link.columns = columns
        else:
            return None, f"{node.describe()} does not commute with a per-channel scale"
        link.path.append(node)
        value = node.outputs[0]


def find_links(graph: Graph) -> tuple[list[Link], list[dict]]:
    """Every link in the graph, in graph order, and the refusals worth reporting."""
    links, refused = [], []
    for node in graph.nodes:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        link, reason = follow_link(graph, node)
        if link is not None:
            links.append(link)
        elif not layer_reason(node) and "does not commute" not in reason and "more than one use" not in reason:
            refused.append({"node": node.name, "reason": reason})
    return links, refused


def chains(links: list[Link]) -> list[list[Link]]:
    """Links grouped into chains first -> ... -> last (a layer is second of at most one link)."""
    by_first = {id(link.first): link for link in links}
    seconds = {id(link.second) for link in links}
    out = []
    for link in links:
        if id(link.first) in seconds:
            continue
        chain = [link]
        while id(chain[-1].second) in by_first:
            chain.append(by_first[id(chain[-1].second)])
        out.append(chain)
    return out


# ---- the pass ---------------------------------------------------------------------------------
class EqualizeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_iterations: int = Field(100, ge=1, description="sweeps over every chain at most")
    tolerance: float = Field(1e-6, gt=0, description="stop when no scale of a sweep moves |log s| more")
    depthwise: Literal["closed_form", "pairwise"] = "closed_form"
    relu6: Literal["per_channel", "skip"] = Field(
        "per_channel", description="per_channel: keep Clip(0, hi) exact as Clip + Min; skip: no equalizing through it")
    min_relative_range: float = Field(
        1e-5, ge=0, description="channels with a smaller weight range (x the layer's largest) stay unscaled")


@register_pass("equalize_cross_layer")
class EqualizeCrossLayerPass(Pass):
    """Cross-layer equalization of Conv/Gemm chains (pairs, depthwise triples, grouped, Gemm)."""

    phase = Phase.TRANSFORM
    Options = EqualizeOptions
    establishes = frozenset({"cross_layer_equalized"})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        opts = self.options
        links, refused = find_links(graph)
        for item in refused:
            ctx.note("not_equalized", item)
        if opts.relu6 == "skip":
            links = [link for link in links if link.bound is None]
        layers: dict[int, Layer] = {}
        for link in links:
            for node in (link.first, link.second):
                layers.setdefault(id(node), Layer(node))
            link.scale = np.ones(layers[id(link.first)].out_channels)
        groups = chains(links)
        sweeps, delta = 0, 0.0
        triples = sum(self._triple_count(chain, layers) for chain in groups) if opts.depthwise == "closed_form" else 0
        for sweeps in range(1, opts.max_iterations + 1):
            delta = max((self._sweep(chain, layers) for chain in groups), default=0.0)
            if delta < opts.tolerance:
                break
        converged = delta < opts.tolerance
        for link in links:
            if link.bound is not None and not np.all(link.scale == 1.0):
                set_upper_bound(graph, link.bound, link.bound.bounds() / link.scale, "cle")
        for layer in layers.values():
            layer.commit(graph, "cle")
        graph.remove_unused()
        if not converged:
            logger.warning("equalize_cross_layer: not converged after %d sweeps (last max |log s| = %.2e)",
                           sweeps, delta)
        dead = sum(int(np.sum(self._dead(layers[id(l.first)].out_ranges(), opts))) for l in links)
        stats = {"links": len(links), "chains": len(groups), "triples": triples, "sweeps": sweeps if links else 0,
                 "converged": converged, "last_max_abs_log_scale": float(delta),
                 "per_channel_clips": sum(1 for l in links if l.bound is not None and l.bound.minimum is not None),
                 "dead_channels": dead}
        return PassResult(modified=bool(links), stats=stats)

    # -- scales -------------------------------------------------------------------------------
    def _dead(self, ranges: np.ndarray, opts: EqualizeOptions) -> np.ndarray:
        top = ranges.max() if ranges.size else 0.0
        return ranges <= opts.min_relative_range * top

    def _pair_scale(self, r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
        dead = self._dead(r1, self.options) | self._dead(r2, self.options)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.sqrt(r1 / r2)
        return np.where(dead | ~np.isfinite(s) | (s <= 0), 1.0, s)

    @staticmethod
    def _apply(link: Link, layers: dict[int, Layer], s: np.ndarray) -> float:
        layers[id(link.first)].divide_outputs(s)
        layers[id(link.second)].multiply_inputs(s, link.columns)
        link.scale *= s
        return float(np.abs(np.log(s)).max()) if s.size else 0.0

    def _pair(self, link: Link, layers: dict[int, Layer]) -> float:
        first, second = layers[id(link.first)], layers[id(link.second)]
        return self._apply(link, layers, self._pair_scale(first.out_ranges(), second.in_ranges(link.columns)))

    def _triple(self, a: Link, b: Link, layers: dict[int, Layer]) -> float:
        """conv -> depthwise -> conv in closed form: all three ranges become (r0·r1·r2)^(1/3)."""
        r0 = layers[id(a.first)].out_ranges()
        r1 = layers[id(a.second)].out_ranges()
        r2 = layers[id(b.second)].in_ranges(b.columns)
        d0, d1, d2 = (self._dead(r, self.options) for r in (r0, r1, r2))
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.cbrt(r0 * r1 * r2)
            s12 = np.where(d0 | d1, 1.0, np.where(d2, np.sqrt(r0 / r1), r0 / c))
            s23 = np.where(d1 | d2, 1.0, np.where(d0, np.sqrt(r1 / r2), c / r2))
        s12 = np.where(np.isfinite(s12) & (s12 > 0), s12, 1.0)
        s23 = np.where(np.isfinite(s23) & (s23 > 0), s23, 1.0)
        return max(self._apply(a, layers, s12), self._apply(b, layers, s23))

    def _is_triple(self, a: Link, b: Link, layers: dict[int, Layer]) -> bool:
        return self.options.depthwise == "closed_form" and a.second is b.first and layers[id(a.second)].is_depthwise

    def _triple_count(self, chain: list[Link], layers: dict[int, Layer]) -> int:
        count, j = 0, 0
        while j < len(chain):
            if j + 1 < len(chain) and self._is_triple(chain[j], chain[j + 1], layers):
                count, j = count + 1, j + 2
            else:
                j += 1
        return count

    def _sweep(self, chain: list[Link], layers: dict[int, Layer]) -> float:
        delta, j = 0.0, 0
        while j < len(chain):
            if j + 1 < len(chain) and self._is_triple(chain[j], chain[j + 1], layers):
                delta, j = max(delta, self._triple(chain[j], chain[j + 1], layers)), j + 2
            else:
                delta, j = max(delta, self._pair(chain[j], layers)), j + 1
        return delta
