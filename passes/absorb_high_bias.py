"""`absorb_high_bias`: move the part of a layer's bias that its activation always passes into the next layer.

Before:  x -> Conv(W1, b1) -> Clip(0, u) -> Conv(W2, b2) -> y
After:   x -> Conv(W1, b1 − c) -> Clip(0, max(u − c)) [-> Min(u − c)] -> Conv(W2, b2 + W2_sum·c) -> y
with W2_sum[o, i] = Σ over kernel taps of W2[o, i] (Nagel et al. 2019, "Data-Free Quantization",
§4.2; ../shared/papers.md §1.3). If the pre-activation x_i ≥ c_i for every input, then
relu(x − c) = relu(x) − c and clip(x − c, 0, u − c) = clip(x, 0, u) − c, and layer 2 adds W2·c
back. The activation's range shrinks by c, which helps a per-tensor activation quantizer. The
upper clip bound moves with the bias (u − c per channel, kept exact as Clip + Min like
equalize_cross_layer). c is capped at u: a channel that is always at u becomes 0, and layer 2
adds u·W2.

How c is chosen (`lower_bound`):
- `interval` (default, exact): a bound that holds for every input. Layer 1 reads data that a
  Clip / Relu / per-channel Min bounds to [lo_j, hi_j] per input channel (through Pad, pooling,
  Identity), so x_i ≥ b1_i + Σ W1⁺·lo + Σ W1⁻·hi, and c_i = clip(that, 0, u_i). Layers whose
  input is unbounded (after a residual Add, the graph input) get c = 0.
- `batchnorm`: the paper's c_i = max(0, β_i − n_sigma·|γ_i|) from the folded BatchNorm
  (node.meta["batchnorm"], rescaled by equalize_cross_layer). This is not exact. On
  EfficientNet-Lite0 the real pre-activations reach 5-22 σ below β on 20 images, even in the
  unpadded depthwise -> project links, so this choice changes the float model.
Other cases: with no activation between the layers (identity), the whole mean moves, c = β, which
is exact for every input (AIMET does the same). Dead channels (weight range ≤
`min_relative_range` × the layer's largest) output the constant b1_i, so c = act(b1_i) moves
all of it; the paper's rule misses them (BN scale ≈ 1 but no real spread, findings.md).
LeakyRelu / PRelu links are left alone.

Zero padding (a Pad on the path or pads on layer 2) makes W2_sum·c wrong at the borders: there
layer 2 reads the padding 0 where it should now read −c. `padding`:
- `exact_only` (default): such links are skipped;
- `explicit`: absorb anyway and correct the border with data. The padding becomes an explicit Pad
  (taken out of layer 2's pads) followed by Add(−c on the padded border, 0 inside), so layer 2
  reads exactly what it read before (one more Add and requantization per link);
- `ignore`: absorb as the paper writes it (changes the float model at the borders).
Measured with benchmarks/bench_dfq_ablation.py on EfficientNet-Lite0 with BN after fold +
exact CLE (W8A8 per-tensor symmetric, max calibration, 400 images; float top-1 / float
agreement -> int8 top-1 / agreement, %, mean KL(FP32 || INT8)):
    no absorption                       88.75 / 100.00 -> 87.75 / 96.50  KL 0.0285
    interval, exact_only (default)      88.75 / 100.00 -> 87.25 / 97.00  KL 0.0281  (12 links, 724 ch.)
    interval, explicit                  identical: the interval c of the padded expand -> depthwise
                                        links is 0 (the expand convs read unbounded residual sums)
    batchnorm, exact_only               88.25 /  99.00 -> 86.75 / 96.25  KL 0.0328  (18 links)
    batchnorm, explicit                 88.25 /  98.75 -> 87.25 / 95.75  KL 0.0398  (34 links, 16 Adds)
    batchnorm, ignore (as in the paper) 87.75 /  96.00 -> 87.25 / 94.00  KL 0.0498
One image is 0.25 points here, so the default's gain is within noise (KL 0.0285 -> 0.0281). It
leaves the float model unchanged and costs nothing. The paper's variants make it worse.
"""
from __future__ import annotations

