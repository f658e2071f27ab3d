"""`gptq`: pick each weight's integer codes to minimise the layer's output error, not the weight's.

Before:  x -> Conv(W) -> y          (W calibrated: W.qparams = per-channel scale s, zero point z)
After:   x -> Conv(Ŵ) -> y          Ŵ = s·(q − z), on the same grid, codes q chosen by GPTQ

Rounding every weight to the nearest code minimises ‖W − Ŵ‖, not the layer's output error. For
one output row w of a layer whose input patches are x, the expected squared output error is
(w − ŵ)ᵀ H (w − ŵ) with H = E[x xᵀ]. GPTQ (Frantar et al., ICLR 2023, eq. 2-3 and Algorithm 1;
the Optimal Brain Quantizer of Frantar & Alistarh 2022 made column-wise) quantizes one input
column j at a time and lets the columns not yet quantized compensate:

    q_j = quant(w_j)                                   round to nearest on the calibrated grid
    δ   = (w_j − ŵ_j) / U_jj                           U: upper Cholesky factor of H⁻¹ = UᵀU
    w_k ← w_k − δ · U_jk   for every later column k    (eq. 2, the Optimal Brain Surgeon update)

The rows of U are the inverse Hessians of the remaining columns after each elimination (eq. 3),
so one factorisation serves all columns (Algorithm 1). H is dampened by
`damping`·mean(diag H) on its diagonal (Algorithm 1's λ, 1% by default). With `act_order`
(default) columns go in order of decreasing H_jj, the "act-order" heuristic of the GPTQ
reference code, which matters at 3-4 bits (EfficientNet-Lite0 W4A8: 84.75% top-1 with it, 82.50%
without). An input that is always zero (H_jj = 0) is rounded to nearest and compensates nothing.

Clip search (`clip_search`, default on): each channel's calibrated range (the whole tensor's,
per tensor) is also tried shrunk to 0.95, 0.9, ... 0.7 of itself; GPTQ runs for every ratio and
each row keeps the ratio whose GPTQ codes give the smallest output error (w − ŵ)ᵀ H (w − ŵ)
(rows are independent given H, so the per-row choice is exact). The weight's scale is updated
to the chosen ratios. Choosing the ratio by nearest-rounding error instead and then running GPTQ
once was worse on EfficientNet-Lite0 W4A8 (77.75% top-1 against 82.50%, 400 images).

The weight constant is replaced by the dequantized values s·(q − z), so insert_qdq's
round-to-nearest returns exactly the chosen codes; the float weight is kept in
value.meta["float_weight"] for correct_bias, which runs after this pass and removes the mean
output error that remains.

A layer whose calibration data gives fewer input vectors than it has inputs per group (the
classifier of an ImageNet model reads one 1280-vector per image) has a singular H: compensation
would fit the calibration samples and hurt every other input. Such a layer is rounded to nearest,
its clip search weighted by diag(H) only, and the report notes it.

H is the second moment of the FLOAT model's input to each layer over the calibration data
(onnxruntime, in groups under the memory budget; qcompile.collect.observe_float_values), taken as
the layer sees it: Conv inputs as im2col patches with the layer's pads, strides and dilations,
one K×K matrix per group (a depthwise layer gets one kernel-sized matrix per channel), Gemm and
MatMul inputs as rows. Every layer's float64 K×K moments are held until its codes are chosen:
compiling EfficientNet-Lite0 with the w4a8 recipe (100 images, batch 1) peaks at 0.88 GB resident
against 0.37 GB without gptq (/usr/bin/time, 69 s against 16 s). Layers: quantized Conv (any
group, 1-3 spatial dims), Gemm and MatMul with a constant 2-D weight; others (ConvTranspose,
weights already lowered) are skipped and noted.

Tried and not offered (EfficientNet-Lite0 W4A8, 100 calibration / 400 evaluation images):
H from the partially quantized model's inputs instead of the float model's (sequential GPTQ,
4 layers per onnxruntime run) gave 83.50% top-1 against 84.75% and took 2.5x as long; the
asymmetric objective E‖W x − Ŵ x̃‖² with x̃ the quantized model's input, solved as least squares
W C H̃⁻¹ before GPTQ, collapsed the model (0-7%): H̃ is ill-conditioned and the least-squares
weights amplify the input error along its weak directions. The same objective as a ridge target
(W C + γW)(H̃ + γI)⁻¹, one layer per run (GPTAQ, Li et al. 2025) did not collapse but gave 83.50%
and took 677 s instead of 122 s; with 4 layers per run it was worse than nearest rounding on the
digits example (later layers fit an input error that changes when the layers before them are
re-rounded). Shrinking H toward its diagonal by the Schäfer & Strimmer (2005) intensity, with an
image as the sample unit (it does reduce overfitting: on 100 held-out images the head conv's
output SQNR rose from 19.97 to 20.53 dB, the classifier reached 20.22 dB against 19.51 dB rounded
to nearest) gave 83.00% (KL to FP32 0.199 against 0.189). GPTQ on the covariance of x instead of
E[x xᵀ], leaving the mean error to correct_bias: 80.00%. Clip ratios down to 0.5 instead of 0.7:
83.25% (KL 0.201). The deep 1152-input project convs do overfit the calibration data (output
SQNR 25.7-32.8 dB on it, 22.1-26.3 dB on held-out images); none of the above changed that, and
damping 0.1 recovers only ~1 dB there while costing early layers. (The SQNRs in this paragraph
are against E‖W x‖², as the report gave them before it counted the bias.)
With the asymmetric 4-bit weights of recipes/w4a8.yaml (84.25%, KL 0.109; throwaway prototypes,
same images): calibrating on the 100 images plus their horizontal mirrors gave KL 0.109 and
84.25%, so mirrored copies do not cure the overfitting; refitting each channel's scale to its
chosen codes by least squares on H, s = (q − z)ᵀH w / (q − z)ᵀH (q − z), lowered the median output
error ratio from 0.262 to 0.252 but gave 83.25% (KL 0.109); fitting each layer's per-channel output
gain and offset to the float model in topological order (AIMET's empirical bias correction plus a
gain, on the weight-quantized model with float activations), in place of correct_bias, gave
84.25% with KL 0.123 and took 850 s. Counting each output's error only where the layer's float
output lies inside its ReLU6 window (one H per output channel, E[x xᵀ · 1{0 < y < 6}], as AdaRound
puts the activation in its objective) gave 83.75% with KL 0.133 and took 1800 s (not analysed
further; a per-channel H from the unmasked part of 100 images may simply overfit more).
Learned rounding over whole blocks (AdaRound's rectified sigmoid and annealed regulariser, Nagel
et al. 2020, fitted to BRECQ's block outputs, Li et al. 2021; a throwaway torch prototype with
float activations, rounding initialised to nearest) does not clearly beat GPTQ at the schedules
this machine can run: 50 Adam steps per block gave 50.50%, 500 steps (28 minutes) 82.75% with KL
0.155, 1000 steps (44 minutes) 85.50% with KL 0.126, against the w4a8 recipe's 84.25% and KL
0.109 (this pass, activations quantized as well) and float's 88.75%: more top-1 but a worse output
distribution, and still 3.25 points from float. One step over all 18 blocks at batch 32 takes
3.2 s on 2 cores, so the papers' 20k steps per block would take about 18 hours.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Iterator

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from qcompile.collect import observe_float_values
from qcompile.errors import PassError
from qcompile.executor.ops_conv import conv_geometry, im2col, pad_spatial
from qcompile.ir import Graph, Node, Value
from qcompile.numerics import dequantize, qparams_from_range, quantize, round_half_even
from qcompile.op_rules import calibrated_weight_problem
from qcompile.pipeline import Pass, PassContext, PassResult, Phase
from qcompile.qtypes import QParams
from qcompile.registry import register_pass

__all__ = ["GptqOptions", "GptqPass", "gptq_codes", "weight_matrix", "SecondMoment"]
logger = logging.getLogger(__name__)

LAYER_OPS = ("Conv", "Gemm", "MatMul")


class GptqOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    damping: float = Field(0.01, gt=0.0, le=1.0)
    act_order: bool = True
    clip_search: bool = True


def _dampened(h: np.ndarray, damping: float) -> np.ndarray:
    """h + damping·mean(diag h)·I per group, an always-zero input (h_jj = 0) given h_jj = 1 instead.

    Such an input carries no error, so its column is rounded to nearest and compensates nothing.
    """
    h = np.array(h, dtype=np.float64)
    k = h.shape[-1]
    diag = np.einsum("gkk->gk", h).copy()
    dead = diag <= 0
    index = np.nonzero(dead)
    h[index[0], index[1], :] = 0.0
    h[index[0], :, index[1]] = 0.0
    h[index[0], index[1], index[1]] = 1.0
    alive_mean = np.where(dead, 0.0, diag).sum(axis=1) / np.maximum((~dead).sum(axis=1), 1)
    h[:, np.arange(k), np.arange(k)] += damping * np.where(alive_mean > 0, alive_mean, 1.0)[:, None]
    return h


def gptq_codes(w: np.ndarray, h: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int, *,
               damping: float = 0.01, act_order: bool = True) -> np.ndarray:
    """Integer codes for weights w [G, R, K] (G groups of R rows over K inputs) given the second
    moments h [G, K, K] of each group's inputs and per-row scale / zero point [G, R].

    GPTQ Algorithm 1 (Frantar et al. 2023), all groups at once, one column per step.
    """
    w = np.array(w, dtype=np.float64)
    groups, rows, k = w.shape
    scale = np.broadcast_to(np.asarray(scale, np.float64), (groups, rows))
    zero_point = np.broadcast_to(np.asarray(zero_point, np.float64), (groups, rows))
    diag = np.einsum("gkk->gk", np.asarray(h, np.float64))
    order = np.argsort(-np.where(diag <= 0, -np.inf, diag), axis=1, kind="stable") if act_order \
        else np.broadcast_to(np.arange(k), (groups, k))
    h = _dampened(h, damping)
    w = np.take_along_axis(w, order[:, None, :], axis=2)
    h = np.take_along_axis(np.take_along_axis(h, order[:, :, None], axis=1), order[:, None, :], axis=2)
    upper = np.swapaxes(np.linalg.cholesky(np.linalg.inv(h)), 1, 2)  # H⁻¹ = UᵀU

    codes = np.empty(w.shape, dtype=np.int64)
    for j in range(k):
        column = w[:, :, j]
        q = np.clip(round_half_even(column / scale) + zero_point, qmin, qmax)
        codes[:, :, j] = q
        delta = (column - (q - zero_point) * scale) / upper[:, j, j][:, None]
        w[:, :, j + 1:] -= delta[:, :, None] * upper[:, None, j, j + 1:]
    restored = np.empty_like(codes)
    np.put_along_axis(restored, np.broadcast_to(order[:, None, :], codes.shape), codes, axis=2)
    return restored


# ---- layers as [G, R, K] matrices -----------------------------------------------------------------
def weight_matrix(node: Node, w: np.ndarray) -> tuple[np.ndarray, callable]:
    """The layer's weight as [groups, rows per group, inputs per group] and the inverse reshape."""
    if node.op_type == "Conv":
        groups = node.attr("group", 1)
        shape = w.shape
        return w.reshape(groups, shape[0] // groups, -1), lambda m: m.reshape(shape)
    if node.op_type == "Gemm" and node.attr("transB", 0):
        return w[None], lambda m: m[0]
    return w.T[None], lambda m: m[0].T  # Gemm (transB=0) and MatMul: [K, N]


def _row_params(qp: QParams, node: Node, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per row of weight_matrix(node, w), broadcast from the weight's axis."""
    shape = [1] * w.ndim
    if qp.axis is not None:
        shape[qp.axis] = -1
    scale = np.broadcast_to(np.asarray(qp.scale, np.float64).reshape(shape), w.shape)
    zero_point = np.broadcast_to(np.asarray(qp.zero_point, np.float64).reshape(shape), w.shape)
    # a weight quantized per output channel has one value per row; take it from the first input
    return weight_matrix(node, scale)[0][:, :, 0], weight_matrix(node, zero_point)[0][:, :, 0]


_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _row_errors(matrix: np.ndarray, chosen: np.ndarray, h: np.ndarray) -> np.ndarray:
    """(w − ŵ)ᵀ H (w − ŵ) per row, [G, R]."""
    error = chosen - matrix
    return np.sum(np.matmul(error, h) * error, axis=2)


class _Attributes:
    """conv_geometry reads attributes and builds errors through this interface."""

    def __init__(self, node: Node):
        self.node = node

    def attr(self, name: str, default=None):
        value = self.node.attr(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def error(self, message: str) -> PassError:
        return PassError(f"[gptq] {self.node.describe()}: {message}")


def _patches(node: Node, x: np.ndarray) -> Iterator[np.ndarray]:
    """The layer's input as it multiplies the weight, [G, K, P] (P patches), a few at a time."""
    x = np.asarray(x, np.float32)
    if node.op_type == "Conv":
        kernel = tuple(node.inputs[1].const.shape[2:])
        geometry = conv_geometry(_Attributes(node), x.shape[2:], kernel)
        groups = node.attr("group", 1)
        for sample in x:  # one sample's patches at a time bounds memory
            yield im2col(pad_spatial(sample[None], geometry, 0.0), geometry, groups)[0]
        return
    if node.op_type == "Gemm" and node.attr("transA", 0):
        x = x.T
    yield x.reshape(-1, x.shape[-1]).T[None]


def _moment(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Σ_p a bᵀ per group in float32 BLAS, returned as float64."""
    return np.matmul(a, np.swapaxes(b, 1, 2)).astype(np.float64)


class SecondMoment:
    """Running E[x xᵀ] of a layer's input patches, per group: [G, K, K], and E[x]: [G, K]."""

    def __init__(self, node: Node):
        self.node = node
        self.total: np.ndarray | None = None
        self.first: np.ndarray | None = None
        self.count = 0

    def observe(self, x: np.ndarray) -> None:
        for patches in _patches(self.node, x):
            moment = _moment(patches, patches)
            first = patches.sum(axis=2).astype(np.float64)  # pairwise along the contiguous axis
            self.total = moment if self.total is None else self.total + moment
            self.first = first if self.first is None else self.first + first
            self.count += patches.shape[2]

    def value(self) -> np.ndarray | None:
        return None if not self.count else self.total / self.count

    def mean(self) -> np.ndarray | None:
        return None if not self.count else self.first / self.count


def _bias_rows(node: Node, groups: int, rows: int) -> np.ndarray | None:
    """The layer's constant bias per row of weight_matrix, [G, R], in the units of W·x (Gemm:
    β/α·C); None when it has none (MatMul; a Gemm C that is not one value per output)."""
    if node.op_type not in ("Conv", "Gemm"):
        return None
    bias = node.input(2)
    if bias is None or not bias.is_const or bias.const.size != groups * rows:
        return None
    scale = 1.0
    if node.op_type == "Gemm":
        alpha = float(node.attr("alpha", 1.0))
        scale = float(node.attr("beta", 1.0)) / alpha if alpha else 0.0
    return scale * bias.const.astype(np.float64).reshape(groups, rows)


def _output_energy(node: Node, matrix: np.ndarray, h: np.ndarray, mean: np.ndarray) -> float:
    """E‖W x + b‖² summed over the rows: wᵀHw + 2·b·(w·E[x]) + b² per row.

    The bias counts: a BatchNorm-folded layer's input mean largely cancels against its bias, so
    E‖W x‖² overstates its output's energy (EfficientNet-Lite0 block 0 project conv, 4-bit: SQNR
    29.0 dB against E‖W x‖², 18.6 dB against E‖W x + b‖²)."""
    energy = np.sum(np.matmul(matrix, h) * matrix, axis=2)
    bias = _bias_rows(node, *matrix.shape[:2])
    if bias is not None:
        energy = energy + 2.0 * bias * np.einsum("grk,gk->gr", matrix, mean) + bias * bias
    return float(np.sum(energy))


def _why_not(node: Node) -> str:
    problem = calibrated_weight_problem(node)
    if problem:
        return problem
    weight = node.input(1)
    if weight.meta.get("float_weight") is not None:
        return "its codes were already chosen by an earlier gptq pass"
    if node.op_type == "Conv" and weight.const.ndim not in (3, 4, 5):
        return f"Conv weight of rank {weight.const.ndim}"
    return ""


@register_pass("gptq")
class GptqPass(Pass):
    """Choose weight codes column by column so each layer's output error is smallest (GPTQ)."""

    phase = Phase.REFINE
    Options = GptqOptions
    requires = frozenset({"calibrated"})
    establishes = frozenset({"weights_rounded"})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        layers: list[Node] = []
        for node in graph.nodes:
            if not node.meta.get("quantized") or node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type not in LAYER_OPS:
                if node.op_type == "ConvTranspose":
                    ctx.note("gptq", {"node": node.name, "op": node.op_type, "skipped": "ConvTranspose is not handled"})
                continue
            reason = _why_not(node)
            if reason:
                ctx.note("gptq", {"node": node.name, "op": node.op_type, "skipped": reason})
            else:
                layers.append(node)
        if not layers:
            return PassResult(modified=False, stats={"layers": 0})

        moments = {node.name: SecondMoment(node) for node in layers}
        readers: dict[str, list[SecondMoment]] = {}
        inputs: dict[str, Value] = {}
        for node in layers:
            readers.setdefault(node.inputs[0].name, []).append(moments[node.name])
            inputs[node.inputs[0].name] = node.inputs[0]

        def observe(name: str, array: np.ndarray) -> None:
            for moment in readers[name]:
                moment.observe(array)

        observe_float_values(graph, list(inputs.values()), observe, ctx, self.name, "gptq statistics")

        changed_codes = total_codes = rounded = 0
        gain = []
        for node in ctx.progress(layers, len(layers), "gptq"):
            count = moments[node.name].count
            moments_mean = moments[node.name].mean()
            h = moments.pop(node.name).value()
            if node.inputs[1].meta.get("float_weight") is not None:  # a weight shared with an earlier layer
                ctx.note("gptq", {"node": node.name, "op": node.op_type,
                                  "skipped": "its weight is shared with an earlier layer, which chose its codes"})
                continue
            if h is None:
                ctx.note("gptq", {"node": node.name, "op": node.op_type,
                                  "skipped": "the calibration data never reached this layer"})
                continue
            inputs_per_group = h.shape[-1]
            if count < inputs_per_group:  # H is singular: compensation would fit the calibration samples
                ctx.note("gptq", {"node": node.name, "op": node.op_type, "rounded_to_nearest": (
                    f"{count} input vectors from the calibration data cannot determine the second moment of "
                    f"its {inputs_per_group} inputs; only the clip search ran, weighted by each input's energy "
                    "(calibrate on more samples to include it)")})
            figures = self._round(node, h, moments_mean, compensate=count >= inputs_per_group)
            changed_codes += figures["codes_changed"]
            total_codes += figures["codes"]
            rounded += 1
            gain.append(figures["output_error_ratio"])
            ctx.note("gptq", {"node": node.name, "op": node.op_type, **figures})
        return PassResult(modified=rounded > 0, stats={
            "layers": rounded, "codes_changed": changed_codes, "codes": total_codes,
            "median_output_error_ratio": float(np.median(gain)) if gain else None})

    def _round(self, node: Node, h: np.ndarray, mean: np.ndarray, compensate: bool = True) -> dict:
        """Choose the codes of one layer; returns the report's figures for it: codes changed from
        nearest rounding, output error relative to nearest rounding at the calibrated clip, and the
        layer output's SQNR on the calibration data (E‖Wx + b‖² / E‖(W − Ŵ)x‖², the float input
        mean E[x] giving the bias term; the mean error is counted, before correct_bias removes it).

        Without compensation the codes are the nearest ones and only the clip search runs, with the
        errors weighted by diag(H) (each input's energy)."""
        measured_h = h  # errors are reported against the full H even when only its diagonal steers
        if not compensate:
            h = h * np.eye(h.shape[-1])
        weight = node.input(1)
        float_w = weight.const
        calibrated = weight.qparams
        spec = calibrated.spec
        matrix, back = weight_matrix(node, float_w.astype(np.float64))
        groups, rows, inputs = matrix.shape
        candidates = [calibrated] + ([qparams_from_range(calibrated.lo * r, calibrated.hi * r, spec)
                                      for r in _CLIP_RATIOS[1:]] if self.options.clip_search else [])
        # every candidate's rows side by side: one GPTQ sweep for all (rows are independent given H)
        scale, zero_point = (np.concatenate(parts, axis=1) for parts in zip(
            *(_row_params(qp, node, float_w) for qp in candidates)))
        stacked = np.tile(matrix, (1, len(candidates), 1))
        if compensate:
            codes = gptq_codes(stacked, h, scale, zero_point, spec.qmin, spec.qmax,
                               damping=self.options.damping, act_order=self.options.act_order)
        else:
            codes = np.clip(round_half_even(stacked / scale[..., None]) + zero_point[..., None], spec.qmin, spec.qmax)
        errors = _row_errors(stacked, (codes - zero_point[..., None]) * scale[..., None], h)
        errors = errors.reshape(groups, len(candidates), rows)
        codes = codes.reshape(groups, len(candidates), rows, inputs)
        if calibrated.axis is None:  # one clip for the tensor
            best = np.full((groups, rows), int(np.argmin(errors.sum(axis=(0, 2)))))
            qp = candidates[int(best.flat[0])]
        else:
            best = np.argmin(errors, axis=1)  # [G, R], rows in channel order
            pick = lambda field: np.stack([getattr(c, field) for c in candidates])[  # noqa: E731
                best.reshape(-1), np.arange(best.size)]
            qp = dataclasses.replace(calibrated, scale=pick("scale"), zero_point=pick("zero_point"),
                                     lo=pick("lo"), hi=pick("hi"))
        weight.qparams = qp
        codes = back(np.take_along_axis(codes, best[:, None, :, None], axis=1)[:, 0]).astype(spec.numpy_type)
        chosen = dequantize(codes, qp)
        if not np.array_equal(quantize(chosen, qp), codes):  # never seen: float32 s·q re-quantizes to q
            raise PassError(f"[gptq] {node.describe()}: the chosen codes do not survive re-quantization")
        nearest = dequantize(quantize(float_w, calibrated), calibrated)
        before, after = (float(np.sum(_row_errors(matrix, weight_matrix(node, w_hat.astype(np.float64))[0], measured_h)))
                         for w_hat in (nearest, chosen))
        signal = _output_energy(node, matrix, measured_h, mean)
        weight.const = chosen  # same name, dtype and shape; only the values move onto the grid
        weight.meta["float_weight"] = float_w
        return {"codes_changed": int(np.sum(codes != quantize(float_w, qp))), "codes": int(codes.size),
                "output_error_ratio": after / before if before > 0 else 1.0,
                "output_sqnr_db": 10 * math.log10(signal / after) if after > 0 and signal > 0 else None}