import logging
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from qcompile.ir import Graph, Node, Value
from qcompile.passes.equalize_cross_layer import (Layer, Link, clip_bounds, find_links, min_constant_is_per_channel,
                                                  per_channel, set_upper_bound)
from qcompile.pipeline import Pass, PassContext, PassResult, Phase
from qcompile.registry import register_pass

__all__ = ["AbsorbHighBiasPass"]
logger = logging.getLogger(__name__)


class AbsorbOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lower_bound: Literal["interval", "batchnorm"] = Field(
        "interval", description="interval: provable bound, exact; batchnorm: beta - n_sigma*|gamma| (the paper)")
    padding: Literal["exact_only", "explicit", "ignore"] = "exact_only"
    n_sigma: float = Field(3.0, ge=0, description="c = max(0, beta - n_sigma*|gamma|) with lower_bound: batchnorm")
    identity: bool = Field(True, description="absorb the whole mean beta where no activation separates the layers")
    dead_channels: bool = Field(True, description="absorb the constant output of channels with (near) zero weights")
    min_relative_range: float = Field(1e-5, ge=0, description="dead: weight range <= this x the layer's largest")


# ---- a provable lower bound of the pre-activation ---------------------------------------------
def _input_interval(graph: Graph, value: Value, channels: int, rank: int,
                    depth: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel [lo, hi] every element of value (layout [N, C, ...], rank `rank`) lies in, from its producers."""
    unbounded = np.full(channels, -np.inf), np.full(channels, np.inf)
    node = value.producer
    if node is None or depth > 16 or node.domain not in ("", "ai.onnx"):
        return unbounded
    op = node.op_type
    if op in ("Relu", "Clip", "Pad", "MaxPool", "GlobalMaxPool", "AveragePool", "GlobalAveragePool", "Identity"):
        lo, hi = _input_interval(graph, node.inputs[0], channels, rank, depth + 1)
    if op == "Relu":
        return np.maximum(lo, 0.0), np.maximum(hi, 0.0)
    if op == "Clip":
        bounds = clip_bounds(node)
        if bounds is None:
            return unbounded
        low = -np.inf if bounds[0] is None else bounds[0]
        high = np.inf if bounds[1] is None else bounds[1]
        return np.clip(lo, low, high), np.clip(hi, low, high)
    if op == "Min" and len(node.inputs) == 2:
        index = next((i for i in (0, 1) if node.input(i) is not None and node.input(i).is_const), None)
        if index is None:
            return unbounded
        const = node.input(index).const
        if not min_constant_is_per_channel(const, channels, rank):
            return unbounded
        c = per_channel(const, channels)
        lo, hi = _input_interval(graph, node.input(1 - index), channels, rank, depth + 1)
        return np.minimum(lo, c), np.minimum(hi, c)
    if op == "Pad":
        mode = node.attr("mode", b"constant")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
            return lo, hi
        pad_value = node.input(2).const if node.input(2) is not None and node.input(2).is_const else \
            np.asarray(node.attr("value", 0.0))
        if node.input(2) is not None and not node.input(2).is_const:
            return unbounded
        v = float(np.asarray(pad_value).reshape(-1)[0]) if np.asarray(pad_value).size else 0.0
        return np.minimum(lo, v), np.maximum(hi, v)
    if op in ("MaxPool", "GlobalMaxPool", "GlobalAveragePool", "Identity"):
        return lo, hi
    if op == "AveragePool":  # a mean of values in [lo, hi] (and of the padding 0 if it counts)
        if any(node.attr("pads", []) or []) and node.attr("count_include_pad", 0):
            return np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        return lo, hi
    return unbounded


def _interval_lower_bound(graph: Graph, layer: Layer) -> np.ndarray:
    """min over all inputs of layer's output per channel (−inf when its input is unbounded)."""
    node = layer.node
    if node.op_type != "Conv":
        return np.full(layer.out_channels, -np.inf)
    lo, hi = _input_interval(graph, node.inputs[0], layer.in_channels, layer.w.ndim)
    auto_pad = node.attr("auto_pad", b"NOTSET")
    if any(node.attr("pads", []) or []) or (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) not in \
            ("NOTSET", "VALID"):
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)  # padded taps read 0
    groups, cin_g = layer.group, layer.w.shape[1]
    w = layer.w.reshape(groups, layer.out_channels // groups, cin_g, -1)
    lo = lo.reshape(groups, 1, cin_g, 1)
    hi = hi.reshape(groups, 1, cin_g, 1)
    with np.errstate(invalid="ignore"):
        terms = np.where(w > 0, w * lo, np.where(w < 0, w * hi, 0.0))
    bias = layer.b if layer.b is not None else 0.0
    return terms.sum(axis=(2, 3)).reshape(-1) + bias


def _activation(value: np.ndarray, link: Link, upper: np.ndarray) -> np.ndarray:
    if link.activation == "identity":
        return value
    return np.clip(value, 0.0, upper)


def _shift(graph: Graph, link: Link, layer: Layer, upper: np.ndarray, opts: AbsorbOptions) -> np.ndarray:
    """c per channel of link.first (0 where nothing may move)."""
    c = np.zeros(layer.out_channels)
    bn = link.first.meta.get("batchnorm")
    if link.activation == "identity":
        if opts.identity and bn is not None:
            c = bn["beta"].astype(np.float64)
    elif opts.lower_bound == "interval":
        c = np.clip(np.nan_to_num(_interval_lower_bound(graph, layer), nan=0.0, neginf=0.0), 0.0, upper)
    elif bn is not None:
        gamma, beta = bn["gamma"].astype(np.float64), bn["beta"].astype(np.float64)
        c = np.clip(beta - opts.n_sigma * np.abs(gamma), 0.0, upper)
    if opts.dead_channels and layer.b is not None:
        r = layer.out_ranges()
        dead = r <= opts.min_relative_range * r.max()
        c = np.where(dead, _activation(layer.b, link, upper), c)
    return c


def _border_map(pads: list[int], shape: tuple, c: np.ndarray) -> np.ndarray:
    """[1, C, *spatial of the padded tensor]: −c_i on the padded border, 0 inside."""
    rank = len(shape)
    spatial = [int(d) for d in shape[2:]]
    inside = np.zeros([1, 1] + spatial, dtype=bool)
    index = [slice(None), slice(None)] + [slice(pads[k], spatial[k] - pads[k + rank - 2])
                                          for k in range(rank - 2)]
    inside[tuple(index)] = True
    border = (~inside).astype(np.float64)
    return -c.reshape([1, -1] + [1] * (rank - 2)) * border


def _spatial_pads(pad_node: Node, rank: int) -> list[int]:
    pads = pad_node.input(1).const if pad_node.input(1) is not None else np.asarray(pad_node.attr("pads"))
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    return pads[2:rank] + pads[rank + 2:]


def _why_not_explicit(link: Link) -> str:
    pads = [n for n in link.path if n.op_type == "Pad"]
    if len(pads) > 1 or (pads and any(link.second.attr("pads", []) or [])):
        return "padded twice"
    if pads and link.path[-1] is not pads[0]:
        return "ops between the Pad and the layer"
    auto_pad = link.second.attr("auto_pad", b"NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) not in ("NOTSET", "VALID"):
        return "auto_pad"
    if any(n.op_type in ("AveragePool", "MaxPool", "Flatten", "Reshape") for n in link.path):
        return "pooling on a padded path"
    if pads:
        mode = pads[0].attr("mode", b"constant")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
            return "non-constant padding mode"
        shape = pads[0].outputs[0].shape
    else:
        shape = link.second.inputs[0].shape
    if shape is None or not all(isinstance(d, int) for d in shape[1:]):
        return "unknown spatial shape"
    return ""


def _pad_explicitly(graph: Graph, link: Link, c: np.ndarray) -> None:
    """Make layer 2 read pad(y − c) + border(−c) = pad(y) − c everywhere."""
    second = link.second
    pad_nodes = [n for n in link.path if n.op_type == "Pad"]
    rank = second.input(1).const.ndim
    if pad_nodes:
        pad = pad_nodes[0]
        spatial = _spatial_pads(pad, rank)
    else:  # take the padding out of the Conv into an explicit Pad
        spatial = [int(p) for p in second.attr("pads")]
        data = second.inputs[0]
        pads = np.array([0, 0] + spatial[:rank - 2] + [0, 0] + spatial[rank - 2:], dtype=np.int64)
        pad = graph.add_node("Pad", [data, graph.add_constant(f"{second.name}_pads", pads)], 1,
                             name=f"{second.name}_explicit_pad", before=second)
        padded = tuple(data.shape[:2]) + tuple(int(d) + spatial[k] + spatial[k + rank - 2]
                                                for k, d in enumerate(data.shape[2:]))
        pad.outputs[0].dtype, pad.outputs[0].shape = data.dtype, padded
        second.replace_input(0, pad.outputs[0])
        second.set_attr("pads", [0] * (2 * (rank - 2)))
    out = pad.outputs[0]
    border = _border_map(spatial, out.shape, c).astype(np.float32)
    add = graph.add_node("Add", [out, graph.add_constant(f"{pad.name}_border_shift", border)], 1,
                         name=f"{pad.name}_border_shift", after=pad)
    add.outputs[0].dtype, add.outputs[0].shape = out.dtype, out.shape
    out.replace_all_uses_with(add.outputs[0], except_nodes=[add])


@register_pass("absorb_high_bias")
class AbsorbHighBiasPass(Pass):
    """High-bias absorption across Conv/Gemm links through Relu, Clip(0, u) or no activation."""

    phase = Phase.TRANSFORM
    Options = AbsorbOptions
    establishes = frozenset({"high_bias_absorbed"})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        links, _ = find_links(graph)
        stats = {"links": len(links), "absorbed_links": 0, "absorbed_channels": 0, "skipped_padded": 0,
                 "explicit_pads": 0, "border_inexact": 0}
        layers: dict[int, Layer] = {}
        # plan on the unmodified graph: absorption keeps every pre-activation, so the bounds stay true
        plans = []
        for link in links:
            if link.activation not in ("identity", "relu", "clip"):
                ctx.note("not_absorbed", {"node": link.first.name,
                                          "reason": f"activation '{link.activation}' is not shift-exact"})
                continue
            first = layers.setdefault(id(link.first), Layer(link.first))
            layers.setdefault(id(link.second), Layer(link.second))
            upper = link.bound.bounds() if link.bound is not None else np.full(first.out_channels, np.inf)
            plans.append((link, upper, _shift(graph, link, first, upper, self.options)))
        for link, upper, c in plans:
            reason = self._try_absorb(graph, link, layers, upper, c, stats)
            if reason:
                ctx.note("not_absorbed", {"node": link.first.name, "reason": reason})
        for layer in layers.values():
            layer.commit(graph, "hba")
        graph.remove_unused()
        return PassResult(modified=stats["absorbed_links"] > 0, stats=stats)

    def _try_absorb(self, graph: Graph, link: Link, layers: dict[int, Layer], upper: np.ndarray, c: np.ndarray,
                    stats: dict) -> str:
        """Move c from link.first's bias into link.second's; returns why not (empty when done or c = 0)."""
        opts = self.options
        if not np.any(c != 0):
            return ""
        first, second = layers[id(link.first)], layers[id(link.second)]
        if link.padded:
            if opts.padding == "exact_only":
                stats["skipped_padded"] += 1
                return "layer 2 reads zero padding (padding: exact_only)"
            if opts.padding == "explicit":
                reason = _why_not_explicit(link) or ("opset < 11" if graph.opset("") < 11 else "")
                if reason:
                    stats["skipped_padded"] += 1
                    return f"cannot pad explicitly: {reason}"
                _pad_explicitly(graph, link, c)
                stats["explicit_pads"] += 1
            else:
                stats["border_inexact"] += 1
        first.add_to_bias(-c, batchnorm_shift=True)
        second.add_to_bias(second.in_sums(c, link.columns), batchnorm_shift=False)
        if link.bound is not None:
            set_upper_bound(graph, link.bound, upper - c, "hba")
        stats["absorbed_links"] += 1
        stats["absorbed_channels"] += int(np.sum(c != 0))
        return ""
